// The AMX part of the AVX-512 table (kernels.h): the bfloat16 GEMV/GEMM on AMX tiles (TDPBF16PS: a 16 x 32
// bfloat16 tile times a 32 x 16 one into 16 x 16 float32 sums, 512 multiply-adds per cycle of one core against
// VDPBF16PS's 2 x 32). Sapphire Rapids and later; compiled with AVX-512 + AMX-TILE/AMX-BF16 flags and used
// only where the probe found the tile state enabled and Linux granted it (cpu_features.cpp). With AMX-INT8 also
// the int8 prefill GEMM's panel on tiles (TDPBSSD, its own section below). Every other entry of this table is
// avx512_vnni's (dispatch.cpp).
//
// Operands: the weight (N, K) is the A tile as stored (16 rows of 32 k, row stride K), so it is never repacked;
// x is the B tile, packed once per call by bf16_prepare (from bfloat16 or float32 x) into pairs of k (16 rows
// of 16 activations x 2 k, 1 KB per 16 activation rows x 32 k), zero past K and past M. The C tile is y^T (16
// weight rows x 16 activations). Each kernel call: 2 x 2 C tiles (32 weight rows x 32 activation rows; 1 x 1 ..
// 2 x 2 at the edges), k in order 32 at a time; its C tiles are transposed into y rows (rounded to bfloat16
// there when asked) during the next call's k steps. Against per-tile gathers and gemv.cpp's separate rounding
// and x conversion this made tiny-next's prefill GEMMs (2,945 rows in 128-row chunks, 2 threads) 2.0x faster.
// A range's last rows (N not a multiple of 16, or a range ending inside a block) and the K tail (K not a
// multiple of 32) are copied into zeroed 16-row buffers first: no tile reads past the weight.
//
// Bits: every output is one C element, accumulated by TDPBF16PS over the k steps 0, 32, 64, ... in order; what
// else the tile holds (other weight rows, other activation rows, zero padding) does not enter it. So a row's
// result depends on K alone, not on M, the tile, the thread count or which rows were padded: within this
// table a row alone gives the bits it gets among 7, 16, 65, 128 or 300 rows (csrc/tests/kernel_tests.cpp). Not
// avx512_vnni's bits (TDPBF16PS sums each pair of products in its own order and flushes denormals), which is
// why M = 1 runs here too: a decode step's rows must match a single request's, whatever their count.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "avx512_common.h"
#include "kernels.h"
#include "q8_panel_x86.h"

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

// 16 x 16 32-bit elements transposed in registers: r[i] holds row i on entry, column i on return (64
// shuffles). Attention builds its key tiles with it; the GEMM packs x into B tiles
// (a tile's row i holds 16 activation rows' pair i) and turns C tiles (weight rows x activation rows) into y
// rows; per element it replaces a 4-byte store 64 bytes apart (the pack: K = 1536, 128 rows took 71 us) or a
// gather lane (the y store: 16 gathers per tile, 25% of a 960 x 576 x 128 call).
inline void transpose16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i x0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xee);
    const __m512i y0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44), y1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xdd);
  }
}

// float32 bits -> bfloat16 bits, exactly convert.h's f32_to_bf16 (round to nearest even, NaN kept quiet), 16 at
// a time, so y holds what gemv.cpp's rounding of a float32 y would hold.
inline __m256i round_bf16(__m512i u) {
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// Rows m0 .. m1 - 1 (m0 a multiple of 16: whole blocks) of x into their B tiles.
void bf16_prepare(const GemvRows& p, void* scratch, int64_t m0, int64_t m1) {
  const int64_t M = p.a->m, K = p.a->k, S = k_steps(K), pairs = K / 2;  // K even
  __m512i* out = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  const uint32_t* x = reinterpret_cast<const uint32_t*>(p.xb);  // (M, K / 2) pairs; or float32 p.xf (M, K)
  for (int64_t b = m0 / 16; b < (std::min(M, m1) + 15) / 16; ++b) {
    const int64_t rows = std::min<int64_t>(16, M - 16 * b);
    for (int64_t s = 0; s < S; ++s) {
      const __mmask16 mk = tail16(pairs - 16 * s);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        if (i >= rows) {
          r[i] = _mm512_setzero_si512();
        } else if (x) {
          r[i] = _mm512_maskz_loadu_epi32(mk, x + (16 * b + i) * pairs + 16 * s);
        } else {  // 32 floats -> 16 pairs of bfloat16
          const float* xf = p.xf + (16 * b + i) * K + 32 * s;
          const __m256i lo = round_bf16(_mm512_castps_si512(_mm512_maskz_loadu_ps(tail16(K - 32 * s), xf)));
          const __m256i hi = round_bf16(_mm512_castps_si512(_mm512_maskz_loadu_ps(tail16(std::max<int64_t>(0, K - 32 * s - 16)), xf + 16)));
          r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_si512(out + (b * S + s) * 16 + i, r[i]);
    }
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

// One C tile waiting to be written: 16 weight rows x 16 activation rows (y^T), row-major float32 at c.
struct PendingTile {
  const float* c;
  int64_t row, col;  // y's first activation row and first output
  int64_t acts;      // activation rows below M (1 .. 16)
  __mmask16 cols;    // outputs below the range's end
};

// y^T tile -> y rows: a transpose, then one masked store of 16 outputs per activation row (bfloat16 y rounded
// here, so no float32 y is written and read again).
inline void write_tile(const GemvArgs& a, const PendingTile& t) {
  __m512i r[16];  // C: r[weight row] lane activation row; transposed: r[activation row] lane weight row
  for (int w = 0; w < 16; ++w) r[w] = _mm512_load_si512(t.c + 16 * w);
  transpose16(r);
  for (int64_t i = 0; i < t.acts; ++i) {
    const int64_t at = (t.row + i) * a.y_stride + t.col;
    if (a.x_dtype == kActBF16) {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + at, t.cols, round_bf16(r[i]));
    } else if (a.round_y_bf16) {
      _mm512_mask_storeu_epi32(static_cast<float*>(a.y) + at, t.cols,
                               _mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16(r[i])), 16));
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(a.y) + at, t.cols, _mm512_castsi512_ps(r[i]));
    }
  }
}

// y rows m .. m + 16 MB - 1 (those below M) x weight rows n .. n + 16 NB - 1 (those below n1): NB x MB C tiles,
// stored into c and left in `pending` for the next call to write. The previous call's tiles are written
// between this call's first k steps, one per step: the transposes (64 shuffles each) run on the core while the
// tile unit works through the queued TDPBF16PS (16 cycles each), instead of after them with the unit idle
// (written after the tiles, they took ~20% of a 128-row call at K = 576).
template <int NB, int MB>
void tiles(const GemvRows& p, const WeightBlock* wb, const uint16_t* xp, int64_t S, int64_t n, int64_t n1,
           int64_t m, float (*c)[256], PendingTile (&pending)[4], int& npending) {
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
    // x's B tiles 2 steps ahead into L1 (past this call's steps: the next call's, which follow in memory).
    // Tile loads from L2 starve the tile unit: with B read from L1 alone a 960 x 576 x 512 call ran 1.5x
    // faster; this prefetch won 5-10% at 128-512 rows (4 and 8 steps ahead: less).
    const int64_t ahead = s + 2 < S ? s + 2 : S + s + 2;
    for (int l = 0; l < 16; ++l) _mm_prefetch(reinterpret_cast<const char*>(xp + ahead * 512) + 64 * l, _MM_HINT_T0);
    if (MB == 2)
      for (int l = 0; l < 16; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(xp + (S + ahead) * 512) + 64 * l, _MM_HINT_T0);
    _tile_dpbf16ps(0, 4, 6);
    if (MB == 2) _tile_dpbf16ps(1, 4, 7);
    if (NB == 2) _tile_dpbf16ps(2, 5, 6);
    if (NB == 2 && MB == 2) _tile_dpbf16ps(3, 5, 7);
    if (s < npending) write_tile(*p.a, pending[s]);
  }
  for (int64_t s = S; s < npending; ++s) write_tile(*p.a, pending[s]);
  _tile_stored(0, c[0], 64);
  if (MB == 2) _tile_stored(1, c[1], 64);
  if (NB == 2) _tile_stored(2, c[2], 64);
  if (NB == 2 && MB == 2) _tile_stored(3, c[3], 64);
  npending = 0;
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j)
      pending[npending++] = {c[i * 2 + j], m + 16 * j, n + 16 * i, std::min<int64_t>(16, p.a->m - m - 16 * j),
                             tail16(n1 - n - 16 * i)};
}

void gemv_bf16_amx(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, M = a.m, S = k_steps(K), mblocks = (M + 15) / 16;
  const uint16_t* xp = packed_x(p);
  thread_local PadBuffer pad;  // one partial block at a time, 16 x S x 32
  alignas(64) uint16_t tail[2][16 * kTileK];
  alignas(64) float c[2][4][256];  // C tiles of the last two calls: one being written while the next is stored
  PendingTile pending[4];
  int npending = 0, flip = 0;
  configure_tiles();
  for (int64_t n = n0; n < n1; n += 32) {
    const int nb = n1 - n > 16 ? 2 : 1;
    WeightBlock wb[2];
    for (int i = 0; i < nb; ++i) {
      const int64_t rows = std::min<int64_t>(16, n1 - n - 16 * i);
      wb[i] = weight_block(static_cast<const uint16_t*>(a.w) + (n + 16 * i) * K, K, rows,
                           rows < 16 ? pad.get(size_t(16 * S * kTileK)) : nullptr, tail[i]);
    }
    for (int64_t mb = 0; mb < mblocks; mb += 2, flip ^= 1) {
      const uint16_t* x = xp + mb * S * 512;
      const bool two = mblocks - mb >= 2;
      if (nb == 2) {
        two ? tiles<2, 2>(p, wb, x, S, n, n1, mb * 16, c[flip], pending, npending)
            : tiles<2, 1>(p, wb, x, S, n, n1, mb * 16, c[flip], pending, npending);
      } else {
        two ? tiles<1, 2>(p, wb, x, S, n, n1, mb * 16, c[flip], pending, npending)
            : tiles<1, 1>(p, wb, x, S, n, n1, mb * 16, c[flip], pending, npending);
      }
    }
  }
  _tile_release();
  for (int i = 0; i < npending; ++i) write_tile(a, pending[i]);
}

// ---- Attention on tiles (kernels.h AttendKernel, bfloat16 K/V caches) ------------------------------------
//
// Both products of attention as TDPBF16PS, for the many queries of one KV head in a call (a prompt chunk's rows
// times the query heads of their GQA group; a decode row is a call of `group` queries). avx512_vnni's
// attend_many runs them as float32 FMAs on K/V widened per load, with a shuffle tree per 4 keys that costs as
// much as the products; a tile does 16 x 16 x 32 multiply-adds per instruction.
//   q . k   A = the queries, rounded to bfloat16 (a bfloat16 model's q already is), 16 rows x 32 head dims, as
//           packed once per call; B = 16 keys in pairs of head dims (the VNNI layout: row k holds each key's
//           dims 2k, 2k + 1), built per block of 32 keys by a 16 x 16 transpose of 32-bit pairs, once for all
//           the call's queries; C = scores, 16 queries x 16 keys, stored as rows. (K as the A tile straight from
//           the cache would leave C = scores^T, a transpose per query block and key block instead of per key
//           block: 6x more at 88 queries per call.)
//   softmax float32 per query over its own keys (exp2_nonpositive16, lanes by key mod 16 from key 0; the max
//           taken per key block as its scores are stored), e rounded to bfloat16
//           as p, written over the query's own scores row; keys past the query's length get p = 0.
//   p . v   A = p, 16 queries x 32 keys; B = 32 keys x 16 dims as pairs of consecutive keys (two rows of V
//           interleaved, once per call); C = out, 16 queries x 16 dims, accumulated over the key blocks in order
//           and times 1 / sum on the way out.
// Bits: every score is one C element over the head dims in order and every output one C element over the key
// blocks 0, 32, 64, ... in order (blocks at absolute key positions from key 0, so how a prompt is split into
// calls cannot move their edges); the softmax reads only the query's scores. A key block past a query's
// length (run because another query of its tile needs it) adds p = 0 times a finite value: no change. So a
// query's output depends on its own q, keys and values only, not on which queries share its tile or call, the
// thread count, the chunking or the GQA grouping: a row alone gives the bits it gets among 7, 16 or 65 (the
// driver checks). Keys and values past the last query's length (the cache's unwritten positions) are never
// read; their places in the tiles are zeros. The bits differ from avx512_vnni's (q and p are rounded to
// bfloat16, as the products of a bfloat16 model's SDPA are): within 5e-3 of the output's scale of the scalar
// reference (kernel_tests.cpp; measured up to 5e-4 at 3-102 keys).
// Calls of at most 16 queries (one query block: a decode row's GQA group, a short prompt slice) take q . k with
// the roles swapped: A = 16 keys x 32
// head dims loaded straight from the cache (row stride pos_bytes), B = the call's queries as columns in pairs of
// head dims, C = scores^T (16 keys x queries), read back per query by a gather. This drops the per-block
// transpose of K (2/5 of an n = 1 call at 400 keys, D = 64: 1.9 of 4.6 us on Sapphire Rapids), which only pays
// off when many queries share it. Each score is still one C element over the same head-dim pairs in the same
// order, and TDPBF16PS gives the same bits with A and B swapped (its products are exact; checked bit for bit
// over 54M random elements with exponents over the whole range, zeros and denormals: only NaN payloads
// differ), so a query's bits do not depend on which path its call took (the driver checks n = 1 .. 16 against
// 21 .. 195). p . v keeps its tiles (a C element's operands do not change with n) but builds each key block's
// B tiles just before use in L1 (few_output) instead of the whole V panel first. n = 1, 400 keys, D = 64 on
// Sapphire Rapids, K/V in cache: 4.7 -> 2.1 us per call; n = 16: 7.4 -> 5.9 us. (A float32 AVX-512 loop can
// not stand in for p . v: TDPBF16PS's sum of 32 products plus C is not a sequence of IEEE float32 adds in any
// order tried; 10-50% of random elements differ in the last bit.)

// Tiles for attention (all 16 rows x 64 bytes, as configure_tiles): 0-3 C (2 query blocks x 2 key or dims
// blocks), 4, 5 A (query blocks), 6, 7 B (key or dims blocks).

// A 64-byte aligned buffer kept per thread (PadBuffer's reason for not being a std::vector).
struct AlignedBuffer {
  void* data = nullptr;
  size_t size = 0;
  template <typename T>
  T* get(size_t count) {
    const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    if (bytes > size) {
      std::free(data);
      data = std::aligned_alloc(64, bytes);
      size = bytes;
    }
    return static_cast<T*>(data);
  }
  ~AlignedBuffer() { std::free(data); }
};

constexpr int kKeyBlock = 32;  // keys per p . v step (A's 32 bfloat16 columns) and per built K block (2 B tiles)
// Calls of at most this many queries take the few-query path (swapped q . k, few_output): one query block, so
// every query is a column of one B tile. Faster than the other path at every n up to it (400 keys, D = 64 on
// Sapphire Rapids: n = 5 3.6 against 5.3 us, n = 16 5.9 against 7.4 us); past it the K transpose is shared.
constexpr int kFewQueries = 16;
// Scores (float32) of one group of a many-query call: 1 MB, within Sapphire Rapids' 2 MB L2 beside the call's K
// and V panels (2 x 377 KB at 2,945 keys, D = 64).
constexpr int64_t kScoreFloats = int64_t(1) << 18;

// C tiles of queries qb .. qb + QB - 1 (blocks of 16) x keys t0 .. t0 + 31 of the scores, over the S head-dim steps.
template <int QB>
inline void score_tiles(const uint16_t* qp, int64_t D, const uint16_t* kpanel, int64_t S, float* scores,
                        int64_t Tpad, int64_t qb, int64_t t0) {
  _tile_zero(0);
  _tile_zero(1);
  if (QB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < S; ++s) {
    _tile_loadd(4, qp + 16 * qb * D + 32 * s, D * 2);
    if (QB == 2) _tile_loadd(5, qp + 16 * (qb + 1) * D + 32 * s, D * 2);
    _tile_loadd(6, kpanel + s * 512, 64);
    _tile_loadd(7, kpanel + (S + s) * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (QB == 2) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  float* c = scores + 16 * qb * Tpad + t0;
  _tile_stored(0, c, Tpad * 4);
  _tile_stored(1, c + 16, Tpad * 4);
  if (QB == 2) {
    _tile_stored(2, c + 16 * Tpad, Tpad * 4);
    _tile_stored(3, c + 16 * Tpad + 16, Tpad * 4);
  }
}

// out of queries qb .. (blocks of 16) x dims 16 j .. 16 j + 31, over key blocks 0 .. blocks - 1 in order.
template <int QB>
inline void output_tiles(const uint16_t* p, int64_t p_stride, const uint16_t* vpanel, int64_t J, int64_t qb, int64_t j,
                         int64_t blocks, int n, float* const* o, const float* inv) {
  _tile_zero(0);
  _tile_zero(1);
  if (QB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t b = 0; b < blocks; ++b) {
    _tile_loadd(4, p + 16 * qb * p_stride + b * kKeyBlock, p_stride * 2);
    if (QB == 2) _tile_loadd(5, p + 16 * (qb + 1) * p_stride + b * kKeyBlock, p_stride * 2);
    _tile_loadd(6, vpanel + (b * J + j) * 512, 64);
    _tile_loadd(7, vpanel + (b * J + j + 1) * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (QB == 2) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float c[4][256];
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  if (QB == 2) {
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  }
  for (int a = 0; a < QB; ++a)
    for (int r = 0; r < 16 && 16 * (qb + a) + r < n; ++r) {
      const int64_t i = 16 * (qb + a) + r;
      const __m512 s = _mm512_set1_ps(inv[i]);
      _mm512_storeu_ps(o[i] + 16 * j, _mm512_mul_ps(_mm512_load_ps(c[2 * a] + 16 * r), s));
      _mm512_storeu_ps(o[i] + 16 * j + 16, _mm512_mul_ps(_mm512_load_ps(c[2 * a + 1] + 16 * r), s));
    }
}

// The keys of block kb (32 from key 32 kb) as 2 x S B tiles (kernels' key halves h, head-dim steps s at
// (h S + s) x 512): row i of a tile = head dims 32 s + 2i, + 1 of its 16 keys. Keys from Tmax on are zeros.
template <int D>
inline void build_keys(const char* k, int64_t pos_bytes, int64_t Tmax, int64_t kb, uint16_t* kpanel) {
  constexpr int S = D / 32;
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < S; ++s) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t t = kKeyBlock * kb + 16 * h + j;
        r[j] = t < Tmax ? _mm512_loadu_si512(k + t * pos_bytes + 64 * s) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_si512(kpanel + (h * S + s) * 512 + 32 * i, r[i]);
    }
}

// The values of every key block as B tiles (block b, dims block j at (b J + j) x 512, J = D / 16): row r of a
// tile = (v[32 b + 2r][16 j + c], v[32 b + 2r + 1][16 j + c]) for c = 0 .. 15. Values from Tmax on are zeros.
template <int D>
void build_values(const char* v, int64_t pos_bytes, int64_t Tmax, int64_t blocks, uint16_t* vpanel) {
  constexpr int J = D / 16;
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t b = 0; b < blocks; ++b)
    for (int r = 0; r < 16; ++r) {
      const int64_t t = kKeyBlock * b + 2 * r;
      const char* v0 = v + t * pos_bytes;
      for (int c = 0; c < D / 32; ++c) {
        const __m512i a = t < Tmax ? _mm512_loadu_si512(v0 + 64 * c) : _mm512_setzero_si512();
        const __m512i e = t + 1 < Tmax ? _mm512_loadu_si512(v0 + pos_bytes + 64 * c) : _mm512_setzero_si512();
        _mm512_store_si512(vpanel + (b * J + 2 * c) * 512 + 32 * r, _mm512_permutex2var_epi16(a, lo, e));
        _mm512_store_si512(vpanel + (b * J + 2 * c + 1) * 512 + 32 * r, _mm512_permutex2var_epi16(a, hi, e));
      }
    }
}

// 2^t for t <= 0 (a softmax's scaled score minus its max), 16 lanes: t = n + f, |f| <= 1/2, 2^f by a degree-5
// polynomial (Chebyshev fit: within 1.1e-7 relative, float32's rounding), times 2^n (VSCALEFPS). Below -126 the
// result would be denormal: clamped to 2^-126 ~ 1e-38 (as exp16 clamps at -87.3). t second in VMAXPS keeps a NaN
// (an inf in q or K) NaN. 9 vector operations against exp16's 15 with the scaling and max subtraction it needs.
inline __m512 exp2_nonpositive16(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-126.f), t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.3400432653725147e-3f), f, _mm512_set1_ps(9.676037356257439e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550327152013779e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402210682630539e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

// One step of a query's running max of its scaled scores: lanes by key mod 16, keys t .. t + 15 (those below L).
// The softmax's max is this over t = 0, 16, 32, ... in order, whether taken in one pass over the row or per key
// block as the scores are stored (the same sequence per lane: the same bits).
inline __m512 max_step(__m512 top, const float* row, int64_t t, int64_t L, __m512 sc) {
  const __mmask16 mk = tail16(L - t);
  return _mm512_mask_max_ps(top, mk, top, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, row + t), sc));
}

// Softmax of one query's L scores (times `scale`), e = e^(s scale - max) rounded to bfloat16 as p over the row's
// own first 2 Tpad bytes (p[t] is written after s[2t .. 2t + 31] are read), zeros from L to Tpad; returns
// 1 / sum e. e = 2^(s (scale log2 e) - max log2 e), one FMA into exp2_nonpositive16; the sum in two accumulators
// (keys 32 m + 0..15 and 32 m + 16..31) so the adds' latency does not bound the loop. 88 queries x 2,945 keys on
// Sapphire Rapids: 87 -> 59 us with exp16 replaced (half of such an attend call was this softmax).
inline float softmax_to_p(float* row, int64_t L, int64_t Tpad, float scale, const float* running_max) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  if (running_max) {
    top = _mm512_load_ps(running_max);
  } else {
    for (int64_t t = 0; t < L; t += 16) top = max_step(top, row, t, L, _mm512_set1_ps(scale));
  }
  const __m512 c = _mm512_set1_ps(scale * 1.44269504f);
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top) * 1.44269504f);
  __m512 total[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  uint16_t* p = reinterpret_cast<uint16_t*>(row);
  int64_t t = 0;
  for (; t + kKeyBlock <= L; t += kKeyBlock) {
    const __m512 e0 = exp2_nonpositive16(_mm512_fmsub_ps(_mm512_loadu_ps(row + t), c, m));
    const __m512 e1 = exp2_nonpositive16(_mm512_fmsub_ps(_mm512_loadu_ps(row + t + 16), c, m));
    total[0] = _mm512_add_ps(total[0], e0);
    total[1] = _mm512_add_ps(total[1], e1);
    _mm512_storeu_si512(p + t, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
  }
  for (; t < Tpad; t += kKeyBlock) {
    __m512 e[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int h = 0; h < 2; ++h) {
      const int64_t at = t + 16 * h;
      if (at >= L) break;
      const __mmask16 mk = tail16(L - at);
      e[h] = _mm512_maskz_mov_ps(mk, exp2_nonpositive16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, row + at), c, m)));
      total[h] = _mm512_add_ps(total[h], e[h]);
    }
    _mm512_storeu_si512(p + t, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[1], e[0])));
  }
  return 1.f / _mm512_reduce_add_ps(_mm512_add_ps(total[0], total[1]));
}

// Scores of n <= 16 queries (rows of `scores`, stride Tpad) over keys 0 .. Tmax - 1 with K as the A tile
// (the section's header): qb = S B tiles, step s row i column j = head dims 32 s + 2i, + 1 of query j. Keys come
// straight from the cache 16 at a time; the last partial 16 are copied into zeroed rows first (no tile reads
// past Tmax). Scores from Tmax to the next 16 are those zero keys' (softmax never reads them).
template <int D>
inline void swapped_scores(const uint16_t* qb, int n, const char* k, int64_t pos_bytes, int64_t Tmax, float* scores,
                           int64_t Tpad) {
  constexpr int S = D / 32;
  alignas(64) uint16_t tail[16 * D];
  alignas(64) float c[2][256];
  const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(16));
  auto keys = [&](int64_t t0, int64_t& stride) -> const char* {
    if (t0 + 16 <= Tmax) return stride = pos_bytes, k + t0 * pos_bytes;
    std::memset(tail, 0, sizeof tail);
    for (int64_t t = t0; t < Tmax; ++t) std::memcpy(tail + (t - t0) * D, k + t * pos_bytes, D * 2);
    return stride = D * 2, reinterpret_cast<const char*>(tail);
  };
  for (int64_t t0 = 0; t0 < Tmax; t0 += 32) {
    const bool two = t0 + 16 < Tmax;
    int64_t st0 = 0, st1 = 0;
    const char* k0 = keys(t0, st0);
    _tile_zero(0);
    _tile_zero(1);
    for (int s = 0; s < S; ++s) {
      _tile_loadd(6, qb + s * 512, 64);
      _tile_loadd(4, k0 + 64 * s, st0);
      _tile_dpbf16ps(0, 4, 6);
    }
    if (two) {
      const char* k1 = keys(t0 + 16, st1);
      for (int s = 0; s < S; ++s) {
        _tile_loadd(6, qb + s * 512, 64);
        _tile_loadd(5, k1 + 64 * s, st1);
        _tile_dpbf16ps(1, 5, 6);
      }
    }
    _tile_stored(0, c[0], 64);
    if (two) _tile_stored(1, c[1], 64);
    for (int j = 0; j < n; ++j) {
      const __m512i at = _mm512_add_epi32(col, _mm512_set1_epi32(j));
      float* row = scores + j * Tpad + t0;
      _mm512_storeu_ps(row, _mm512_i32gather_ps(at, c[0], 4));
      _mm512_storeu_ps(row + 16, two ? _mm512_i32gather_ps(at, c[1], 4) : _mm512_setzero_ps());
    }
  }
}

// p . v of a call's first query block (n <= 16), each 32 dims over the key blocks in order, as output_tiles does;
// the B tiles of a key block are built just before they are used, into a 2 x 2 KB ring that stays in L1 (the
// whole of build_values' panel is 52 KB at 400 keys and D = 64: written to L2 and read back, 1/3 of an n = 1
// call). Rows are interleaved by VPUNPCKL/HWD (in-lane: tile 0 holds dims {0-3, 8-11, 16-19, 24-27} of the 32,
// tile 1 the others), put back in order on the way out. Each C element sees the same p row, the same pairs of
// V and the same key blocks in the same order as output_tiles', so the same bits.
template <int D>
inline void few_output(const uint16_t* p, int64_t p_stride, const char* v, int64_t pos_bytes, int64_t Tmax,
                       int64_t blocks, int n, float* const* o, const float* inv) {
  alignas(64) uint16_t ring[2][2][512];
  alignas(64) float c[2][256];
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int d0 = 0; d0 < D; d0 += 32) {
    auto build = [&](int64_t b) {
      uint16_t(&t)[2][512] = ring[b & 1];
      for (int r = 0; r < 16; ++r) {
        const int64_t at = kKeyBlock * b + 2 * r;
        const char* v0 = v + at * pos_bytes + 2 * d0;
        const __m512i x = at < Tmax ? _mm512_loadu_si512(v0) : _mm512_setzero_si512();
        const __m512i y = at + 1 < Tmax ? _mm512_loadu_si512(v0 + pos_bytes) : _mm512_setzero_si512();
        _mm512_store_si512(t[0] + 32 * r, _mm512_unpacklo_epi16(x, y));
        _mm512_store_si512(t[1] + 32 * r, _mm512_unpackhi_epi16(x, y));
      }
    };
    _tile_zero(0);
    _tile_zero(1);
    build(0);
    for (int64_t b = 0; b < blocks; ++b) {
      _tile_loadd(4, p + b * kKeyBlock, p_stride * 2);
      _tile_loadd(6, ring[b & 1][0], 64);
      _tile_loadd(7, ring[b & 1][1], 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (b + 1 < blocks) build(b + 1);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    for (int i = 0; i < n; ++i) {
      const __m512 s = _mm512_set1_ps(inv[i]), x = _mm512_load_ps(c[0] + 16 * i), y = _mm512_load_ps(c[1] + 16 * i);
      _mm512_storeu_ps(o[i] + d0, _mm512_mul_ps(_mm512_permutex2var_ps(x, lo, y), s));
      _mm512_storeu_ps(o[i] + d0 + 16, _mm512_mul_ps(_mm512_permutex2var_ps(x, hi, y), s));
    }
  }
}

// Attention for many queries of one KV head on tiles (kernels.h AttendManyFn; the section's header says how).
template <int D>
void attend_many_amx(const float* const* q, const int64_t* lens, float* const* o, int n, const char* k,
                     const char* v, int64_t pos_bytes, float scale, float*) {
  constexpr int S = D / 32, J = D / 16;
  int64_t Tmax = 0;
  for (int i = 0; i < n; ++i) Tmax = std::max(Tmax, lens[i]);
  const int64_t Tpad = (Tmax + kKeyBlock - 1) / kKeyBlock * kKeyBlock, blocks = Tpad / kKeyBlock;
  const int NQ = (n + 15) / 16;
  // A group of many queries' scores: at most kScoreFloats, and at least 2 query blocks (a pair of C tiles).
  const int group_blocks = int(std::max<int64_t>(2, kScoreFloats / (16 * Tpad) / 2 * 2));
  thread_local AlignedBuffer qbuf, sbuf, vbuf, kbuf, mbuf, tbuf;
  uint16_t* qp = qbuf.get<uint16_t>(size_t(NQ) * 16 * D);     // (NQ x 16, D) queries in bfloat16, zeros past n
  float* scores = sbuf.get<float>(size_t(std::min(NQ, group_blocks)) * 16 * Tpad);  // a group's (x 16, Tpad); later p
  int64_t* block_len = mbuf.get<int64_t>(size_t(NQ) + n);      // keys a query block needs, then 1 / sum e as float
  float* inv = reinterpret_cast<float*>(block_len + NQ);
  for (int i = 0; i < NQ * 16; ++i)
    for (int c = 0; c < S; ++c) {
      const __m512i row = i < n ? reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q[i] + 32 * c + 16),
                                                                               _mm512_loadu_ps(q[i] + 32 * c)))
                                : _mm512_setzero_si512();
      _mm512_store_si512(qp + i * D + 32 * c, row);
    }
  for (int b = 0; b < NQ; ++b) {
    block_len[b] = 0;
    for (int i = 16 * b; i < std::min(n, 16 * b + 16); ++i) block_len[b] = std::max(block_len[b], lens[i]);
  }
  configure_tiles();
  if (n <= kFewQueries) {  // the queries as B tiles, columns j < n; then scores with K as A
    alignas(64) uint16_t kpanel[S * 512];
    std::memset(kpanel, 0, S * 1024);
    uint32_t* qb = reinterpret_cast<uint32_t*>(kpanel);
    for (int j = 0; j < n; ++j)
      for (int s = 0; s < S; ++s) {
        alignas(64) uint32_t pairs[16];
        _mm512_store_si512(pairs, _mm512_load_si512(qp + j * D + 32 * s));
        for (int i = 0; i < 16; ++i) qb[s * 256 + 16 * i + j] = pairs[i];
      }
    swapped_scores<D>(kpanel, n, k, pos_bytes, Tmax, scores, Tpad);
    for (int i = 0; i < n; ++i) inv[i] = softmax_to_p(scores + i * Tpad, lens[i], Tpad, scale, nullptr);
    few_output<D>(reinterpret_cast<const uint16_t*>(scores), 2 * Tpad, v, pos_bytes, Tmax, blocks, n, o, inv);
    _tile_release();
    return;
  }
  // Many queries: every key block's B tiles (K transposed, V interleaved) built once per call, then the queries
  // in groups whose scores stay within kScoreFloats (L2), each group's tiles reading the panels. A prompt chunk's
  // queries of one KV head come as one call (decode.cpp; AttendKernel::bounds_scores), so each panel is built
  // once per chunk and KV head rather than once per ~1 MB of scores (3 times per 128-row chunk at 2,945 keys).
  uint16_t* kall = kbuf.get<uint16_t>(size_t(blocks) * 2 * S * 512);
  uint16_t* vpanel = vbuf.get<uint16_t>(size_t(blocks) * J * 512);
  for (int64_t kb = 0; kb < blocks; ++kb) build_keys<D>(k, pos_bytes, Tmax, kb, kall + kb * 2 * S * 512);
  build_values<D>(v, pos_bytes, Tmax, blocks, vpanel);
  float* running_max = tbuf.get<float>(size_t(group_blocks) * 16 * 16);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int g0 = 0; g0 < NQ; g0 += group_blocks) {
    // The group's blocks counted from 0: its queries i0 .. i0 + ng - 1 are rows 0 .. ng - 1 of
    // scores, gq, glen (by block), o + i0 and inv + i0.
    const int nb = std::min(NQ, g0 + group_blocks) - g0, i0 = 16 * g0, ng = std::min(n, 16 * (g0 + nb)) - i0;
    const uint16_t* gq = qp + int64_t(i0) * D;
    const int64_t* glen = block_len + g0;
    for (int i = 0; i < ng; ++i) _mm512_store_ps(running_max + 16 * i, _mm512_set1_ps(-INFINITY));
    // Scores per key block, for the query blocks seeing it; each query's running max taken from the block's
    // rows just stored (in L1) rather than in a later pass over its whole row (from L2: 1 MB of scores at 88
    // queries x 2,945 keys).
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int64_t t0 = kKeyBlock * kb;
      const uint16_t* kpanel_b = kall + kb * 2 * S * 512;
      for (int b = 0; b < nb; b += 2) {
        const bool first = glen[b] > t0, second = b + 1 < nb && glen[b + 1] > t0;
        if (first && second) {
          score_tiles<2>(gq, D, kpanel_b, S, scores, Tpad, b, t0);
        } else if (first || second) {
          score_tiles<1>(gq, D, kpanel_b, S, scores, Tpad, first ? b : b + 1, t0);
        }
        for (int i = 16 * b; i < std::min(ng, 16 * b + 32); ++i)
          for (int64_t t = t0; t < std::min(lens[i0 + i], t0 + kKeyBlock); t += 16)
            _mm512_store_ps(running_max + 16 * i,
                            max_step(_mm512_load_ps(running_max + 16 * i), scores + i * Tpad, t, lens[i0 + i], sc));
      }
    }
    for (int i = 0; i < ng; ++i)
      inv[i0 + i] = softmax_to_p(scores + i * Tpad, lens[i0 + i], Tpad, scale, running_max + 16 * i);
    const uint16_t* p = reinterpret_cast<const uint16_t*>(scores);
    for (int b = 0; b < nb; b += 2) {
      const bool two = b + 1 < nb;
      const int64_t need = (std::max(glen[b], two ? glen[b + 1] : 0) + kKeyBlock - 1) / kKeyBlock;
      for (int j = 0; j < J; j += 2) {
        if (two) {
          output_tiles<2>(p, 2 * Tpad, vpanel, J, b, j, need, ng, o + i0, inv + i0);
        } else {
          output_tiles<1>(p, 2 * Tpad, vpanel, J, b, j, need, ng, o + i0, inv + i0);
        }
      }
    }
  }
  _tile_release();
}

// A block of nb <= 16 consecutive positions of one cache row (kernels.h AttendFn), as attend_many_amx's queries.
template <int D>
void attend_block_amx(const float* q, int64_t q_stride, int nb, const char* k, const char* v, int64_t pos_bytes,
                      int64_t T0, float scale, float* scores, float* o, int64_t o_stride) {
  const float* qs[16];
  float* os[16];
  int64_t lens[16];
  for (int i = 0; i < nb; ++i) qs[i] = q + i * q_stride, os[i] = o + i * o_stride, lens[i] = T0 + i;
  attend_many_amx<D>(qs, lens, os, nb, k, v, pos_bytes, scale, scores);
}

AttendKernel attend_kernel_amx(int64_t D, bool bf16) {
  if (!bf16) return {nullptr, 1};  // float32 caches: avx512's kernels (dispatch.cpp)
  switch (D) {
    case 32: return {.fn = attend_block_amx<32>, .rows = 16, .many = attend_many_amx<32>, .bf16_products = true, .bounds_scores = true};
    case 64: return {.fn = attend_block_amx<64>, .rows = 16, .many = attend_many_amx<64>, .bf16_products = true, .bounds_scores = true};
    case 96: return {.fn = attend_block_amx<96>, .rows = 16, .many = attend_many_amx<96>, .bf16_products = true, .bounds_scores = true};
    case 128: return {.fn = attend_block_amx<128>, .rows = 16, .many = attend_many_amx<128>, .bf16_products = true, .bounds_scores = true};
    default: return {nullptr, 1};
  }
}


// ---- The int8 prefill GEMM on tiles (gemm_q8.cpp: the algorithm, its numerics and the scalar reference) -------
//
// TDPBSSD: a 16 x 32 int8 tile times a 32 x 16 one into 16 x 16 int32 sums, one 32-k block's exact integer sums
// for 16 x rows x 16 weight rows per instruction (256 outputs x 32 k, where VPDPBUSD does 16 x 4). Operands:
//   A  16 x rows as stored in QuantizedRows::xq (row stride kp, zeros past K), so x is never repacked;
//   B  16 weight rows of the panel (kernels.h's layout is TDPBSSD's B layout: step s's 4 k of row j at 4j;
//      8 rows of 64 bytes at a stride of 128), packed with the signed weight u - 128, so no -128 * sum(x_q)
//      correction is needed (the VNNI panel's) and the tile's sums are d_b itself;
//   C  y's 16 x rows x 16 outputs, d_b for one block: stored and, row by row, acc = fma(float(d_b), x_s, acc),
//      the scalar panel's operations in its order; y = acc * scale at the end.
// 32 k per step (not the 64 a tile row holds): one block per product, because each block has its own x_s. A
// TDPBSSD takes as long at 32 k as at 64 (~4.4 ns measured here), so this runs at half the unit's rate; the C
// store and the float epilogue (16 loads, converts and FMAs per block) bound it anyway: on a 2-core Sapphire
// Rapids VM one 16 x 16 x 32 step took ~19 ns in a loop over L1 data (products alone 8.3, epilogue alone 11.2:
// they share the load and store ports and barely overlap), where the VNNI panel's 128 VPDPBUSD for the same
// work take ~33. With the panel's other costs (the pack, y's stores, x from L2) the whole GEMM gained
// 1.06-1.22x over the VNNI panel at K = 1536, 4096 and 11008 and 16-512 rows (2 threads), but only 0.88-1.00x
// at K = 576 below 512 rows (1.09-1.12x at 512): gemm_q8.cpp runs it from 16 rows and K = 1024 up.
// Bits: every output is the scalar panel's (tested); rows past M (a last block of fewer than 16 rows runs with
// a tile configuration of that many rows) and outputs past N are neither read nor stored.

constexpr int kQ8Tile = 16;  // x rows per C tile, and weight rows per half panel

// Tiles 0, 1: C; 2, 3: A (x rows: `rows` x 32 bytes); 4, 5: B (weights: 8 x 64 bytes); block b in C, A, B b % 2,
// so the loads of one block do not wait for the previous block's product.
void configure_q8_tiles(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 2; ++t) {
    cfg.colsb[t] = 64, cfg.rows[t] = uint8_t(rows);
    cfg.colsb[2 + t] = 32, cfg.rows[2 + t] = uint8_t(rows);
    cfg.colsb[4 + t] = 64, cfg.rows[4 + t] = 8;
  }
  _tile_loadconfig(&cfg);
}

// Blocks whose products are stored before their sums are converted, one chunk ahead (2 and 8: no better at
// 128 x 960 x 576, one thread).
constexpr int kQ8Chunk = 4;

// acc[i] = fma(float(d[i]), x_s of row i, acc[i]) for the 16 rows of one stored C tile.
inline void q8_accumulate(__m512 (&acc)[kQ8Tile], const int32_t* d, const float* xs) {
  #pragma GCC unroll 16
  for (int i = 0; i < kQ8Tile; ++i)
    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(d + 16 * i)), _mm512_set1_ps(xs[i]), acc[i]);
}

// Blocks b0 .. b1 - 1 (at most kQ8Chunk) into d: products and C stores only.
inline void q8_products(const int8_t* xa, int64_t kp, const uint8_t* w, int64_t b0, int64_t b1, int32_t (*d)[256]) {
  for (int64_t b = b0; b < b1; ++b) {
    if (b % 2 == 0) {
      for (int r = 0; r < kQ8Tile; ++r) _mm_prefetch(reinterpret_cast<const char*>(xa + r * kp + 32 * b + 256), _MM_HINT_T0);
      _tile_loadd(2, xa + 32 * b, kp);
      _tile_loadd(4, w + b * 8 * 128, 128);
      _tile_zero(0);
      _tile_dpbssd(0, 2, 4);
      _tile_stored(0, d[b - b0], 64);
    } else {
      _tile_loadd(3, xa + 32 * b, kp);
      _tile_loadd(5, w + b * 8 * 128, 128);
      _tile_zero(1);
      _tile_dpbssd(1, 3, 5);
      _tile_stored(1, d[b - b0], 64);
    }
  }
}

// x rows m0 .. m0 + rows - 1 (rows <= 16, tiles configured for that many) against one half panel (16 weight
// rows of w, scales at sc), n_valid of them below N, into y.
void q8_tile_amx(const uint8_t* w, const float* sc, const QuantizedRows& x, const float* xs, int64_t m0,
                 int64_t rows, int64_t n0, int64_t n_valid, float* y, int64_t y_stride) {
  const int64_t B = x.B, kp = x.kp;
  const int8_t* xa = x.xq + m0 * kp;
  alignas(64) int32_t d[2][kQ8Chunk][256];
  __m512 acc[kQ8Tile];
  for (int i = 0; i < kQ8Tile; ++i) acc[i] = _mm512_setzero_ps();
  q8_products(xa, kp, w, 0, std::min<int64_t>(B, kQ8Chunk), d[0]);
  for (int64_t c = 0; c < B; c += kQ8Chunk) {
    const int64_t next = c + kQ8Chunk;
    if (next < B) q8_products(xa, kp, w, next, std::min<int64_t>(B, next + kQ8Chunk), d[(c / kQ8Chunk + 1) % 2]);
    for (int64_t b = c; b < std::min<int64_t>(B, next); ++b) q8_accumulate(acc, d[(c / kQ8Chunk) % 2][b - c], xs + 16 * b);
  }
  const __m512 s = _mm512_loadu_ps(sc);
  const __mmask16 cols = tail16(n_valid);
  for (int64_t i = 0; i < rows; ++i)
    _mm512_mask_storeu_ps(y + (m0 + i) * y_stride + n0, cols, _mm512_mul_ps(acc[i], s));
}

void gemm_q8_panel_amx(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                       uint8_t* panel) {
  float* scales = reinterpret_cast<float*>(panel + q8_panel_scales_offset(x.B));
  pack_q8_panel(a, n0, panel, scales, 0x80);
  const int64_t M = a.m, n_valid = std::min<int64_t>(kQ8Panel, a.n - n0);
  thread_local PadBuffer xs_buffer;  // x_s of 16 rows, block-major: (B, 16), zeros past M
  float* xs = reinterpret_cast<float*>(xs_buffer.get(size_t(x.B) * kQ8Tile * 2));
  int configured = 0;
  for (int64_t m = 0; m < M; m += kQ8Tile) {
    const int64_t rows = std::min<int64_t>(kQ8Tile, M - m);
    if (rows != configured) configure_q8_tiles(int(rows)), configured = int(rows);
    for (int64_t b = 0; b < x.B; b += 16) {  // 16 rows x 16 blocks, transposed in registers
      const __mmask16 blocks = tail16(x.B - b);
      __m512i r[16];
      for (int i = 0; i < kQ8Tile; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_epi32(blocks, x.xs + (m + i) * x.B + b) : _mm512_setzero_si512();
      transpose16(r);
      for (int j = 0; j < 16 && b + j < x.B; ++j) _mm512_storeu_si512(xs + (b + j) * kQ8Tile, r[j]);
    }
    for (int h = 0; h * kQ8Tile < n_valid; ++h)
      q8_tile_amx(panel + h * 64, scales + h * kQ8Tile, x, xs, m, rows, n0 + h * kQ8Tile, n_valid - h * kQ8Tile, y,
                  y_stride);
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
    t.gemv_bf16_prepare_rows = 16;
    t.gemv_bf16_writes_y = true;
    // A tiny-next layer's four GEMMs (K = 512 / 1,376, 2 threads, Sapphire Rapids) took 6.0 us per row at 123
    // rows, 5.2 at 256, 4.4 at 384 and 512, 4.3-4.4 at 640-768 (medians of 30 calls): each call reads the
    // weights once and the x tiles stay in L2 up to ~700 rows at K = 1,376 (2 bytes x 512 x 1,376 = 1.4 MB).
    t.gemv_bf16_prompt_rows = 512;
    t.attend_kernel = attend_kernel_amx;
    t.gemm_q8_tiles = gemm_q8_panel_amx, t.gemm_q8_tiles_min_rows = kQ8Tile, t.gemm_q8_tiles_min_k = 1024;
    return t;
  }();
  return &table;
}

}  // namespace llava_fast
