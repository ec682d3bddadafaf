// The AVX-512 table's own part (kernels.h): AVX-512 F/BW/VL/DQ + FMA + F16C, every CPU since Skylake-SP.
// Compiled with exactly those flags (CMakeLists.txt). It holds the float32 GEMV, the activation quantization,
// the decode glue (RMSNorm, RoPE, K/V stores, SwiGLU) and attention; dispatch.cpp adds the int8/int4/bfloat16
// kernels of avx512_vnni.cpp (AVX512_VNNI + AVX512_BF16) or, on CPUs without those, of the AVX2 table.
// The scalar references of every kernel here sit beside their algorithms (gemv.cpp, decode.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "avx512_common.h"
#include "kernels.h"
#include "reference.h"

namespace llava_fast {
namespace {

// ------------------------------------------------------------------------------------------------------
// float32 GEMV. One weight row at a time at M = 1, reused by all M activation rows from L1 above it (a row is
// <= 6 KB here), so W is read from memory once per call whatever M is. Rows are contiguous, so a thread's rows
// are one sequential stream; the first version took 4 rows at a time, i.e. 4 interleaved streams of K * 4
// bytes (36 cache lines at K = 576), too short for the hardware prefetcher to ramp up on each: 11-13 GB/s where
// the machine reads ~20 GB/s. Each kernel also prefetches ahead of where it reads (into the next rows).
// ------------------------------------------------------------------------------------------------------

// Which lines of the next weight block a tile prefetches: the block (NT rows, contiguous) is split over the M / 4
// tiles that compute on the current one, `per_step` lines per k step, so its reads overlap the whole block's
// compute. (Issuing the whole next block during the first tile stalled on the core's outstanding misses: those
// prefetches were the hottest instructions, and a 16-row tiny step took 16 ms.)
struct NextBlock {
  const char* base;  // the next block's first byte; null: nothing to prefetch (M = 1 prefetches in its stream)
  int64_t first, end;  // lines [first, end) of it are this tile's
  int per_step;
};

// float32: a tile of NT weight rows x MT activation rows, one accumulator per (row, activation) pair, k in
// order 16 at a time (masked tail), each sum reduced by reduce4's tree. The order of every sum is therefore
// the same whatever the tile, M or thread count: a request's logits do not depend on what else is in the batch
// (the server's rows equal generate() alone, bit for bit). At M = 1 one chain per row still outruns memory
// (one FMA per 64 bytes, 4 cycles' latency: ~48 GB/s per core at 3 GHz); above it a 4 x 6 tile does 24 FMAs
// per 10 loads in 24 + 4 + 1 of the 32 vector registers. History (2 threads, weights from memory): one dot
// product per pair (1 FMA per 2 loads, a reduction per 32 FMAs) -> a 4 x 4 tile took tiny's lm_head 32064 x
// 512 at M = 16 from 51 to 100 GFLOP/s; 4 x 4 -> 4 x 6 with the full k steps unmasked took the prefill shapes
// at M = 55-64 (tiny's 1024/512/2752 x 512, 512 x 1376; SmolLM2's 960/576/3072 x 576, 576 x 1536) from
// 142-157 to 164-192 GFLOP/s (geometric means, interleaved rounds; 6 x 4, 5 x 5 and 8 x 3 measured 147-181).
constexpr int kTileRows = 4, kTileCols = 6;  // NT, and MT of the full tiles

// One k step of a tile: 16 k of every (row, activation) pair. mk is a constant 0xffff except in the tail, so
// the full steps load without masks.
template <int NT, int MT>
inline void tile_step_f32(const float* w, const float* x, int64_t K, int64_t k, __mmask16 mk, __m512* acc) {
  __m512 wv[NT];
  #pragma GCC unroll 8
  for (int r = 0; r < NT; ++r) wv[r] = _mm512_maskz_loadu_ps(mk, w + r * K + k);
  #pragma GCC unroll 8
  for (int c = 0; c < MT; ++c) {
    const __m512 xv = _mm512_maskz_loadu_ps(mk, x + c * K + k);
    #pragma GCC unroll 8
    for (int r = 0; r < NT; ++r) acc[r * MT + c] = _mm512_fmadd_ps(wv[r], xv, acc[r * MT + c]);
  }
}

template <int NT, int MT>
void tile_f32(const GemvRows& p, int64_t n, int64_t m, const NextBlock& next) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  const float* w = static_cast<const float*>(a.w) + n * K;
  const float* x = p.xf + m * K;
  __m512 acc[NT * MT];
  #pragma GCC unroll 32
  for (int i = 0; i < NT * MT; ++i) acc[i] = _mm512_setzero_ps();
  int64_t line = next.first;
  auto prefetch = [&] {
    for (int i = 0; i < next.per_step && line < next.end; ++i, ++line) _mm_prefetch(next.base + line * 64, _MM_HINT_T0);
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next.base) {
      prefetch();
    } else if (MT == 1 && NT == 1) {
      prefetch_l2(w + k);  // M = 1: kPrefetchL2 bytes ahead in the row stream
    }
    tile_step_f32<NT, MT>(w, x, K, k, __mmask16(0xffff), acc);
  }
  if (k < K) {
    if (next.base) prefetch();
    tile_step_f32<NT, MT>(w, x, K, k, tail16(K - k), acc);
  }
  #pragma GCC unroll 8  // constant indices keep acc in registers (else GCC spills them all every step)
  for (int i = 0; i < NT * MT; i += 4) {  // 4 sums per shuffle tree; a short group repeats its last vector
    const int last = NT * MT - 1;
    alignas(16) float out[4];
    _mm_store_ps(out, reduce4(acc[i], acc[std::min(i + 1, last)], acc[std::min(i + 2, last)], acc[std::min(i + 3, last)]));
    for (int j = 0; j < 4 && i + j <= last; ++j) gemv_store(p, m + (i + j) % MT, n + (i + j) / MT, out[j]);
  }
}

// All M activation rows x weight rows n .. n + NT, in tiles of MT = kTileCols rows (and MT - 1: see below).
template <int NT>
void tiles_f32(const GemvRows& p, int64_t n, int64_t n1) {
  constexpr int MB = kTileCols;
  const int64_t M = p.a->m, K = p.a->k;
  // M = q * MB + r: (MB - r) tiles of MB - 1 rows and the rest of MB (55 = 5 x 5 + 5 x 6), not a tile of r
  // rows (a 4 x 1 tile does 4 FMAs per 5 loads).
  int64_t smaller = (MB - M % MB) % MB;
  if (smaller * (MB - 1) > M) smaller = 0;
  const int64_t tiles = smaller + (M - smaller * (MB - 1) + MB - 1) / MB, steps = (K + 15) / 16;
  const int64_t next_rows = std::min<int64_t>(NT, n1 - n - NT);  // the block after this one, in this range
  NextBlock next{nullptr, 0, 0, 0};
  if (M > 1 && next_rows > 0) {
    next.base = reinterpret_cast<const char*>(static_cast<const float*>(p.a->w) + (n + NT) * K);
    next.end = (next_rows * K * 4 + 63) / 64;
    next.per_step = int((next.end + tiles * steps - 1) / (tiles * steps));
  }
  auto advance = [&](int64_t t) {
    NextBlock b = next;
    b.first = std::min(next.end, t * steps * next.per_step);
    return b;
  };
  int64_t m = 0, t = 0;
  for (; t < smaller; ++t, m += MB - 1) tile_f32<NT, MB - 1>(p, n, m, advance(t));
  for (; m + MB <= M; m += MB, ++t) tile_f32<NT, MB>(p, n, m, advance(t));
  static_assert(MB == 6, "the tail's cases below");
  switch (M - m) {
    case 5: tile_f32<NT, 5>(p, n, m, advance(t)); break;
    case 4: tile_f32<NT, 4>(p, n, m, advance(t)); break;
    case 3: tile_f32<NT, 3>(p, n, m, advance(t)); break;
    case 2: tile_f32<NT, 2>(p, n, m, advance(t)); break;
    case 1: tile_f32<NT, 1>(p, n, m, advance(t)); break;
  }
}

// ------------------------------------------------------------------------------------------------------
// float32 prompt GEMM: the tiles' sums as outer products. A tile's output is, per lane l of 16, an FMA chain over
// k = l, l + 16, ... from zero (masked k past K add 0 x 0), then reduce4's tree over the 16 lanes:
//   c_q = (L[4q] + L[4q+2]) + (L[4q+1] + L[4q+3]),  y = (c_0 + c_2) + (c_1 + c_3).
// Those chains are independent, so they can run with the vector across 16 outputs instead of across the lanes:
// x and W repacked lane-major (lane l's k in order, zeros past K), one FMA per (weight vector of 16 outputs,
// broadcast x value), the 16 chains of a tile kept apart and added in the tree's order at the end. Every sum is
// then the tile's, operation for operation, so a row's bits are the GEMV's (at any M, thread count or split; the
// kernel driver compares them). Why: the tiles' dot products load both operands per FMA (24 FMAs per 10
// loads, 4 x 6 tile) and sweep every x row past each 4-row weight block, so above ~128 rows x leaves L2 and they
// slow down (512 rows: 85-200 GFLOP/s), which kept a long prompt in 128-row chunks that each re-read every weight
// from memory (tiny-next, 2,945 positions: 24 x 70 MB). Here a 12 x 32 tile does 24 FMAs per 2 vector loads and 12
// broadcasts, W's panel (32 rows x K) is packed once per call and stays in L2 while every x row passes, and x's
// lane-major copy is built once per call: 175-240 GFLOP/s at 512 rows, flat in M. It stays below MKL's sgemm
// (0.64-0.95x at 256-512 rows, a loaded host) by what the contract costs: 16 chains per output, each K / 16 long,
// added at the end (at K = 512 that is 72 extra loads/stores/adds per 768 FMAs), and the packing.
// ------------------------------------------------------------------------------------------------------
constexpr int kPanelCols = 32;      // weight rows per panel: 2 vectors of outputs
constexpr int kPanelRows = 12;      // x rows per tile: 24 accumulators + 2 weight vectors + 1 broadcast
// From 96 rows (a prompt's chunks, decode.cpp): below, the tiles are as fast or faster (hot weights, 2 threads,
// new / tiles at tiny-next's and SmolLM2's shapes, medians of 3 interleaved rounds: M = 32 0.77-0.83, 64
// 0.90-0.98, 96 0.89-0.97, 256 0.80-1.21, 512 0.95-2.29), and a server's decode batches and prefill slices stay
// on them. In the model the tiles' weights come from memory, not cache, and the GEMM wins from fewer rows:
// SmolLM2-135M float32 native prefill of the 127-token bench prompt, avx512_core table, Sapphire Rapids 2 cores,
// load ~1.1-1.5, 3 alternating processes, from 128 / 96 rows: 667-729 / 775-936 tok/s back to back, 628-665 /
// 682-765 after a 0.5 s idle gap. From 96, so server decode batches (<= 64 rows) keep the tiles.
constexpr int64_t kGemmMinRows = 96;

// The 16 x 16 transpose of v (row r -> column r), by unpacks and 128-bit shuffles.
inline void transpose16(__m512 (&v)[16]) {
  __m512 t[16];
  #pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  __m512 r[16];  // r[4i + q], 128-bit chunk c: column 4c + q of rows 4i .. 4i + 3
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  #pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0x44), u1 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0xee);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0x44), u3 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0xee);
    v[q] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    v[4 + q] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
    v[8 + q] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    v[12 + q] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
  }
}

// `rows` (<= 16) rows of a (., K) matrix, row r at src + r * stride, lane-major: dst[(l * J + j) * ld + r] =
// src_r[16 j + l] (0 past K), J = ceil(K / 16); `width` (>= rows) values stored per (l, j), zeros past rows.
void pack_lanes(const float* src, int64_t stride, int rows, int64_t K, float* dst, int64_t ld, int width) {
  const int64_t J = (K + 15) / 16;
  const __mmask16 keep = tail16(width);
  for (int64_t j = 0; j < J; ++j) {
    const __mmask16 mk = tail16(K - 16 * j);
    __m512 v[16];
    #pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) v[r] = r < rows ? _mm512_maskz_loadu_ps(mk, src + r * stride + 16 * j) : _mm512_setzero_ps();
    transpose16(v);
    #pragma GCC unroll 16
    for (int l = 0; l < 16; ++l) _mm512_mask_storeu_ps(dst + (l * J + j) * ld, keep, v[l]);
  }
}

// The x rows split into ceil(M / 12) tiles as even as can be (123 rows: 9 x 11 + 2 x 12, not 10 x 12 + 3: a 3-row
// tile's 6 accumulator chains leave the FMA units waiting on their 4-cycle latency). Tile t: rows
// tile_start(t) .. tile_start(t + 1) - 1.
inline int64_t tile_count(int64_t M) { return (M + kPanelRows - 1) / kPanelRows; }
inline int64_t tile_start(int64_t M, int64_t t) { return M * t / tile_count(M); }

// x's layout: tile t at tile_start(t) * 16J floats, lane-major with ld = its rows.
size_t gemm_f32_layout_bytes(const GemvRows& p) {
  return p.a->m < kGemmMinRows ? 0 : size_t(p.a->m) * size_t((p.a->k + 15) / 16 * 16) * sizeof(float);
}

void gemm_f32_prepare(const GemvRows& p, void* scratch) {
  const int64_t M = p.a->m, K = p.a->k, Kp = (K + 15) / 16 * 16;
  for (int64_t t = 0; t < tile_count(M); ++t) {
    const int64_t m = tile_start(M, t);
    const int rows = int(tile_start(M, t + 1) - m);
    pack_lanes(p.xf + m * K, K, rows, K, static_cast<float*>(scratch) + m * Kp, rows, rows);
  }
}

// One tile: MR x rows (xp: lane-major, ld MR) times a panel (wp: lane-major, ld 32) into y rows (row stride ys),
// `cols` (<= 32) of the panel's outputs stored. buf: 4 x 2MR vectors of partial sums.
// next, lines: where this tile prefetches into L2 (the next panel's weight rows), `lines` 64-byte lines per lane.
template <int MR>
void gemm_f32_tile(const float* xp, const float* wp, int64_t J, float* y, int64_t ys, int cols, __m512* buf,
                   const char* next, int64_t lines) {
  // The lanes in the order the tree adds them: each quad (4q, 4q + 2, 4q + 1, 4q + 3), quads 0, 2, 1, 3.
  static constexpr int kOrder[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512* pair02 = buf;               // L[4q] + L[4q + 2]
  __m512* lane1 = buf + 2 * MR;       // L[4q + 1]
  __m512* quads02 = buf + 4 * MR;     // c_0 (+ c_2)
  __m512* quad1 = buf + 6 * MR;       // c_1
  const __mmask16 m0 = tail16(cols), m1 = cols > 16 ? tail16(cols - 16) : __mmask16(0);
  for (int s = 0; s < 16; ++s) {
    const int l = kOrder[s];
    const float* xl = xp + l * J * MR;
    const float* wl = wp + l * J * kPanelCols;
    for (int64_t i = 0; i < lines; ++i) _mm_prefetch(next + (s * lines + i) * 64, _MM_HINT_T1);
    __m512 acc[MR][2];
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < J; ++j) {
      const __m512 w0 = _mm512_load_ps(wl + j * kPanelCols), w1 = _mm512_load_ps(wl + j * kPanelCols + 16);
      #pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 xb = _mm512_set1_ps(xl[j * MR + r]);
        acc[r][0] = _mm512_fmadd_ps(w0, xb, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w1, xb, acc[r][1]);
      }
    }
    const int q = s % 4, quad = s / 4;  // position in the quad, and which of the quads 0, 2, 1, 3
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      #pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * r + h;
        if (q == 0) { pair02[i] = acc[r][h]; continue; }
        if (q == 1) { pair02[i] = _mm512_add_ps(pair02[i], acc[r][h]); continue; }
        if (q == 2) { lane1[i] = acc[r][h]; continue; }
        const __m512 c = _mm512_add_ps(pair02[i], _mm512_add_ps(lane1[i], acc[r][h]));
        if (quad == 0) {
          quads02[i] = c;
        } else if (quad == 1) {
          quads02[i] = _mm512_add_ps(quads02[i], c);
        } else if (quad == 2) {
          quad1[i] = c;
        } else {
          _mm512_mask_storeu_ps(y + r * ys + 16 * h, h ? m1 : m0, _mm512_add_ps(quads02[i], _mm512_add_ps(quad1[i], c)));
        }
      }
  }
}

void gemm_f32(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t M = a.m, K = a.k, J = (K + 15) / 16, Kp = 16 * J;
  float* y = p.yf ? p.yf : static_cast<float*>(a.y);
  const int64_t ys = p.yf ? a.n : a.y_stride;
  float* panel = thread_panel_f32(size_t(Kp) * kPanelCols);  // this thread's, kept between calls
  alignas(64) __m512 buf[8 * kPanelRows];
  const float* xp = static_cast<const float*>(p.layout);
  const float* w = static_cast<const float*>(a.w);
  static constexpr void (*kTiles[kPanelRows + 1])(const float*, const float*, int64_t, float*, int64_t, int, __m512*,
                                                   const char*, int64_t) = {
      nullptr, gemm_f32_tile<1>, gemm_f32_tile<2>, gemm_f32_tile<3>, gemm_f32_tile<4>, gemm_f32_tile<5>,
      gemm_f32_tile<6>, gemm_f32_tile<7>, gemm_f32_tile<8>, gemm_f32_tile<9>, gemm_f32_tile<10>,
      gemm_f32_tile<11>, gemm_f32_tile<12>};
  const int64_t tiles = tile_count(M);
  for (int64_t n = n0; n < n1; n += kPanelCols) {
    const int cols = int(std::min<int64_t>(kPanelCols, n1 - n));
    pack_lanes(w + n * K, K, std::min(cols, 16), K, panel, kPanelCols, 16);
    pack_lanes(cols > 16 ? w + (n + 16) * K : w, K, std::max(cols - 16, 0), K, panel + 16, kPanelCols, 16);
    // The next panel's rows (contiguous in W) into L2 while this one computes, spread over its tiles' lanes: the
    // packing then reads L2, not memory (it was a quarter of the GEMM's time, perf, tiny-next's prefill).
    const int64_t next_rows = std::min<int64_t>(kPanelCols, n1 - n - cols);
    const int64_t next_lines = next_rows > 0 ? (next_rows * K * 4 + 63) / 64 : 0;
    const int64_t per_lane = (next_lines + tiles * 16 - 1) / (tiles * 16);
    const char* next = reinterpret_cast<const char*>(w + (n + cols) * K);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m = tile_start(M, t);
      const int64_t lines = std::max<int64_t>(0, std::min(per_lane, (next_lines - t * 16 * per_lane + 15) / 16));
      kTiles[tile_start(M, t + 1) - m](xp + m * Kp, panel, J, y + m * ys + n, ys, cols, buf,
                                       next + t * 16 * per_lane * 64, lines);
    }
  }
}

void gemv_f32(const GemvRows& p, int64_t n0, int64_t n1) {
  if (p.layout) return gemm_f32(p, n0, n1);  // a prompt's rows (gemm_f32_layout_bytes)
  int64_t n = n0;
  if (p.a->m > 1)  // one row at a time at M = 1: one sequential stream for the prefetcher (see above)
    for (; n + kTileRows <= n1; n += kTileRows) tiles_f32<kTileRows>(p, n, n1);
  for (; n < n1; ++n) tiles_f32<1>(p, n, n1);
}

// The activation quantization of one row with AVX-512: the same IEEE operations as the scalar loop (an exact
// max, one division per element, round half to even), so the same bytes; ~10x faster (9 us -> <1 us at
// K = 1536, i.e. ~0.5 ms of a SmolLM2 int4 decode step's 4 ms). xq must be zeroed past K.
inline __mmask16 mask16(int64_t left) { return left <= 0 ? __mmask16(0) : tail16(left); }

void quantize_row_avx512(const float* x, int64_t K, int8_t* xq, float* xs) {
  for (int64_t b = 0, k0 = 0; k0 < K; ++b, k0 += 32) {
    const __mmask16 m0 = mask16(K - k0), m1 = mask16(K - k0 - 16);
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + k0), v1 = _mm512_maskz_loadu_ps(m1, x + k0 + 16);
    const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.f;
    xs[b] = d;
    if (!(d > 0.f)) continue;
    const __m512 dv = _mm512_set1_ps(d);
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v0, dv), kNearest));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v1, dv), kNearest));
    _mm_mask_storeu_epi8(xq + k0, m0, _mm512_cvtsepi32_epi8(q0));
    _mm_mask_storeu_epi8(xq + k0 + 16, m1, _mm512_cvtsepi32_epi8(q1));
  }
}

// ------------------------------------------------------------------------------------------------------
// Attention inner loops: q . k_t over the head dim, and out += p * v_t.
// ------------------------------------------------------------------------------------------------------

inline __m512 load16(const void* p, bool bf16, int64_t d, __mmask16 mk) {
  if (bf16) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(p) + d));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(p) + d);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

float dot_avx512(const float* q, const void* k, bool bf16, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mk = tail_mask(D - d);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + d), load16(k, bf16, d, mk), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

void axpy_avx512(float* out, float p, const void* v, bool bf16, int64_t D) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mk = tail_mask(D - d);
    _mm512_mask_storeu_ps(out + d, mk, _mm512_fmadd_ps(pv, load16(v, bf16, d, mk), _mm512_maskz_loadu_ps(mk, out + d)));
  }
}

// out[j] = q . k_j * scale for 4 keys held in registers (head_dim 16 * ND), each sum by reduce4's tree: the same
// bits whatever else the caller computes. Only the first `left` (< 4 at a row's end) are stored: the next
// query's scores follow.
template <int ND>
inline void score4(const float* qi, const __m512 (&kv)[4][ND], float scale, float* out, int64_t left) {
  __m512 acc[4];
  #pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) acc[j] = _mm512_mul_ps(_mm512_loadu_ps(qi), kv[j][0]);
  #pragma GCC unroll 8
  for (int c = 1; c < ND; ++c) {
    const __m512 qc = _mm512_loadu_ps(qi + 16 * c);
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(qc, kv[j][c], acc[j]);
  }
  const __m128 four = _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale));
  _mm_mask_storeu_ps(out, left >= 4 ? __mmask8(0xf) : __mmask8((1u << left) - 1), four);
}

// Softmax of one query's T scores in place, unnormalized (e^(s - max)); returns 1 / their sum.
inline float softmax_row(float* si, int64_t T) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= T; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(si + t));
  float m = _mm512_reduce_max_ps(top);
  for (; t < T; ++t) m = std::max(m, si[t]);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (t = 0; t < T; t += 16) {
    const __mmask16 mk = tail_mask(T - t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, si + t), mv));
    _mm512_mask_storeu_ps(si + t, mk, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mk, e));
  }
  return 1.f / _mm512_reduce_add_ps(total);
}

// Attention of one head for nb <= QB consecutive positions T0 - 1 .. T0 + nb - 2 of one cache row (a block of
// a prompt's rows; a decode row is a block of one), head_dim = 16 * ND. Keys are read in groups of 4, each
// group's 4 dot products per query summed by one shuffle tree, and each key (and value) is loaded once for the
// whole block. Every query's arithmetic is the same whatever block it is in, so a row's result does not depend
// on how its prompt was split (a server prefix reuse) or batched. Before, one (row, head) at a time with a full
// reduction per key: attention was 19% of a 1,024-token prefill (tiny preset, perf).
template <int ND, bool BF16, int QB>
void attend_block(const float* q, int64_t q_stride, int nb, const char* k, const char* v, int64_t pos_bytes,
                         int64_t T0, float scale, float* scores, float* o, int64_t o_stride) {
  const int64_t Tmax = T0 + nb - 1;
  for (int64_t t = 0; t < Tmax; t += 4) {  // scores[i * Tmax + t] = q_i . k_t * scale
    __m512 kv[4][ND];
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const bool valid = t + j < Tmax;  // never read past the block's last key
      #pragma GCC unroll 8
      for (int c = 0; c < ND; ++c) kv[j][c] = valid ? load16(k + (t + j) * pos_bytes, BF16, 16 * c, 0xffff) : _mm512_setzero_ps();
    }
    for (int i = 0; i < nb; ++i) {
      score4<ND>(q + i * q_stride, kv, scale, scores + i * Tmax + t, Tmax - t);
    }
  }
  float inv[QB];
  for (int i = 0; i < nb; ++i) inv[i] = softmax_row(scores + i * Tmax, T0 + i);  // query i sees T0 + i keys
  __m512 acc[QB][ND];
  #pragma GCC unroll 4
  for (int i = 0; i < QB; ++i)
    #pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < Tmax; ++t) {  // out_i += p_i[t] v_t, t in order, for the queries that see key t
    __m512 vt[ND];
    #pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) vt[c] = load16(v + t * pos_bytes, BF16, 16 * c, 0xffff);
    #pragma GCC unroll 4
    for (int i = 0; i < QB; ++i) {
      if (i >= nb || t >= T0 + i) continue;
      const __m512 p = _mm512_set1_ps(scores[i * Tmax + t]);
      #pragma GCC unroll 8
      for (int c = 0; c < ND; ++c) acc[i][c] = _mm512_fmadd_ps(p, vt[c], acc[i][c]);
    }
  }
  #pragma GCC unroll 4
  for (int i = 0; i < QB; ++i) {
    if (i >= nb) continue;
    const __m512 s = _mm512_set1_ps(inv[i]);
    #pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(o + i * o_stride + 16 * c, _mm512_mul_ps(acc[i][c], s));
  }
}

// attend_block for many queries of one KV head (kernels.h AttendManyFn: a prompt chunk's rows times the query
// heads of their GQA group). attend_block's blocks of 2-4 queries each read all T keys and values again: at
// 2,945 keys (head_dim 128, bfloat16) 1.5 MB of K/V per 2 queries per head, streamed from L2/L3 at every block,
// which made attention about half of a LLaVA-NeXT prefill. Here the keys are read once per group of 4 for all
// queries (scores to `scratch`), and the values in tiles of kTileKeys, converted to float32 once per tile and
// kept in L1 while every block of QB queries accumulates over them. Per query the arithmetic is attend_block's:
// the same score sums, the same softmax, out += p v_t in key order from zero (the partial sums wait in o between
// tiles), then times 1 / total: bit for bit.
constexpr int64_t kTileKeys = 32;  // 32 keys x head_dim 128 x 4 bytes = 16 KB of float32 values in L1

template <int ND, bool BF16, int QB>
void attend_many(const float* const* q, const int64_t* lens, float* const* o, int n, const char* k, const char* v,
                 int64_t pos_bytes, float scale, float* scratch) {
  int64_t Tmax = 0;
  for (int i = 0; i < n; ++i) Tmax = std::max(Tmax, lens[i]);
  float* scores = scratch;             // (n, Tmax)
  float* inv = scratch + n * Tmax;     // (n)
  for (int64_t t = 0; t < Tmax; t += 4) {  // scores[i * Tmax + t] = q_i . k_t * scale
    __m512 kv[4][ND];
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const bool valid = t + j < Tmax;
      #pragma GCC unroll 8
      for (int c = 0; c < ND; ++c) kv[j][c] = valid ? load16(k + (t + j) * pos_bytes, BF16, 16 * c, 0xffff) : _mm512_setzero_ps();
    }
    for (int i = 0; i < n; ++i) {
      if (t >= lens[i]) continue;
      score4<ND>(q[i], kv, scale, scores + i * Tmax + t, Tmax - t);
    }
  }
  for (int i = 0; i < n; ++i) inv[i] = softmax_row(scores + i * Tmax, lens[i]);
  alignas(64) float tile[kTileKeys * 16 * ND];
  for (int64_t t0 = 0; t0 < Tmax; t0 += kTileKeys) {
    const int64_t t1 = std::min(Tmax, t0 + kTileKeys);
    for (int64_t t = t0; t < t1; ++t)
      #pragma GCC unroll 8
      for (int c = 0; c < ND; ++c) _mm512_store_ps(tile + (t - t0) * 16 * ND + 16 * c, load16(v + t * pos_bytes, BF16, 16 * c, 0xffff));
    for (int i0 = 0; i0 < n; i0 += QB) {
      const int nb = std::min(QB, n - i0);
      int64_t end = t0;  // the block's last key in this tile, + 1
      for (int i = 0; i < nb; ++i) end = std::max(end, std::min(t1, lens[i0 + i]));
      if (end == t0) continue;
      __m512 acc[QB][ND];
      #pragma GCC unroll 4
      for (int i = 0; i < QB; ++i)
        #pragma GCC unroll 8
        for (int c = 0; c < ND; ++c) acc[i][c] = t0 && i < nb ? _mm512_loadu_ps(o[i0 + i] + 16 * c) : _mm512_setzero_ps();
      for (int64_t t = t0; t < end; ++t) {
        __m512 vt[ND];
        #pragma GCC unroll 8
        for (int c = 0; c < ND; ++c) vt[c] = _mm512_load_ps(tile + (t - t0) * 16 * ND + 16 * c);
        #pragma GCC unroll 4
        for (int i = 0; i < QB; ++i) {
          if (i >= nb || t >= lens[i0 + i]) continue;
          const __m512 p = _mm512_set1_ps(scores[(i0 + i) * Tmax + t]);
          #pragma GCC unroll 8
          for (int c = 0; c < ND; ++c) acc[i][c] = _mm512_fmadd_ps(p, vt[c], acc[i][c]);
        }
      }
      #pragma GCC unroll 4
      for (int i = 0; i < QB; ++i)
        if (i < nb)
          #pragma GCC unroll 8
          for (int c = 0; c < ND; ++c) _mm512_storeu_ps(o[i0 + i] + 16 * c, acc[i][c]);
    }
  }
  for (int i = 0; i < n; ++i) {
    const __m512 s = _mm512_set1_ps(inv[i]);
    #pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(o[i] + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(o[i] + 16 * c), s));
  }
}

AttendKernel attend_kernel(int64_t D, bool bf16) {
  switch (D) {
    case 32: return {bf16 ? attend_block<2, true, 4> : attend_block<2, false, 4>, 4, bf16 ? attend_many<2, true, 4> : attend_many<2, false, 4>};
    case 64: return {bf16 ? attend_block<4, true, 4> : attend_block<4, false, 4>, 4, bf16 ? attend_many<4, true, 4> : attend_many<4, false, 4>};
    case 96: return {bf16 ? attend_block<6, true, 2> : attend_block<6, false, 2>, 2, bf16 ? attend_many<6, true, 2> : attend_many<6, false, 2>};
    case 128: return {bf16 ? attend_block<8, true, 2> : attend_block<8, false, 2>, 2, bf16 ? attend_many<8, true, 2> : attend_many<8, false, 2>};
    default: return {nullptr, 1};
  }
}

// ------------------------------------------------------------------------------------------------------
// The elementwise glue, 16 lanes at a time where the CPU has AVX-512 (same roundings as the scalar loops:
// round_bf16_16 is f32_to_bf16's integer rounding, NaN included). Per 274-token tiny prefill (2 cores) the
// scalar loops took ~10 of ~70 ms on the calling thread while the pool's workers waited: SwiGLU (std::exp) 6.4,
// the RMSNorms 2.1, RoPE and the K/V writes 0.9.
// ------------------------------------------------------------------------------------------------------

inline __m512 round_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), hi = _mm512_set1_epi32(int(0xffff0000u));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), hi);
  const __m512i quiet = _mm512_and_si512(_mm512_or_si512(u, _mm512_set1_epi32(0x400000)), hi);  // NaN stays NaN
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet));
}

inline __m512 rnd16(__m512 v, bool bf16) { return bf16 ? round_bf16_16(v) : v; }

inline void store16(void* p, int64_t i, __m512 v, bool bf16, __mmask16 mk) {  // v already rounded
  if (bf16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, mk, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, mk, v);
  }
}

// One row of add_rms_norm (below). The sum of squares in double, as the scalar loop.
void add_rms_norm_row_avx512(const float* x, float* h, const void* weight, float eps, int64_t C, float* out,
                                    bool bf16) {
  __m512d sq0 = _mm512_setzero_pd(), sq1 = sq0;
  for (int64_t i = 0; i < C; i += 16) {
    const __mmask16 mk = tail_mask(C - i);
    __m512 v = _mm512_maskz_loadu_ps(mk, h + i);
    if (x) {
      v = rnd16(_mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, x + i)), bf16);
      _mm512_mask_storeu_ps(h + i, mk, v);
    }
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    sq0 = _mm512_fmadd_pd(lo, lo, sq0), sq1 = _mm512_fmadd_pd(hi, hi, sq1);
  }
  const double sq = _mm512_reduce_add_pd(_mm512_add_pd(sq0, sq1));
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(float(sq / double(C)) + eps));
  for (int64_t i = 0; i < C; i += 16) {
    const __mmask16 mk = tail_mask(C - i);
    const __m512 normed = rnd16(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, h + i), inv), bf16);
    _mm512_mask_storeu_ps(out + i, mk, rnd16(_mm512_mul_ps(load16(weight, bf16, i, mk), normed), bf16));
  }
}

void rope_avx512(float* x, int64_t count, int64_t D, const float* cos_row, const float* sin_row, bool bf16) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 mk = tail_mask(half - i);
    const __m512 c = rnd16(_mm512_maskz_loadu_ps(mk, cos_row + i), bf16), s = rnd16(_mm512_maskz_loadu_ps(mk, sin_row + i), bf16);
    for (int64_t h = 0; h < count; ++h) {
      float* xh = x + h * D;
      const __m512 x1 = _mm512_maskz_loadu_ps(mk, xh + i), x2 = _mm512_maskz_loadu_ps(mk, xh + half + i);
      const __m512 a = rnd16(_mm512_sub_ps(rnd16(_mm512_mul_ps(x1, c), bf16), rnd16(_mm512_mul_ps(x2, s), bf16)), bf16);
      const __m512 b = rnd16(_mm512_add_ps(rnd16(_mm512_mul_ps(x2, c), bf16), rnd16(_mm512_mul_ps(x1, s), bf16)), bf16);
      _mm512_mask_storeu_ps(xh + i, mk, a);
      _mm512_mask_storeu_ps(xh + half + i, mk, b);
    }
  }
}

// n values (already rounded to the dtype) into a K/V cache position.
void store_row_avx512(void* dst, const float* src, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    store16(dst, i, _mm512_maskz_loadu_ps(mk, src + i), bf16, mk);
  }
}

// SwiGLU of one row: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + e^-g) as torch's F.silu; out may be gate.
void swiglu_row_avx512(const float* gate, const float* up, float* out, int64_t I, bool bf16) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 mk = tail_mask(I - i);
    const __m512 g = _mm512_maskz_loadu_ps(mk, gate + i);
    const __m512 silu = rnd16(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))), bf16);
    _mm512_mask_storeu_ps(out + i, mk, rnd16(_mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mk, up + i)), bf16));
  }
}

// The CLIP tower's activation in place (kernels.h quick_gelu_row): x / (1 + e^(-1.702 x)) in float32, rounded once.
void quick_gelu_row_avx512(void* x, int64_t n, bool bf16) {
  const __m512 one = _mm512_set1_ps(1.f), k = _mm512_set1_ps(-1.702f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    const __m512 v = load16(x, bf16, i, mk);
    store16(x, i, rnd16(_mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_mul_ps(k, v)))), bf16), bf16, mk);
  }
}

}  // namespace

const KernelTable* avx512_base_kernels() {
  // The optional entries after the positional ones are set by name.
  static const KernelTable table = [] {
    KernelTable t{
        "avx512", "avx512_core",
        gemv_f32, nullptr, nullptr, nullptr, nullptr, nullptr,  // bf16 / int8 / int4: avx512_vnni.cpp or AVX2
        quantize_row_avx512,
        nullptr, nullptr,
        add_rms_norm_row_avx512, rope_avx512, store_row_avx512, swiglu_row_avx512,
        dot_avx512, axpy_avx512, attend_kernel,
        nullptr, nullptr, nullptr,
        gemm_f32_layout_bytes, gemm_f32_prepare, kPanelCols};
    t.quick_gelu_row = quick_gelu_row_avx512;
    return t;
  }();
  return &table;
}

}  // namespace llava_fast
