// The AMX part of the AVX-512 table (kernels.h): the bfloat16 GEMV/GEMM on AMX tiles (TDPBF16PS: a 16 x 32
// bfloat16 tile times a 32 x 16 one into 16 x 16 float32 sums, 512 multiply-adds per cycle of one core against
// VDPBF16PS's 2 x 32). Sapphire Rapids and later; compiled with AVX-512 + AMX-TILE/AMX-BF16 flags and used
// only where the probe found the tile state enabled and Linux granted it (cpu_features.cpp). Every other entry
// of this table is avx512_vnni's (dispatch.cpp).
//
// Operands: the weight (N, K) is the A tile as stored (16 rows of 32 k, row stride K), so it is never repacked;
// x is the B tile, packed once per call by bf16_prepare into pairs of k (16 rows of 16 activations x 2 k, 1 KB
// per 16 activation rows x 32 k), zero past K and past M. The C tile is y^T (16 weight rows x 16 activations).
// Each kernel call: 2 x 2 C tiles (32 weight rows x 32 activation rows; 1 x 1 .. 2 x 2 at the edges), k in
// order 32 at a time. A range's last rows (N not a multiple of 16, or a range ending inside a block) and the
// K tail (K not a multiple of 32) are copied into zeroed 16-row buffers first: no tile reads past the weight.
//
// Bits: every output is one C element, accumulated by TDPBF16PS over the k steps 0, 32, 64, ... in order; what
// else the tile holds (other weight rows, other activation rows, zero padding) does not enter it. So a row's
// result depends on K alone, not on M, the tile, the thread count or which rows were padded: within this
// table a row alone gives the bits it gets among 7, 16 or 65 rows (csrc/tests/kernel_tests.cpp). They are not
// avx512_vnni's bits (TDPBF16PS sums each pair of products in its own order and flushes denormals), which is
// why M = 1 runs here too: a decode step's rows must match a single request's, whatever their count.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace llava_fast {
namespace {

constexpr int kTileK = 32;  // bfloat16 k per tile row (64 bytes)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (2 weight blocks x 2 activation blocks); 4, 5: A (weight blocks); 6, 7: B (activation blocks).
// All 16 rows x 64 bytes.
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// x as B tiles: block b of 16 activation rows, k step s: 16 pairs x 16 rows x 2 = 512 bfloat16 at
// ((b * S + s) * 512), element (i, r, j) = x[16b + r][32s + 2i + j], zero past M and K.
inline int64_t k_steps(int64_t K) { return (K + kTileK - 1) / kTileK; }

size_t bf16_layout_bytes(const GemvRows& p) {
  const int64_t M = p.a->m, K = p.a->k;
  return size_t((M + 15) / 16) * size_t(k_steps(K)) * 1024 + 64;
}

void bf16_prepare(const GemvRows& p, void* scratch) {
  const int64_t M = p.a->m, K = p.a->k, S = k_steps(K), blocks = (M + 15) / 16;
  uint32_t* out = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  std::memset(out, 0, size_t(blocks) * S * 1024);
  for (int64_t m = 0; m < M; ++m) {
    const uint32_t* x = reinterpret_cast<const uint32_t*>(p.xb + m * K);  // K even: whole pairs
    uint32_t* dst = out + (m / 16) * S * 256 + (m % 16);
    for (int64_t pair = 0; pair < K / 2; ++pair) dst[(pair / 16) * 256 + (pair % 16) * 16] = x[pair];
  }
}

inline const uint16_t* packed_x(const GemvRows& p) {
  return reinterpret_cast<const uint16_t*>((reinterpret_cast<uintptr_t>(p.layout) + 63) & ~uintptr_t(63));
}

// A buffer kept per thread and grown as needed (no std::vector here: its out-of-line members, compiled with
// this file's flags, would be shared symbols another file could bind; run_kernel_tests.sh checks with nm).
struct PadBuffer {
  uint16_t* data = nullptr;
  size_t size = 0;
  uint16_t* get(size_t n) {
    if (n > size) {
      std::free(data);
      data = static_cast<uint16_t*>(std::malloc(n * 2));
      size = n;
    }
    return data;
  }
  ~PadBuffer() { std::free(data); }
};

// Where the A tiles of one weight block come from: the weight itself (full steps) and a 16 x 32 buffer for the
// K tail, or a zeroed copy of the whole block (fewer than 16 rows).
struct WeightBlock {
  const uint16_t* full;  // full k steps: row r, step s at full + r * stride + 32 s
  int64_t stride;        // elements
  const uint16_t* tail;  // the K tail step's 16 rows, or null when K % 32 == 0
  int64_t tail_stride;   // elements
};

WeightBlock weight_block(const uint16_t* w, int64_t K, int64_t rows, uint16_t* pad, uint16_t* tail) {
  const int64_t full = K / kTileK * kTileK, left = K - full;
  if (rows < 16) {  // a zeroed copy, row stride S * 32: every step (tail included) reads from it
    const int64_t stride = k_steps(K) * kTileK;
    std::memset(pad, 0, size_t(16 * stride) * 2);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(pad + r * stride, w + r * K, size_t(K) * 2);
    return {pad, stride, left ? pad + full : nullptr, stride};
  }
  if (left) {
    const __mmask32 mk = __mmask32((1u << left) - 1);
    for (int r = 0; r < 16; ++r) _mm512_storeu_si512(tail + r * kTileK, _mm512_maskz_loadu_epi16(mk, w + r * K + full));
  }
  return {w, K, left ? tail : nullptr, kTileK};
}

// y rows m .. m + 16 MB - 1 (those below M) x weight rows n .. n + 16 NB - 1 (those below n1): NB x MB C tiles.
template <int NB, int MB>
void tiles(const GemvRows& p, const WeightBlock* wb, const uint16_t* xp, int64_t S, int64_t n, int64_t n1,
           int64_t m) {
  const int64_t full = p.a->k / kTileK;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < S; ++s) {
    const bool tail = s == full;
    _tile_loadd(4, tail ? wb[0].tail : wb[0].full + s * kTileK, (tail ? wb[0].tail_stride : wb[0].stride) * 2);
    if (NB == 2) _tile_loadd(5, tail ? wb[1].tail : wb[1].full + s * kTileK, (tail ? wb[1].tail_stride : wb[1].stride) * 2);
    _tile_loadd(6, xp + s * 512, 64);
    if (MB == 2) _tile_loadd(7, xp + (S + s) * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (MB == 2) _tile_dpbf16ps(1, 4, 7);
    if (NB == 2) _tile_dpbf16ps(2, 5, 6);
    if (NB == 2 && MB == 2) _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float c[4][16 * 16];
  _tile_stored(0, c[0], 64);
  if (MB == 2) _tile_stored(1, c[1], 64);
  if (NB == 2) _tile_stored(2, c[2], 64);
  if (NB == 2 && MB == 2) _tile_stored(3, c[3], 64);
  // y^T tiles -> y rows: a gather per activation row (column of C), one masked store of 16 outputs.
  const int64_t M = p.a->m;
  float* y = p.yf ? p.yf : static_cast<float*>(p.a->y);
  const int64_t y_stride = p.yf ? p.a->n : p.a->y_stride;
  const __m512i column = _mm512_mullo_epi32(_mm512_set1_epi32(16), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                      10, 11, 12, 13, 14, 15));
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) {
      const float* ct = c[i * 2 + j];  // (weight row, activation row)
      const int64_t rows = std::min<int64_t>(16, n1 - n - 16 * i), acts = std::min<int64_t>(16, M - m - 16 * j);
      const __mmask16 mk = rows >= 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
      for (int64_t a = 0; a < acts; ++a)
        _mm512_mask_storeu_ps(y + (m + 16 * j + a) * y_stride + n + 16 * i, mk,
                              _mm512_i32gather_ps(column, ct + a, 4));
    }
}

void gemv_bf16_amx(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, M = a.m, S = k_steps(K), mblocks = (M + 15) / 16;
  const uint16_t* xp = packed_x(p);
  thread_local PadBuffer pad;  // one partial block at a time, 16 x S x 32
  alignas(64) uint16_t tail[2][16 * kTileK];
  configure_tiles();
  for (int64_t n = n0; n < n1; n += 32) {
    const int nb = n1 - n > 16 ? 2 : 1;
    WeightBlock wb[2];
    for (int i = 0; i < nb; ++i) {
      const int64_t rows = std::min<int64_t>(16, n1 - n - 16 * i);
      wb[i] = weight_block(static_cast<const uint16_t*>(a.w) + (n + 16 * i) * K, K, rows,
                           rows < 16 ? pad.get(size_t(16 * S * kTileK)) : nullptr, tail[i]);
    }
    for (int64_t mb = 0; mb < mblocks; mb += 2) {
      const uint16_t* x = xp + mb * S * 512;
      const bool two = mblocks - mb >= 2;
      if (nb == 2) {
        two ? tiles<2, 2>(p, wb, x, S, n, n1, mb * 16) : tiles<2, 1>(p, wb, x, S, n, n1, mb * 16);
      } else {
        two ? tiles<1, 2>(p, wb, x, S, n, n1, mb * 16) : tiles<1, 1>(p, wb, x, S, n, n1, mb * 16);
      }
    }
  }
  _tile_release();
}

}  // namespace

const KernelTable* avx512_amx_kernels() {
  static const KernelTable table = [] {
    KernelTable t{};
    t.name = "avx512", t.variant = "avx512_amx";
    t.gemv_bf16 = gemv_bf16_amx;
    t.gemv_bf16_layout_bytes = bf16_layout_bytes, t.gemv_bf16_prepare = bf16_prepare;
    return t;
  }();
  return &table;
}

}  // namespace llava_fast
