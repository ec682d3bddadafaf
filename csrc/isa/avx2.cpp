// The AVX2 table (kernels.h): AVX2 + FMA + F16C, x86-64-v3 (Haswell and later, Zen 1 and later; every Intel
// client chip, which has no AVX-512). Compiled with exactly those flags, and a second time as avx2_vnni.cpp with
// AVX-VNNI added (Alder Lake and later, Zen 5; this file then names its table avx2_vnni).
//
// GEMV (gemv.cpp: the algorithm and the scalar reference). Every output on its own (a weight row against one x
// row), so its bits depend on K alone: the same whatever M, the thread count or the split of the rows.
//   float32   one accumulator of 8 lanes along K per output, 4 weight rows x 3 x rows per tile, then one fixed
//   bfloat16  tree (hsum8); at M = 1 the row stream is prefetched into L2 8 KB ahead (as the AVX-512 table: the
//             rows of a thread are one sequential stream). bfloat16 weights are widened by one shuffle against x
//             rounded to bfloat16, widened and reordered once per call: the products are exact, as VDPBF16PS's.
//   int8      per 32-block: the offset-binary byte u XOR 0x80 is the signed weight w; |w| (unsigned) times x_q with
//             w's sign (VPSIGNB) by VPMADDUBSW (pairs: |w| <= 128, |x_q| <= 127, 2 * 128 * 127 < 2^15: never
//             saturates) then VPMADDWD against ones, or one VPDPBUSD with AVX-VNNI: 8 exact int32 partial sums,
//             converted and scaled by the block's x_s (one FMA), two accumulators alternating by block.
//   int4      per two 32-blocks: 32 bytes, low nibbles and high nibbles against x_q reordered to match (once per
//             call), lanes 0-3 / 4-7 one block's partial sums each, scaled by fp16 scale x x_s per lane; the
//             mins' sum_g min_g * xmin_g added after the reduction, in group order.
//             M > 1: 2 weight rows x 2 x rows per tile (each output's operations unchanged).
// int4 GEMM panel and dequantization: bit for bit the scalar reference (fixed operations per output/weight).
// Attention: register-blocked for head_dim 32/64/96/128 (attend_block), blocks of up to 4 queries.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../convert.h"
#include "kernels.h"
#include "q8_panel_x86.h"
#include "reference.h"

#ifndef LLAVA_FAST_AVX2_VNNI
#define LLAVA_FAST_AVX2_VNNI 0
#endif

namespace llava_fast {
namespace {

constexpr int kPrefetchL2 = 8192;  // see avx512_common.h: measured 8 KB ahead into L2 as the best stream

inline float hsum8(__m256 v) {  // one fixed tree: (0+4, 1+5, 2+6, 3+7), then pairs, then the two halves
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i tail_mask8(int64_t left) {  // lanes < left set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(left, 8))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 exact int32 sums of 4 products u8 (unsigned, <= 128) x s8 each: VPDPBUSD with AVX-VNNI, else VPMADDUBSW (no
// saturation for the operands used here, see the top) + VPMADDWD.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if LLAVA_FAST_AVX2_VNNI
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// ---- float32 ---------------------------------------------------------------------------------------------

// Weight rows n .. n + R - 1 against x rows m0 .. m0 + MT - 1: one accumulator of 8 lanes along K per output, then
// hsum8. 4 x 3 outputs fill 12 of the 16 ymm registers (3 x vectors, 1 weight vector), so each x load serves 4
// weight rows and each weight load 3 x rows: 12 FMAs per 7 loads. Before, one weight row x 4 x rows with 2
// accumulators each (8 FMAs per 10 loads, all of x re-read from L2 for every weight row): SmolLM2-135M's float32
// prefill ran at 0.75x llama.cpp's F32 (avx2 forced, Sapphire Rapids). At M = 1 the 4 rows are 4 independent
// FMA chains, and each row's stream is prefetched into L2 8 KB ahead.
template <int R, int MT>
void tile_f32(const GemvRows& p, int64_t n, int64_t m0) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  const float* w = static_cast<const float*>(a.w) + n * K;
  const float* x = p.xf + m0 * K;
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (a.m == 1 && (k & 15) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetchL2, _MM_HINT_T1);
    __m256 xv[MT];
    #pragma GCC unroll 4
    for (int j = 0; j < MT; ++j) xv[j] = _mm256_loadu_ps(x + j * K + k);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
      #pragma GCC unroll 4
      for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
    }
  }
  if (k < K) {  // the tail as one more step with zeros past K (adding +0 changes no sum)
    const __m256i mk = tail_mask8(K - k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_maskload_ps(w + r * K + k, mk);
      for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + j * K + k, mk), acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MT; ++j) gemv_store(p, m0 + j, n + r, hsum8(acc[r][j]));
}

template <int R>
void tiles_f32(const GemvRows& p, int64_t n) {
  const int64_t M = p.a->m;
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) tile_f32<R, 3>(p, n, m);
  switch (M - m) {
    case 2: tile_f32<R, 2>(p, n, m); break;
    case 1: tile_f32<R, 1>(p, n, m); break;
  }
}

// ---- float32 prompt GEMM: the tile's sums as outer products --------------------------------------------------
// tile_f32's output is, per lane l of 8, an FMA chain over k = l, l + 8, ... from zero (masked k past K add 0 x 0),
// then hsum8's tree: y = ((L0 + L4) + (L2 + L6)) + ((L1 + L5) + (L3 + L7)). As the AVX-512 table's prompt GEMM
// (avx512.cpp), the chains run with the vector across 8 outputs instead: x and W repacked lane-major (lane l's k in
// order, zeros past K), one FMA per (weight vector of 8 outputs, broadcast x value), the 8 chains of a tile kept
// apart and added in the tree's order at the end, so every output is the tile's operation for operation (the kernel
// driver compares rows against M = 1, splits and thread counts). A 6 x 16 tile: 12 accumulators, 2 weight vectors,
// 1 broadcast (15 of 16 ymm registers); W's panel (16 rows x K) is packed once per call and stays in L1/L2 while
// every x tile passes, and each x tile's lane-major rows (6 x K) stay in L1.
constexpr int kPanelCols = 16;  // weight rows per panel: 2 vectors of outputs
constexpr int kPanelRows = 6;   // x rows per tile
// From 128 rows (a long prompt's chunks, decode.cpp: float32 prompts then go in 512-row chunks), as the AVX-512
// table. SmolLM2-135M float32 native prefill, avx2 table, Sapphire Rapids 2 cores, load ~1.5-2, 2-3 alternating
// processes: 600 tokens 555-566 -> 576-592 tok/s (+4%); 127 tokens from 64 rows gained nothing (old 565-625, GEMM
// 551-619 tok/s), so short prompts and decode batches keep the tiles.
constexpr int64_t kGemmMinRows = 128;

inline int64_t tile_count(int64_t M) { return (M + kPanelRows - 1) / kPanelRows; }
inline int64_t tile_start(int64_t M, int64_t t) { return M * t / tile_count(M); }

// 8 x 8 transpose: v[i] lane l -> v[l] lane i.
inline void transpose8(__m256 (&v)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    v[q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x20);
    v[4 + q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x31);
  }
}

// `rows` (<= width) rows of src (row stride ld, K floats each) lane-major into dst: dst[(l * J + j) * width + r] =
// src[r][8j + l], zeros past K and for r in [rows, width). width: 6 (an x tile) or 16 (a panel).
void pack_lanes8(const float* src, int64_t ld, int rows, int64_t K, float* dst, int width) {
  const int64_t J = (K + 7) / 8;
  for (int r0 = 0; r0 < width; r0 += 8) {
    const int span = std::min(8, width - r0);  // dst columns this group writes
    const __m256i keep = tail_mask8(span);
    for (int64_t j = 0; j < J; ++j) {
      const __m256i mk = tail_mask8(K - 8 * j);
      __m256 v[8];
      for (int i = 0; i < 8; ++i)
        v[i] = r0 + i < rows ? _mm256_maskload_ps(src + (r0 + i) * ld + 8 * j, mk) : _mm256_setzero_ps();
      transpose8(v);
      for (int l = 0; l < 8; ++l) _mm256_maskstore_ps(dst + (l * J + j) * width + r0, keep, v[l]);
    }
  }
}

size_t gemm_f32_layout_bytes(const GemvRows& p) {
  return p.a->m < kGemmMinRows ? 0 : size_t(p.a->m) * size_t((p.a->k + 7) / 8 * 8) * sizeof(float);
}

void gemm_f32_prepare(const GemvRows& p, void* scratch) {  // tile t at tile_start(t) * Kp floats, ld its rows
  const int64_t M = p.a->m, K = p.a->k, Kp = (K + 7) / 8 * 8;
  for (int64_t t = 0; t < tile_count(M); ++t) {
    const int64_t m = tile_start(M, t);
    const int rows = int(tile_start(M, t + 1) - m);
    pack_lanes8(p.xf + m * K, K, rows, K, static_cast<float*>(scratch) + m * Kp, rows);
  }
}

// MR x rows (xp: lane-major, ld MR) times a panel (wp: lane-major, ld 16) into y rows (stride ys), `cols` (<= 16)
// of the panel's outputs stored. buf: 3 x 2MR vectors of partial sums.
template <int MR>
void gemm_f32_tile(const float* xp, const float* wp, int64_t J, float* y, int64_t ys, int cols, __m256* buf) {
  static constexpr int kOrder[8] = {0, 4, 2, 6, 1, 5, 3, 7};  // the order hsum8's tree adds the lanes
  __m256* a = buf;           // L0 + L4, then (L0 + L4) + (L2 + L6)
  __m256* b = buf + 2 * MR;  // L2, then L3
  __m256* c = buf + 4 * MR;  // L1 + L5
  const __m256i m0 = tail_mask8(cols), m1 = tail_mask8(cols - 8);
  for (int s = 0; s < 8; ++s) {
    const int l = kOrder[s];
    const float* xl = xp + l * J * MR;
    const float* wl = wp + l * J * kPanelCols;
    __m256 acc[MR][2];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < J; ++j) {
      const __m256 w0 = _mm256_loadu_ps(wl + j * kPanelCols), w1 = _mm256_loadu_ps(wl + j * kPanelCols + 8);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 xb = _mm256_broadcast_ss(xl + j * MR + r);
        acc[r][0] = _mm256_fmadd_ps(w0, xb, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, xb, acc[r][1]);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      #pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * r + h;
        const __m256 v = acc[r][h];
        switch (s) {
          case 0: a[i] = v; break;
          case 1: a[i] = _mm256_add_ps(a[i], v); break;
          case 2: b[i] = v; break;
          case 3: a[i] = _mm256_add_ps(a[i], _mm256_add_ps(b[i], v)); break;
          case 4: c[i] = v; break;
          case 5: c[i] = _mm256_add_ps(c[i], v); break;
          case 6: b[i] = v; break;
          default:
            if (8 * h < cols)
              _mm256_maskstore_ps(y + r * ys + 8 * h, h ? m1 : m0,
                                  _mm256_add_ps(a[i], _mm256_add_ps(c[i], _mm256_add_ps(b[i], v))));
        }
      }
  }
}

void gemm_f32(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t M = a.m, K = a.k, J = (K + 7) / 8, Kp = 8 * J;
  float* y = p.yf ? p.yf : static_cast<float*>(a.y);
  const int64_t ys = p.yf ? a.n : a.y_stride;
  float* panel = thread_panel_f32(size_t(Kp) * kPanelCols);  // this thread's, kept between calls
  alignas(32) __m256 buf[6 * kPanelRows];
  const float* xp = static_cast<const float*>(p.layout);
  const float* w = static_cast<const float*>(a.w);
  static constexpr void (*kTiles[kPanelRows + 1])(const float*, const float*, int64_t, float*, int64_t, int, __m256*) = {
      nullptr, gemm_f32_tile<1>, gemm_f32_tile<2>, gemm_f32_tile<3>, gemm_f32_tile<4>, gemm_f32_tile<5>,
      gemm_f32_tile<6>};
  for (int64_t n = n0; n < n1; n += kPanelCols) {
    const int cols = int(std::min<int64_t>(kPanelCols, n1 - n));
    pack_lanes8(w + n * K, K, cols, K, panel, kPanelCols);
    for (int64_t t = 0; t < tile_count(M); ++t) {
      const int64_t m = tile_start(M, t);
      kTiles[tile_start(M, t + 1) - m](xp + m * Kp, panel, J, y + m * ys + n, ys, cols, buf);
    }
  }
}

void gemv_f32(const GemvRows& p, int64_t n0, int64_t n1) {
  if (p.layout) return gemm_f32(p, n0, n1);  // a prompt's rows (gemm_f32_layout_bytes)
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tiles_f32<4>(p, n);
  switch (n1 - n) {
    case 3: tiles_f32<3>(p, n); break;
    case 2: tiles_f32<2>(p, n); break;
    case 1: tiles_f32<1>(p, n); break;
  }
}

// ---- bfloat16 --------------------------------------------------------------------------------------------

// x rounded to bfloat16 is widened and reordered once per call (bf16_prepare, the table's layout of x): per 16
// values of K, in the order VPUNPCKLWD / VPUNPCKHWD with zeros widen 16 weights loaded as one ymm, k + {0-3, 8-11}
// then k + {4-7, 12-15}, zeros past K. A weight vector is then widened by one shuffle (port 5) and no shift, so the
// FMA ports do only FMAs, and the tile is 3 weight rows x 3 x rows (tile_bf16), one 8-lane accumulator
// per output (fixed by K alone), then hsum8. The products are exact (bfloat16 x bfloat16 fits a float), as
// VDPBF16PS's. Before, one output at a time with x re-read from L2 for every weight row: 0.30-0.36x oneDNN's
// VDPBF16PS GEMM at 128 rows (SmolLM2's gate_up and down, 2 threads, Sapphire Rapids), so bfloat16 models
// prefilled through torch off the AMX table.

inline __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

inline int64_t bf16_row_length(int64_t K) { return (K + 15) / 16 * 16; }

size_t bf16_layout_bytes(const GemvRows& p) { return size_t(p.a->m * bf16_row_length(p.a->k)) * sizeof(float); }

void bf16_prepare(const GemvRows& p, void* scratch, int64_t m0, int64_t m1) {
  static constexpr int kOrder[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  const int64_t K = p.a->k, Kp = bf16_row_length(K);
  float* out = static_cast<float*>(scratch);
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t k = 0; k < Kp; k += 16)
      for (int i = 0; i < 16; ++i) {
        const int64_t kk = k + kOrder[i];
        out[m * Kp + k + i] = kk < K ? bf16_to_f32(p.xb[m * K + kk]) : 0.f;
      }
}

// The 16 bfloat16 weights of a row from k; `tail`: only K - k of them are weights (zeros past K: a NaN's bits there
// would poison the sum even against x's zeros).
template <bool tail>
inline __m256i load16_bf16(const uint16_t* w, int64_t k, int64_t K) {
  if (!tail) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
  alignas(32) uint16_t t[16] = {};
  std::memcpy(t, w + k, (K - k) * 2);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

// One 16-step of weight rows n .. n + R - 1 against MT x rows, as two halves in the layout's order: x's 8 values
// of the half, then per weight row VPUNPCKLWD (half 0) or VPUNPCKHWD (half 1) of its bits under zeros. The 16
// weights are loaded once per half (an L1 hit the second time): keeping both halves' x live would take 2 MT
// registers.
template <int R, int MT, bool tail>
inline void tile_step_bf16(const uint16_t* w, const float* x, int64_t K, int64_t Kp, int64_t k, __m256 (&acc)[R][MT]) {
  const __m256i zero = _mm256_setzero_si256();
  #pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256 xv[MT];
    #pragma GCC unroll 4
    for (int j = 0; j < MT; ++j) xv[j] = _mm256_loadu_ps(x + j * Kp + k + 8 * h);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i v = load16_bf16<tail>(w + r * K, k, K);
      const __m256 wv = _mm256_castsi256_ps(h ? _mm256_unpackhi_epi16(zero, v) : _mm256_unpacklo_epi16(zero, v));
      #pragma GCC unroll 4
      for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
    }
  }
}

// Weight rows n .. n + R - 1 against x rows m0 .. m0 + MT - 1. 3 x 3 outputs: 9 accumulators, 3 x vectors, the
// widened weight and the zero fit the 16 ymm registers (4 x 3, 17 live vectors, spilled accumulators to the stack). At M = 1, 6 rows: 6
// independent FMA chains, each row's stream prefetched into L2 8 KB ahead.
template <int R, int MT>
void tile_bf16(const GemvRows& p, int64_t n, int64_t m0) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, Kp = bf16_row_length(K);
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
  const float* x = static_cast<const float*>(p.layout) + m0 * Kp;
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MT; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (a.m == 1 && (k & 31) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetchL2, _MM_HINT_T1);
    tile_step_bf16<R, MT, false>(w, x, K, Kp, k, acc);
  }
  if (k < K) tile_step_bf16<R, MT, true>(w, x, K, Kp, k, acc);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MT; ++j) gemv_store(p, m0 + j, n + r, hsum8(acc[r][j]));
}

template <int R>
void tiles_bf16(const GemvRows& p, int64_t n) {
  const int64_t M = p.a->m;
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) tile_bf16<R, 3>(p, n, m);
  switch (M - m) {
    case 2: tile_bf16<R, 2>(p, n, m); break;
    case 1: tile_bf16<R, 1>(p, n, m); break;
  }
}

void gemv_bf16(const GemvRows& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (p.a->m == 1) {
    for (; n + 6 <= n1; n += 6) tile_bf16<6, 1>(p, n, 0);
    for (; n < n1; ++n) tile_bf16<1, 1>(p, n, 0);
    return;
  }
  for (; n + 3 <= n1; n += 3) tiles_bf16<3>(p, n);
  switch (n1 - n) {
    case 2: tiles_bf16<2>(p, n); break;
    case 1: tiles_bf16<1>(p, n); break;
  }
}

// ---- int8 ------------------------------------------------------------------------------------------------

inline __m256i load32_tail(const uint8_t* p, int64_t left, uint8_t fill) {  // 32 bytes, `fill` past `left`
  if (left >= 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) uint8_t t[32];
  std::memset(t, fill, 32);
  std::memcpy(t, p, left);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

// With AVX-VNNI the offset-binary byte u is VPDPBUSD's unsigned operand as stored, the accumulator starting at
// -128 x (the lane's 4 x_q summed), exact (as the AVX-512 table does): 3 instructions fewer per 32 weights than
// the sign trick. The starting values, per 32-block 8 int32 (gemv_prepare, once per call):
struct Q8Layout {
  const int32_t* corr;  // (M, B, 8)
};

void gemv_q8(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, B = p.blocks;
#if LLAVA_FAST_AVX2_VNNI
  const int32_t* corr_rows = static_cast<const Q8Layout*>(p.layout)->corr;
#else
  const __m256i flip = _mm256_set1_epi8(char(0x80));
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
    for (int64_t m = 0; m < a.m; ++m) {
      const int8_t* xq = p.xq + m * p.kp;  // zeros past K
      const float* xs = p.xs + m * B;
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t b = 0; b < B; ++b) {
        if (m == 0 && (b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + b * 32) + 1024, _MM_HINT_T0);
        const __m256i u = load32_tail(w + b * 32, K - b * 32, 0x80);  // 0x80: weight 0 past K
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
#if LLAVA_FAST_AVX2_VNNI
        const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr_rows + (m * B + b) * 8));
        const __m256i d = _mm256_dpbusd_avx_epi32(corr, u, xv);
#else
        const __m256i sw = _mm256_xor_si256(u, flip);  // u - 128
        const __m256i d = dot_u8s8(_mm256_sign_epi8(sw, sw), _mm256_sign_epi8(xv, sw));
#endif
        acc[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(xs[b]), acc[b & 1]);
      }
      gemv_store(p, m, n, hsum8(_mm256_add_ps(acc[0], acc[1])) * static_cast<const float*>(a.scales)[n]);
    }
  }
}

// ---- int4 ------------------------------------------------------------------------------------------------

// x_q in the order the int4 kernel reads it (gemv_prepare, once per call): per 64 weights (two 32-blocks b, b + 1),
// [b's k 0..15 | b+1's k 0..15 | b's k 16..31 | b+1's k 16..31], matching the low and the high nibbles of the two
// blocks' 32 packed bytes; and per 64 weights 8 lanes of x_s (lanes 0-3: block b's, 4-7: block b + 1's, which is
// where VPMADDWD / VPDPBUSD leave each block's partial sums).
struct Q4Layout {
  const int8_t* xq;  // (M, kp)
  const float* xs;   // (M, kp / 64, 8)
};

size_t layout_bytes(const GemvRows& p) {
  if (p.a->format == kWeightQ8) return LLAVA_FAST_AVX2_VNNI ? 64 + size_t(p.a->m) * p.blocks * 32 : 0;
  return 64 + size_t(p.a->m) * (p.kp + p.kp / 64 * 32);
}

void prepare(const GemvRows& p, void* scratch) {
  if (p.a->format == kWeightQ8) {
#if LLAVA_FAST_AVX2_VNNI
    int32_t* corr = reinterpret_cast<int32_t*>(static_cast<char*>(scratch) + 64);
    const int64_t M = p.a->m, B = p.blocks;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < B; ++b)
        for (int l = 0; l < 8; ++l) {
          const int8_t* q = p.xq + m * p.kp + b * 32 + 4 * l;  // zeros past K
          corr[(m * B + b) * 8 + l] = -128 * (int32_t(q[0]) + q[1] + q[2] + q[3]);
        }
    *static_cast<Q8Layout*>(scratch) = Q8Layout{corr};
#endif
    return;
  }
  const int64_t M = p.a->m, kp = p.kp, B = p.blocks, chunks = kp / 64;
  int8_t* xq = static_cast<int8_t*>(scratch) + 64;
  float* xs = reinterpret_cast<float*>(xq + M * kp);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* src = p.xq + m * kp + c * 64;
      int8_t* dst = xq + m * kp + c * 64;
      std::memcpy(dst, src, 16), std::memcpy(dst + 16, src + 32, 16);
      std::memcpy(dst + 32, src + 16, 16), std::memcpy(dst + 48, src + 48, 16);
      for (int l = 0; l < 8; ++l) {
        const int64_t b = 2 * c + l / 4;
        xs[(m * chunks + c) * 8 + l] = b < B ? p.xs[m * B + b] : 0.f;
      }
    }
  *static_cast<Q4Layout*>(scratch) = Q4Layout{xq, xs};
}

// 64 weights per step: 32 packed bytes, AND / SHIFT+AND give two blocks' low and high nibbles, two u8 x s8 dot
// products against x_q in the layout above; lanes 0-3 hold block b's partial sums, 4-7 block b + 1's, scaled by
// (weight scale x x_s) per lane (before: one 32-block per step, 16 bytes, ~12 instructions: 1.4 GB/s where the
// AVX-512 table read 3.0 on the same loaded host). Two accumulators per output, chunks alternating between them.
//
// R weight rows x MT x rows at a time (M > 1: 2 x 2; M = 1: 1 x 1, the decode stream): each unpacked weight
// vector and its scales serve MT x rows, each x_q load R weight rows (before, one weight row at a time: its
// unpacking and scales redone for every x row, and all of x re-read from L2 per weight row). 2 x 2 needs 8
// accumulators + 4 nibble vectors of the 16 ymm registers. Every output's arithmetic is the same whatever R and
// MT: the same bits at any M, any thread split.
template <int R, int MT>
void tile_q4(const GemvRows& p, int64_t n, int64_t m0) {
  const GemvArgs& a = *p.a;
  const Q4Layout& x = *static_cast<const Q4Layout*>(p.layout);
  const int64_t K = a.k, B = p.blocks, G = K / a.group, per_group = a.group / 32, chunks = (B + 1) / 2;
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
  const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
  const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
  __m256 acc[R][MT][2];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MT; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
  // One chunk (two 32-blocks) into accumulator `e` of every output of the tile.
  auto step = [&](int64_t c, int e) {
    const int64_t b = 2 * c;
    __m256i lo[R], hi[R];
    __m256 ws[R];
    #pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * (K / 2) + b * 16;
      if (m0 == 0 && (c & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr) + 1024, _MM_HINT_T0);
      const __m256i v = b + 1 < B ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr))
                                  : _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr)));
      lo[r] = _mm256_and_si256(v, low4), hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      // The two blocks' weight scales, one per 4 lanes: adjacent float16s when group = 32 (an odd B's last
      // chunk: block b's alone, the other lanes multiply zeros), else one group's.
      const uint16_t* scr = sc + r * G;
      __m128i h2;
      if (per_group == 1) {
        int32_t two = scr[b];
        if (b + 1 < B) std::memcpy(&two, scr + b, 4);
        h2 = _mm_cvtsi32_si128(two);
      } else {
        h2 = _mm_set1_epi16(short(scr[b / per_group]));
      }
      ws[r] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(h2)), halves);
    }
    #pragma GCC unroll 2
    for (int j = 0; j < MT; ++j) {
      const int8_t* xq = x.xq + (m0 + j) * p.kp + c * 64;
      const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      const __m256 xs = _mm256_loadu_ps(x.xs + (m0 + j) * (p.kp / 64) * 8 + c * 8);
      #pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
#if LLAVA_FAST_AVX2_VNNI
        const __m256i d = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo[r], xlo), hi[r], xhi);
#else  // pair sums <= 2 x 15 x 127 each, their sum < 2^15: one VPMADDWD for both halves
        const __m256i d = _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xlo), _mm256_maddubs_epi16(hi[r], xhi)), _mm256_set1_epi16(1));
#endif
        acc[r][j][e] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(ws[r], xs), acc[r][j][e]);
      }
    }
  };
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) step(c, 0), step(c + 1, 1);
  if (c < chunks) step(c, 0);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MT; ++j) {
      float sum = hsum8(_mm256_add_ps(acc[r][j][0], acc[r][j][1]));
      const float* xmin = p.xmin + (m0 + j) * G;
      for (int64_t g = 0; g < G; ++g) sum += _cvtsh_ss(mn[r * G + g]) * xmin[g];
      gemv_store(p, m0 + j, n + r, sum);
    }
}

template <int R>
void tiles_q4(const GemvRows& p, int64_t n) {
  const int64_t M = p.a->m;
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile_q4<R, 2>(p, n, m);
  if (m < M) tile_q4<R, 1>(p, n, m);
}

void gemv_q4(const GemvRows& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (p.a->m == 1) {
    for (; n < n1; ++n) tile_q4<1, 1>(p, n, 0);
    return;
  }
  for (; n + 2 <= n1; n += 2) tiles_q4<2>(p, n);
  if (n < n1) tiles_q4<1>(p, n);
}

// ---- activation quantization (the scalar reference's bytes: exact max, one IEEE division each, ties to even) --

void quantize_row_q8(const float* x, int64_t K, int8_t* xq, float* xs) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t b = 0, k0 = 0; k0 < K; ++b, k0 += 32) {
    const int64_t left = K - k0;
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_maskload_ps(x + k0 + 8 * i, tail_mask8(left - 8 * i));
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                              _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.f;
    xs[b] = d;
    if (!(d > 0.f)) continue;
    const __m256 dv = _mm256_set1_ps(d);
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // int32 -> int8 (|q| <= 127: no saturation); packs work per 128-bit lane, the permute restores K order.
    const __m256i w16 = _mm256_packs_epi32(q[0], q[1]), w16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (left >= 32) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k0), bytes);
    } else {
      alignas(32) int8_t t[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), bytes);
      std::memcpy(xq + k0, t, left);
    }
  }
}

// ---- int4 prefill GEMM panel (gemm_q4.cpp; layout: kernels.h) -------------------------------------------------

// The prefill panels' integer sums stay in registers, one chain per accumulator, in step order: an empty asm that
// reads and writes them after every step. Without it GCC 12, unrolling the steps, reassociated the integer adds
// into trees and kept the products on the stack (the int4 tile: 8 steps, ~50 ymm spills per block). Measured one
// thread, SmolLM2-135M's four projections at 127 rows (Xeon, Sapphire Rapids, avx2_maddubs): int4 62 -> 95
// GMAC/s; int8 (now unrolled 16x, which spilled without it) 60 -> 66; avx2_vnni int8 142 -> 147, int4 unchanged.
// The same operations in the same order: the bits do not change.
inline void keep_in_registers(__m256i& a, __m256i& b) { asm("" : "+x"(a), "+x"(b)); }

void pack_panel(const GemvArgs& a, int64_t n0, uint8_t* w, float* scales, float* mins) {
  const int64_t K = a.k, B = K / 32, G = K / a.group, half = K / 2, rows = std::min<int64_t>(kQ4Panel, a.n - n0);
  const uint8_t* src = static_cast<const uint8_t*>(a.w) + n0 * half;
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t b = 0; b < B; ++b) {
    uint8_t* out = w + b * 8 * 128;
    for (int64_t r = 0; r < kQ4Panel; ++r) {
      // Row r's 16 bytes: 32-bit word j holds k = 4j .. 4j + 3 (low nibbles) and 16 + 4j .. (high nibbles).
      const __m128i blk = r < rows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + r * half + b * 16)) : _mm_setzero_si128();
      alignas(16) uint32_t lo[4], hi[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(lo), _mm_and_si128(blk, low4));
      _mm_store_si128(reinterpret_cast<__m128i*>(hi), _mm_and_si128(_mm_srli_epi16(blk, 4), low4));
      for (int j = 0; j < 4; ++j) {
        std::memcpy(out + j * 128 + r * 4, &lo[j], 4);
        std::memcpy(out + (4 + j) * 128 + r * 4, &hi[j], 4);
      }
    }
  }
  const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n0 * G;
  const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n0 * G;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < kQ4Panel; ++r) {
      scales[g * kQ4Panel + r] = r < rows ? _cvtsh_ss(sc[r * G + g]) : 0.f;
      mins[g * kQ4Panel + r] = r < rows ? _cvtsh_ss(mn[r * G + g]) : 0.f;
    }
}

// MR x rows against outputs n0 + 16h .. n0 + 16h + 15 (two vectors): per block 2 x MR integer sums of 8 dot steps.
// With AVX-VNNI each VPDPBUSD accumulates into its block sum; without, VPMADDUBSW's int16 pair sums are added up
// over the block's 8 steps (each <= 2 x 15 x 127, eight of them < 2^15: exact) and widened by one VPMADDWD per
// block. Both give the same integers as before (one VPDPBUSD from zero plus an add per step; VPMADDUBSW + VPMADDWD
// + an add per step), with a third of the vector integer instructions fewer; MR = 3 fills the 16 ymm registers.
constexpr int kQ4MR = 3;

template <int MR>
void panel_tile(const uint8_t* w, const float* scales, const float* mins, const QuantizedRows& x, int64_t m0, int h,
                int64_t n_valid, float* y, int64_t y_stride) {
  const int64_t B = x.B, G = x.G, per_group = x.group / 32, kp = x.kp;
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = b / per_group;
    const uint8_t* wb = w + b * 8 * 128 + 64 * h;
    __m256i d[MR][2];
    for (int i = 0; i < MR; ++i) d[i][0] = d[i][1] = _mm256_setzero_si256();
    #pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 128));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 128 + 32));
      #pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        std::memcpy(&four, &x.xq[(m0 + i) * kp + b * 32 + (s < 4 ? 4 * s : 16 + 4 * (s - 4))], 4);
        const __m256i xv = _mm256_set1_epi32(four);
#if LLAVA_FAST_AVX2_VNNI
        d[i][0] = _mm256_dpbusd_avx_epi32(d[i][0], w0, xv);
        d[i][1] = _mm256_dpbusd_avx_epi32(d[i][1], w1, xv);
#else
        d[i][0] = _mm256_add_epi16(d[i][0], _mm256_maddubs_epi16(w0, xv));
        d[i][1] = _mm256_add_epi16(d[i][1], _mm256_maddubs_epi16(w1, xv));
#endif
        keep_in_registers(d[i][0], d[i][1]);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(scales + g * kQ4Panel + 16 * h), s1 = _mm256_loadu_ps(scales + g * kQ4Panel + 16 * h + 8);
    for (int i = 0; i < MR; ++i) {
#if !LLAVA_FAST_AVX2_VNNI
      const __m256i ones = _mm256_set1_epi16(1);
      d[i][0] = _mm256_madd_epi16(d[i][0], ones), d[i][1] = _mm256_madd_epi16(d[i][1], ones);
#endif
      const __m256 xs = _mm256_set1_ps(x.xs[(m0 + i) * B + b]);
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][0]), _mm256_mul_ps(s0, xs), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][1]), _mm256_mul_ps(s1, xs), acc[i][1]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m256 m0v = _mm256_loadu_ps(mins + g * kQ4Panel + 16 * h), m1v = _mm256_loadu_ps(mins + g * kQ4Panel + 16 * h + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 xm = _mm256_set1_ps(x.xmin[(m0 + i) * G + g]);
      acc[i][0] = _mm256_fmadd_ps(m0v, xm, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(m1v, xm, acc[i][1]);
    }
  }
  const int64_t first = 16 * h;
  for (int i = 0; i < MR; ++i) {
    float* yr = y + (m0 + i) * y_stride;
    if (n_valid >= first + 16) {
      _mm256_storeu_ps(yr + first, acc[i][0]);
      _mm256_storeu_ps(yr + first + 8, acc[i][1]);
    } else {
      _mm256_maskstore_ps(yr + first, tail_mask8(n_valid - first), acc[i][0]);
      _mm256_maskstore_ps(yr + first + 8, tail_mask8(n_valid - first - 8), acc[i][1]);
    }
  }
}

void gemm_q4_panel(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride, uint8_t* panel) {
  const int64_t G = a.k / a.group, M = a.m, n_valid = std::min<int64_t>(kQ4Panel, a.n - n0);
  uint8_t* w = panel;
  float* scales = reinterpret_cast<float*>(panel + (a.k / 32) * 8 * 128);
  float* mins = scales + G * kQ4Panel;
  pack_panel(a, n0, w, scales, mins);
  float* yp = y + n0;
  for (int h = 0; h < 2 && 16 * h < n_valid; ++h) {
    int64_t m = 0;
    for (; m + kQ4MR <= M; m += kQ4MR) panel_tile<kQ4MR>(w, scales, mins, x, m, h, n_valid, yp, y_stride);
    switch (M - m) {
      case 2: panel_tile<2>(w, scales, mins, x, m, h, n_valid, yp, y_stride); break;
      case 1: panel_tile<1>(w, scales, mins, x, m, h, n_valid, yp, y_stride); break;
    }
  }
}

// ---- int8 prefill GEMM panel (gemm_q8.cpp; layout: kernels.h): bit for bit the scalar panel ----------------
// MR x rows against 16 outputs (two vectors): 4 x MR accumulators + the weight vectors within the 16 ymm registers.
// With AVX-VNNI the panel holds the stored bytes u (VPDPBUSD's unsigned operand) and each block's integer sums
// start at -128 x the x row's block sum (exact), as the GEMV does: one instruction per 32 products.
// Without, the signed weights u - 128 are repacked as int16 pairs (pack_q8_panel_x16; kernels.h), and x_q
// comes as int16 pairs too (QuantizedRows::xq16): one VPMADDWD (16 products, exact int32 pair sums) and one add per
// 16 products. The GEMV's way, |w| times x_q with w's sign (VPSIGNB, VPMADDUBSW, VPMADDWD, add: 3 of its 4
// instructions on the two multiply ports of Intel cores) did 32 products in 3 port-0/1 cycles (1.5 per 16) against
// 1 + an add on any vector port here: SmolLM2-135M's four projections at 127 rows, 30 layers, 2 threads, Xeon
// (Sapphire Rapids) VM forced to avx2_maddubs, 3 interleaved rounds: 143-151 -> 108-121 ms. The steps' loop is
// unrolled 16x with the sums pinned to registers (keep_in_registers; unpinned, GCC 12 kept the products on the
// stack: 183 ms).
constexpr int kQ8MR = 3;

template <int MR>
inline void q8_store(const __m256 (&acc)[MR][2], const float* scales, int64_t m0, int h, int64_t n_valid, float* y,
                     int64_t y_stride) {
  const int64_t first = 16 * h;
  const __m256 s0 = _mm256_loadu_ps(scales + first), s1 = _mm256_loadu_ps(scales + first + 8);
  for (int i = 0; i < MR; ++i) {
    float* yr = y + (m0 + i) * y_stride + first;
    const __m256 v0 = _mm256_mul_ps(acc[i][0], s0), v1 = _mm256_mul_ps(acc[i][1], s1);
    if (n_valid >= first + 16) {
      _mm256_storeu_ps(yr, v0);
      _mm256_storeu_ps(yr + 8, v1);
    } else {
      _mm256_maskstore_ps(yr, tail_mask8(n_valid - first), v0);
      _mm256_maskstore_ps(yr + 8, tail_mask8(n_valid - first - 8), v1);
    }
  }
}

#if LLAVA_FAST_AVX2_VNNI
template <int MR>
void q8_panel_tile(const uint8_t* w, const float* scales, const QuantizedRows& x, int64_t m0, int h, int64_t n_valid,
                   float* y, int64_t y_stride) {
  const int64_t B = x.B, kp = x.kp;
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = w + b * 8 * 128 + 64 * h;
    __m256i d[MR][2];
    for (int i = 0; i < MR; ++i) d[i][0] = d[i][1] = _mm256_set1_epi32(-128 * x.xsum[(m0 + i) * B + b]);
    #pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 128));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 128 + 32));
      #pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        std::memcpy(&four, &x.xq[(m0 + i) * kp + b * 32 + 4 * s], 4);
        const __m256i xv = _mm256_set1_epi32(four);
        d[i][0] = _mm256_dpbusd_avx_epi32(d[i][0], w0, xv);
        d[i][1] = _mm256_dpbusd_avx_epi32(d[i][1], w1, xv);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 xs = _mm256_set1_ps(x.xs[(m0 + i) * B + b]);
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][0]), xs, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][1]), xs, acc[i][1]);
    }
  }
  q8_store(acc, scales, m0, h, n_valid, y, y_stride);
}
#else
// Rows n0 .. n0 + 31 straight into the int16 panel (kernels.h: per block, 16 steps of 2 k, row j's pair at 4j) and
// their scales. Per block and 8 rows: the signed bytes u ^ 0x80 sign-extended in place (even bytes: shift left and
// back, odd: shift right), interleaved to int16 pairs (one 32-bit word per 2 k: words 0-3 | 8-11 and 4-7 | 12-15
// per 128-bit lane), and two 8 x 8 word transposes. Before, the byte panel was written, read back and widened:
// 8 + 16 stores and 8 + 8 loads per 8 rows and block here 16 and 8; SmolLM2-135M's four projections at 127 rows,
// 30 layers, the repack 9% of the int8 prefill's samples on this table (perf, Xeon, 2 threads).
void pack_q8_panel_x16(const GemvArgs& a, int64_t n0, int16_t* w, float* scales) {
  const int64_t K = a.k, B = (K + 31) / 32, rows = std::min<int64_t>(kQ8Panel, a.n - n0);
  const uint8_t* src = static_cast<const uint8_t*>(a.w) + n0 * K;
  for (int64_t b = 0; b < B; ++b)
    for (int g = 0; g < kQ8Panel / 8; ++g) {
      __m256i lo[8], hi[8], out[8];
      for (int i = 0; i < 8; ++i) {
        const __m256i q = load_q8_block(src, K, B, b, 8 * g + i, rows, 0x80);
        const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(q, 8), 8), odd = _mm256_srai_epi16(q, 8);
        lo[i] = _mm256_unpacklo_epi16(even, odd);  // pairs (k/2) 0-3 | 8-11
        hi[i] = _mm256_unpackhi_epi16(even, odd);  // pairs 4-7 | 12-15
      }
      int16_t* wb = w + b * 16 * 64 + g * 16;
      transpose_8x8_epi32(lo, out);
      for (int s = 0; s < 4; ++s) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + s * 64), out[s]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + (s + 8) * 64), out[s + 4]);
      }
      transpose_8x8_epi32(hi, out);
      for (int s = 0; s < 4; ++s) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + (s + 4) * 64), out[s]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + (s + 12) * 64), out[s + 4]);
      }
    }
  pack_q8_scales(a, n0, scales);
}

template <int MR>
void q8_panel_tile(const int16_t* w, const float* scales, const QuantizedRows& x, int64_t m0, int h, int64_t n_valid,
                   float* y, int64_t y_stride) {
  const int64_t B = x.B, kp = x.kp;
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const int16_t* wb = w + b * 16 * 64 + 32 * h;
    __m256i d[MR][2];
    for (int i = 0; i < MR; ++i) d[i][0] = d[i][1] = _mm256_setzero_si256();
    #pragma GCC unroll 16
    for (int s = 0; s < 16; ++s) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * 64 + 16));
      #pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, &x.xq16[(m0 + i) * kp + b * 32 + 2 * s], 4);
        const __m256i xv = _mm256_set1_epi32(pair);
        d[i][0] = _mm256_add_epi32(d[i][0], _mm256_madd_epi16(w0, xv));
        d[i][1] = _mm256_add_epi32(d[i][1], _mm256_madd_epi16(w1, xv));
        keep_in_registers(d[i][0], d[i][1]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 xs = _mm256_set1_ps(x.xs[(m0 + i) * B + b]);
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][0]), xs, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][1]), xs, acc[i][1]);
    }
  }
  q8_store(acc, scales, m0, h, n_valid, y, y_stride);
}
#endif

void gemm_q8_panel(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride, uint8_t* panel) {
  const int64_t M = a.m, n_valid = std::min<int64_t>(kQ8Panel, a.n - n0);
  float* scales = reinterpret_cast<float*>(panel + q8_panel_scales_offset(x.B));
#if LLAVA_FAST_AVX2_VNNI
  pack_q8_panel(a, n0, panel, scales, 0);
  const uint8_t* w = panel;
#else
  int16_t* w = reinterpret_cast<int16_t*>(panel);
  pack_q8_panel_x16(a, n0, w, scales);
#endif
  float* yp = y + n0;
  for (int h = 0; h < 2 && 16 * h < n_valid; ++h) {
    int64_t m = 0;
    for (; m + kQ8MR <= M; m += kQ8MR) q8_panel_tile<kQ8MR>(w, scales, x, m, h, n_valid, yp, y_stride);
    switch (M - m) {
      case 2: q8_panel_tile<2>(w, scales, x, m, h, n_valid, yp, y_stride); break;
      case 1: q8_panel_tile<1>(w, scales, x, m, h, n_valid, yp, y_stride); break;
    }
  }
}

// ---- dequantization (dequantize.cpp; bit for bit its scalar loop) --------------------------------------------

// float32 -> bfloat16 bits, round to nearest even, NaN kept quiet: f32_to_bf16's integer arithmetic, 8 lanes.
inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // lanes 0-3 and 4-7 in each 128-bit half
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

inline void put8(void* out, int dtype, int64_t i, __m256 v) {
  if (dtype == kActBF16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), to_bf16(v));
  } else {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
  }
}

void dequantize_rows(const GemvArgs& a, void* out, int dtype, int64_t n0, int64_t n1) {
  const int64_t K = a.k;
  if (a.format == kWeightQ8) {
    if (K % 8) return dequantize_rows_scalar(a, out, dtype, n0, n1);
    const __m256i offset = _mm256_set1_epi32(128);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
      const __m256 s = _mm256_set1_ps(static_cast<const float*>(a.scales)[n]);
      for (int64_t k = 0; k < K; k += 8) {
        const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))), offset);
        put8(out, dtype, n * K + k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
      }
    }
    return;
  }
  const int64_t G = K / a.group;
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
    const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
    const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
    for (int64_t b = 0; b < K; b += 32) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[b / a.group])), m = _mm256_set1_ps(_cvtsh_ss(mn[b / a.group]));
      for (int half = 0; half < 2; ++half) {  // bytes 0..7, 8..15 of the block
        const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + b / 2 + 8 * half)));
        // q * s + m as a multiply and an add (not fused): the scalar loop's and the torch path's roundings
        put8(out, dtype, n * K + b + 8 * half, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low4)), s), m));
        put8(out, dtype, n * K + b + 16 + 8 * half, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), s), m));
      }
    }
  }
}

// ---- decode glue (decode.cpp: the scalar references; the same roundings, float32 sums in 8 lanes) ------------

inline __m256 load8(const void* p, bool bf16, int64_t i, int64_t left) {  // 8 values as float32, zeros past left
  if (bf16) {
    alignas(16) uint16_t t[8] = {};
    const uint16_t* src = static_cast<const uint16_t*>(p) + i;
    if (left >= 8) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))), 16));
    std::memcpy(t, src, std::max<int64_t>(left, 0) * 2);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(t))), 16));
  }
  const float* src = static_cast<const float*>(p) + i;
  return left >= 8 ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, tail_mask8(left));
}

inline __m256 loadf(const float* p, int64_t left) { return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask8(left)); }
inline void storef(float* p, __m256 v, int64_t left) {
  if (left >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, tail_mask8(left), v);
  }
}

// v rounded to the nearest bfloat16 (even on ties), NaN kept: f32_to_bf16's integer arithmetic, 8 lanes.
inline __m256 round_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v), hi = _mm256_set1_epi32(int(0xffff0000u));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), hi);
  const __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)), hi);
  return _mm256_castsi256_ps(_mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))));
}

inline __m256 rnd8(__m256 v, bool bf16) { return bf16 ? round_bf16_8(v) : v; }

// e^x, 8 lanes: avx512_common.h's exp16 (Cephes' polynomial, within 2 ulp of std::exp); 2^n as two exponent-field
// factors so n up to 145 (x <= 100) overflows to inf as VSCALEFPS does.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(100.f), x));  // NaN stays NaN (x second)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

void add_rms_norm_row(const float* x, float* h, const void* weight, float eps, int64_t C, float* out, bool bf16) {
  __m256d sq0 = _mm256_setzero_pd(), sq1 = sq0;
  for (int64_t i = 0; i < C; i += 8) {
    __m256 v = loadf(h + i, C - i);
    if (x) {
      v = rnd8(_mm256_add_ps(v, loadf(x + i, C - i)), bf16);
      storef(h + i, v, C - i);
    }
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    sq0 = _mm256_fmadd_pd(lo, lo, sq0), sq1 = _mm256_fmadd_pd(hi, hi, sq1);
  }
  const __m256d s = _mm256_add_pd(sq0, sq1);
  __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  const double sq = _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
  const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(float(sq / double(C)) + eps));
  for (int64_t i = 0; i < C; i += 8) {
    const __m256 normed = rnd8(_mm256_mul_ps(loadf(h + i, C - i), inv), bf16);
    storef(out + i, rnd8(_mm256_mul_ps(load8(weight, bf16, i, C - i), normed), bf16), C - i);
  }
}

void rope(float* x, int64_t count, int64_t D, const float* cos_row, const float* sin_row, bool bf16) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += 8) {
    const int64_t left = half - i;
    const __m256 c = rnd8(loadf(cos_row + i, left), bf16), s = rnd8(loadf(sin_row + i, left), bf16);
    for (int64_t h = 0; h < count; ++h) {
      float* xh = x + h * D;
      const __m256 x1 = loadf(xh + i, left), x2 = loadf(xh + half + i, left);
      const __m256 a = rnd8(_mm256_sub_ps(rnd8(_mm256_mul_ps(x1, c), bf16), rnd8(_mm256_mul_ps(x2, s), bf16)), bf16);
      const __m256 b = rnd8(_mm256_add_ps(rnd8(_mm256_mul_ps(x2, c), bf16), rnd8(_mm256_mul_ps(x1, s), bf16)), bf16);
      storef(xh + i, a, left);
      storef(xh + half + i, b, left);
    }
  }
}

void store_row(void* dst, const float* src, int64_t n, bool bf16) {  // values already rounded to the dtype
  if (!bf16) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(_mm256_loadu_ps(src + i)), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08)));
  }
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    out[i] = uint16_t(u >> 16);
  }
}

// The CLIP tower's activation in place (kernels.h quick_gelu_row): x / (1 + e^(-1.702 x)) in float32, rounded once.
void quick_gelu_row(void* x, int64_t n, bool bf16) {
  const __m256 one = _mm256_set1_ps(1.f), k = _mm256_set1_ps(-1.702f);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t left = n - i;
    const __m256 y = rnd8(_mm256_div_ps(load8(x, bf16, i, left), _mm256_add_ps(one, exp8(_mm256_mul_ps(k, load8(x, bf16, i, left))))), bf16);
    if (!bf16) {
      storef(static_cast<float*>(x) + i, y, left);
      continue;
    }
    alignas(32) float f[8];
    _mm256_store_ps(f, y);
    store_row(static_cast<uint16_t*>(x) + i, f, std::min<int64_t>(left, 8), true);
  }
}

void swiglu_row(const float* gate, const float* up, float* out, int64_t I, bool bf16) {
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t i = 0; i < I; i += 8) {
    const __m256 g = loadf(gate + i, I - i);
    const __m256 silu = rnd8(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))), bf16);
    storef(out + i, rnd8(_mm256_mul_ps(silu, loadf(up + i, I - i)), bf16), I - i);
  }
}

float attn_dot(const float* q, const void* k, bool bf16, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(loadf(q + d, D - d), load8(k, bf16, d, D - d), acc);
  return hsum8(acc);
}

void attn_axpy(float* out, float p, const void* v, bool bf16, int64_t D) {
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t d = 0; d < D; d += 8) storef(out + d, _mm256_fmadd_ps(pv, load8(v, bf16, d, D - d), loadf(out + d, D - d)), D - d);
}

// Attention of one head for nb <= QB consecutive positions T0 - 1 .. T0 + nb - 2 of one cache row (a block of a
// prompt's rows; a decode row is a block of one), head_dim D = 8 * ND: avx512.cpp's attend_block within 16 ymm
// registers. Scores: keys in groups of 4, queries in pairs, 8 accumulators; each key chunk is loaded (and
// widened, bfloat16) once per pair, and a pair's 8 dot products are summed by one fixed HADD tree (before: one
// q . k at a time with a full horizontal sum each, and the whole cache re-read per query). Values: 16 of the D
// dimensions at a time, QB x 2 accumulators, each value loaded once for the block. Every query's arithmetic is the
// same whatever block it is in: a row's result does not depend on how its prompt was split or batched.
inline __m256 load_keys8(const char* row, bool bf16, int64_t d) {  // 8 values of a cached row from dimension d
  if (bf16) return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * d)));
  return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + d);
}

inline __m128 sum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {  // (sum a0, sum a1, sum a2, sum a3), fixed tree
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

template <int ND, bool BF16, int QB>
void attend_block(const float* q, int64_t q_stride, int nb, const char* k, const char* v, int64_t pos_bytes,
                  int64_t T0, float scale, float* scores, float* o, int64_t o_stride) {
  static_assert(ND % 2 == 0, "values go 16 dimensions at a time");
  alignas(32) static const float zeros[8 * ND] = {};  // the keys past the block's last one (never read from k)
  const int64_t Tmax = T0 + nb - 1;
  const __m128 scale4 = _mm_set1_ps(scale);
  for (int64_t t = 0; t < Tmax; t += 4) {  // scores[i * Tmax + t] = q_i . k_t * scale
    const char* kr[4];
    for (int j = 0; j < 4; ++j)
      kr[j] = t + j < Tmax ? k + (t + j) * pos_bytes : reinterpret_cast<const char*>(zeros);
    for (int i = 0; i < nb; i += 2) {
      const float* q0 = q + i * q_stride;
      const float* q1 = i + 1 < nb ? q0 + q_stride : q0;  // an odd block's last query: computed twice, kept once
      __m256 acc[2][4];
      #pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
      #pragma GCC unroll 16
      for (int c = 0; c < ND; ++c) {
        const __m256 x0 = _mm256_loadu_ps(q0 + 8 * c), x1 = _mm256_loadu_ps(q1 + 8 * c);
        #pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256 kc = load_keys8(kr[j], BF16, 8 * c);  // zeros read as bfloat16 are zeros too
          acc[0][j] = _mm256_fmadd_ps(x0, kc, acc[0][j]);
          acc[1][j] = _mm256_fmadd_ps(x1, kc, acc[1][j]);
        }
      }
      alignas(16) float four[2][4];
      _mm_store_ps(four[0], _mm_mul_ps(sum4x8(acc[0][0], acc[0][1], acc[0][2], acc[0][3]), scale4));
      _mm_store_ps(four[1], _mm_mul_ps(sum4x8(acc[1][0], acc[1][1], acc[1][2], acc[1][3]), scale4));
      for (int u = 0; u < 2 && i + u < nb; ++u)
        for (int j = 0; j < 4 && t + j < Tmax; ++j) scores[(i + u) * Tmax + t + j] = four[u][j];
    }
  }
  float inv[QB];
  for (int i = 0; i < nb; ++i) {  // softmax of query i over its T0 + i keys
    float* si = scores + i * Tmax;
    const int64_t T = T0 + i;
    __m256 top = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(si + t));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top);
    float m = lanes[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
    for (; t < T; ++t) m = std::max(m, si[t]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    for (t = 0; t < T; t += 8) {
      const __m256i mk = tail_mask8(T - t);
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(si + t, mk), mv)), _mm256_castsi256_ps(mk));
      _mm256_maskstore_ps(si + t, mk, e);
      total = _mm256_add_ps(total, e);
    }
    inv[i] = 1.f / hsum8(total);
  }
  for (int c = 0; c < ND; c += 2) {  // out_i += p_i[t] v_t, t in order, for the queries that see key t
    __m256 acc[QB][2];
    #pragma GCC unroll 4
    for (int i = 0; i < QB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < Tmax; ++t) {
      const char* vr = v + t * pos_bytes;
      const __m256 v0 = load_keys8(vr, BF16, 8 * c), v1 = load_keys8(vr, BF16, 8 * c + 8);
      #pragma GCC unroll 4
      for (int i = 0; i < QB; ++i) {
        if (i >= nb || t >= T0 + i) continue;
        const __m256 pt = _mm256_set1_ps(scores[i * Tmax + t]);
        acc[i][0] = _mm256_fmadd_ps(pt, v0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(pt, v1, acc[i][1]);
      }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < QB; ++i) {
      if (i >= nb) continue;
      const __m256 s = _mm256_set1_ps(inv[i]);
      _mm256_storeu_ps(o + i * o_stride + 8 * c, _mm256_mul_ps(acc[i][0], s));
      _mm256_storeu_ps(o + i * o_stride + 8 * c + 8, _mm256_mul_ps(acc[i][1], s));
    }
  }
}

AttendKernel attend_kernel(int64_t D, bool bf16) {
  switch (D) {
    case 32: return {bf16 ? attend_block<4, true, 4> : attend_block<4, false, 4>, 4};
    case 64: return {bf16 ? attend_block<8, true, 4> : attend_block<8, false, 4>, 4};
    case 96: return {bf16 ? attend_block<12, true, 4> : attend_block<12, false, 4>, 4};
    case 128: return {bf16 ? attend_block<16, true, 4> : attend_block<16, false, 4>, 4};
    default: return {nullptr, 1};
  }
}

}  // namespace

#if LLAVA_FAST_AVX2_VNNI
const KernelTable* avx2_vnni_kernels() {
#else
const KernelTable* avx2_kernels() {
#endif
  // The optional flags after the positional entries are set by name: a flag added to KernelTable before them
  // must not take another's value.
  static const KernelTable table = [] {
    KernelTable t{
        "avx2", LLAVA_FAST_AVX2_VNNI ? "avx2_vnni" : "avx2_maddubs",
        gemv_f32, gemv_bf16, gemv_q8, gemv_q4, layout_bytes, prepare,
        quantize_row_q8,
        gemm_q4_panel,
        dequantize_rows,
        add_rms_norm_row, rope, store_row, swiglu_row, attn_dot, attn_axpy,
        attend_kernel, bf16_layout_bytes, bf16_prepare, gemm_q8_panel,
        gemm_f32_layout_bytes, gemm_f32_prepare, kPanelCols};
    t.gemm_q8_x16 = !LLAVA_FAST_AVX2_VNNI;
    t.quick_gelu_row = quick_gelu_row;
    return t;
  }();
  return &table;
}

}  // namespace llava_fast
