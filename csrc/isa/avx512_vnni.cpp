// The AVX-512 table's int8 / int4 / bfloat16 part (kernels.h): AVX-512 F/BW/VL/DQ + AVX512_VNNI (VPDPBUSD:
// 64 u8 x s8 multiply-adds per instruction) + AVX512_BF16 (VDPBF16PS, VCVTNEPS2BF16), as in Cooper Lake,
// Sapphire Rapids and Zen 4. Compiled with exactly those flags; dispatch.cpp uses it only where the CPU has
// both extensions (else the AVX2 table's kernels run beside avx512.cpp's).
//
// GEMV (gemv.cpp holds the algorithm and the scalar reference):
//   bfloat16  32 weights per VDPBF16PS (x rounded to bf16, fp32 sums); tiles of 4 weight rows x up to 6
//            activation rows, one accumulator per output, weights prefetched into L2 8 KB ahead.
//   int8     64 weights per VPDPBUSD: the weight stored offset-binary (w + 128) is the unsigned operand, x
//            quantized to int8 per 32-block the signed one; the accumulator starts at -128 * sum(x_q) (exact),
//            then one convert + one FMA with the blocks' x scales per 64 weights.
//   int4     128 weights per 64 bytes: AND / SHIFT+AND give the nibbles (0..15, unsigned operands), 2 VPDPBUSD
//            against x_q reordered to match; the group's fp16 scale times the block's x scale multiplies each
//            block's integer sum; sum_g min_g * (sum over g of x_s x_q) adds the mins.
// Before (VPMOVSXBD/VPMOVZXBD + VCVTDQ2PS + FMA per 16 weights) int8 and int4 were compute-bound.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "../convert.h"
#include "avx512_common.h"
#include "q8_panel_x86.h"
#include "kernels.h"
#include "reference.h"

namespace llava_fast {
namespace {

// x_q in the lane orders these kernels read (gemv_prepare builds it once per call, after gemv.cpp quantized x):
struct Layout {
  // Q8: per 64-byte chunk c of a row, 16 int32 lanes (lane l covers k = 64c + 4l .. 64c + 4l + 3):
  const int32_t* corr8;  // (M, kp / 64, 16) -128 * (sum of the lane's 4 x_q): the offset-binary correction
  const float* xs8;      // (M, kp / 64, 16) x_s of the lane's block (2c + l / 8)
  // Q4: per 128-weight chunk c (four 32-blocks, 64 packed bytes):
  const int8_t* xq4;     // (M, kp / 128, 128) x_q in nibble order: [0, 64) the k the low nibbles hold
                         //   (block i's weights 0..15 at 16i), [64, 128) the high nibbles' (weights 16..31)
  const float* xs4;      // (M, kp / 128, 16) x_s of lane l's block (4c + l / 4)
};

inline const Layout& layout(const GemvRows& p) { return *static_cast<const Layout*>(p.layout); }

size_t layout_bytes(const GemvRows& p) {
  const int64_t M = p.a->m, kp = p.kp;
  return 64 + size_t(M) * (p.a->format == kWeightQ8 ? (kp / 64) * 16 * 8 : kp + (kp / 128) * 16 * 4);
}

void prepare(const GemvRows& p, void* scratch) {
  const int64_t M = p.a->m, kp = p.kp, B = p.blocks;
  Layout* out = static_cast<Layout*>(scratch);
  char* data = static_cast<char*>(scratch) + 64;
  *out = Layout{};
  if (p.a->format == kWeightQ8) {
    const int64_t chunks = kp / 64;
    int32_t* corr = reinterpret_cast<int32_t*>(data);
    float* xs8 = reinterpret_cast<float*>(data + M * chunks * 16 * 4);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < chunks; ++c) {  // corr: VPDPBUSD of x_q against ones, times -128
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(p.xq + m * kp + c * 64));
        _mm512_storeu_si512(corr + (m * chunks + c) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s, 7)));
        for (int l = 0; l < 16; ++l) {
          const int64_t b = (c * 64 + l * 4) / 32;
          xs8[(m * chunks + c) * 16 + l] = b < B ? p.xs[m * B + b] : 0.f;
        }
      }
    out->corr8 = corr, out->xs8 = xs8;
  } else {
    const int64_t chunks = kp / 128;
    int8_t* xq4 = reinterpret_cast<int8_t*>(data);
    float* xs4 = reinterpret_cast<float*>(data + M * kp);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < chunks; ++c) {
        for (int i = 0; i < 4; ++i) {
          std::memcpy(&xq4[m * kp + c * 128 + 16 * i], &p.xq[m * kp + c * 128 + 32 * i], 16);
          std::memcpy(&xq4[m * kp + c * 128 + 64 + 16 * i], &p.xq[m * kp + c * 128 + 32 * i + 16], 16);
        }
        for (int l = 0; l < 16; ++l) {
          const int64_t b = c * 4 + l / 4;
          xs4[(m * chunks + c) * 16 + l] = b < B ? p.xs[m * B + b] : 0.f;
        }
      }
    out->xq4 = xq4, out->xs4 = xs4;
  }
}

inline __m512bh ld_bf16(__mmask32 mk, const uint16_t* p) { return (__m512bh)_mm512_maskz_loadu_epi16(mk, p); }

// bfloat16: a tile of NT weight rows x MT activation rows, one VDPBF16PS accumulator per (row, activation)
// pair, k in order 32 at a time (masked tail; K is even, so a pair never straddles it), each sum reduced by
// reduce4's tree: every output's order is fixed by K alone, whatever the tile, M or the thread count (the
// batch invariance of kernels.h; csrc/tests/kernel_tests.cpp checks rows alone against rows in calls of 3, 7,
// 16 and 65). The 4 x 6 tile does 24 VDPBF16PS per 10 loads, as the float32 tile does with FMAs.
// Before: one dot product per (row, activation) pair with 4 accumulators, so M rows re-read each weight row
// M times from L1 and ran M reductions per row (bench/gemv_rows.py has the M = 2..512 table).
template <int NT, int MT>
inline void tile_step_bf16(const uint16_t* w, const uint16_t* x, int64_t K, int64_t k, __mmask32 mk, __m512* acc) {
  __m512bh wv[NT];
  #pragma GCC unroll 8
  for (int r = 0; r < NT; ++r) wv[r] = ld_bf16(mk, w + r * K + k);
  #pragma GCC unroll 8
  for (int c = 0; c < MT; ++c) {
    const __m512bh xv = ld_bf16(mk, x + c * K + k);
    #pragma GCC unroll 8
    for (int r = 0; r < NT; ++r) acc[r * MT + c] = _mm512_dpbf16_ps(acc[r * MT + c], wv[r], xv);
  }
}

template <int NT, int MT>
void tile_bf16(const GemvRows& p, int64_t n, int64_t m) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
  const uint16_t* x = p.xb + m * K;
  __m512 acc[NT * MT];
  #pragma GCC unroll 32
  for (int i = 0; i < NT * MT; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    #pragma GCC unroll 8
    for (int r = 0; r < NT; ++r) prefetch_l2(w + r * K + k);
    tile_step_bf16<NT, MT>(w, x, K, k, __mmask32(0xffffffffu), acc);
  }
  if (k < K) tile_step_bf16<NT, MT>(w, x, K, k, __mmask32((1u << (K - k)) - 1), acc);
  #pragma GCC unroll 8  // constant indices keep acc in registers
  for (int i = 0; i < NT * MT; i += 4) {  // 4 sums per shuffle tree; a short group repeats its last vector
    const int last = NT * MT - 1;
    alignas(16) float out[4];
    _mm_store_ps(out, reduce4(acc[i], acc[std::min(i + 1, last)], acc[std::min(i + 2, last)], acc[std::min(i + 3, last)]));
    for (int j = 0; j < 4 && i + j <= last; ++j) gemv_store(p, m + (i + j) % MT, n + (i + j) / MT, out[j]);
  }
}

// All M activation rows x weight rows n .. n + NT - 1, in tiles of 6 rows (and 5: 55 = 5 x 5 + 5 x 6, not a
// tile of 1 row, as tiles_f32 splits them).
template <int NT>
void tiles_bf16(const GemvRows& p, int64_t n) {
  constexpr int MB = 6;
  const int64_t M = p.a->m;
  int64_t smaller = (MB - M % MB) % MB;
  if (smaller * (MB - 1) > M) smaller = 0;
  int64_t m = 0;
  for (int64_t t = 0; t < smaller; ++t, m += MB - 1) tile_bf16<NT, MB - 1>(p, n, m);
  for (; m + MB <= M; m += MB) tile_bf16<NT, MB>(p, n, m);
  switch (M - m) {
    case 5: tile_bf16<NT, 5>(p, n, m); break;
    case 4: tile_bf16<NT, 4>(p, n, m); break;
    case 3: tile_bf16<NT, 3>(p, n, m); break;
    case 2: tile_bf16<NT, 2>(p, n, m); break;
    case 1: tile_bf16<NT, 1>(p, n, m); break;
  }
}

// R <= 4 sums through reduce4's tree, a short group repeating its last vector as tile_f32 does: a row summed
// alone (a range's last N % 4 rows) gets the bits it gets in a block of 4, and the ranges' ends move with the
// thread count (_mm512_reduce_add_ps's order differs: 1 vs 2 threads changed an int8 lm_head's logits).
template <int R>
inline void finish(const GemvRows& p, int64_t m, int64_t n, const __m512* acc, const float* row_scale) {
  static_assert(R >= 1 && R <= 4, "finish: 1 to 4 rows");
  alignas(16) float out[4];
  _mm_store_ps(out, reduce4(acc[0], acc[std::min(1, R - 1)], acc[std::min(2, R - 1)], acc[std::min(3, R - 1)]));
  for (int r = 0; r < R; ++r) gemv_store(p, m, n + r, row_scale ? row_scale[r] * out[r] : out[r]);
}

// int8, offset-binary u = w + 128: VPDPBUSD(corr, u, x_q) = sum w * x_q per lane exactly (corr = -128 sum x_q),
// then one convert and one FMA per 64 weights with the lanes' block scales; the row scale multiplies at the
// end. R rows at a time share the loads of x_q, corr and the scales and one reduction (int8 rows are short:
// K bytes, and R consecutive rows are one contiguous stretch of memory, prefetched ahead).
template <int R>
void rows_q8(const GemvRows& p, int64_t n) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, chunks = (K + 63) / 64;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
  for (int64_t m = 0; m < a.m; ++m) {
    const int8_t* xq = p.xq + m * p.kp;
    const int32_t* corr = layout(p).corr8 + m * (p.kp / 64) * 16;
    const float* xs = layout(p).xs8 + m * (p.kp / 64) * 16;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = c * 64;
      const __mmask64 mk = tail64(K - k);
      const __m512i xv = _mm512_loadu_si512(xq + k), cv = _mm512_loadu_si512(corr + c * 16);
      const __m512 sv = _mm512_loadu_ps(xs + c * 16);
      for (int r = 0; r < R; ++r) {
        if (m == 0) prefetch_next_block(w + R * K, c * R + r);
        const __m512i u = _mm512_maskz_loadu_epi8(mk, w + r * K + k);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cv, u, xv)), sv, acc[r]);
      }
    }
    finish<R>(p, m, n, acc, static_cast<const float*>(a.scales) + n);
  }
}

// int4: 64 packed bytes = 128 weights = four 32-blocks. Low nibbles (AND) and high nibbles (shift, AND) are the
// unsigned operands of two VPDPBUSD against x_q in nibble order; lane l then holds block (l / 4)'s partial sum,
// scaled by that block's weight scale (its group's, expanded to lanes by VPERMPS) times x_s. The mins add
// sum_g min_g * xmin_g, 16 groups per FMA.
//
// A tile of R weight rows x MT <= 4 activation rows: each chunk's nibbles and block scales are unpacked once
// for the MT rows (one row at a time unpacked them again for every activation row: 7 of 12 instructions per
// 128 weights per row; SmolLM2's shapes at M = 64, 2 threads: ~124 GFLOP/s, this tile 131-166). It serves the
// multi-row decode steps (server batches); an int4 prefill runs gemm_q4.cpp's outer-product GEMM (2x the
// multiply-adds per instruction), an int8 one stays on oneDNN's bfloat16 GEMM over a dequantized copy
// (native_decode.py `prefills`). Every output's arithmetic is the same whatever MT: the same bits at any M.
template <int R, int MT>
void tile_q4(const GemvRows& p, int64_t n, int64_t m0, __m512i scale_lanes, int groups_per_chunk,
                    int group_shift) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, G = K / a.group, half = K / 2, chunks = (half + 63) / 64;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * half;
  const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
  const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[R][MT];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int j = 0; j < MT; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t byte = c * 64, g0 = (c * 128) >> group_shift;
    const __mmask64 mk = tail64(half - byte);
    const __mmask8 ms = __mmask8((1u << std::min<int64_t>(groups_per_chunk, G - g0)) - 1);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (m0 == 0) prefetch_next_block(w + R * half, c * R + r);
      const __m512i v = _mm512_maskz_loadu_epi8(mk, w + r * half + byte);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m128 s4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(ms, sc + r * G + g0));
      const __m512 ws = _mm512_permutexvar_ps(scale_lanes, _mm512_castps128_ps512(s4));
      #pragma GCC unroll 4
      for (int j = 0; j < MT; ++j) {
        const int8_t* xq = layout(p).xq4 + (m0 + j) * p.kp + c * 128;
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
        d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xq + 64));
        const __m512 s = _mm512_mul_ps(ws, _mm512_loadu_ps(layout(p).xs4 + (m0 + j) * (p.kp / 128) * 16 + c * 16));
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r][j]);
      }
    }
  }
  #pragma GCC unroll 4
  for (int j = 0; j < MT; ++j) {
    const float* xmin = p.xmin + (m0 + j) * G;
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 mk = tail16(G - g);
      const __m512 xm = _mm512_maskz_loadu_ps(mk, xmin + g);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, mn + r * G + g)), xm, acc[r][j]);
    }
    __m512 out[R];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) out[r] = acc[r][j];
    finish<R>(p, m0 + j, n, out, nullptr);
  }
}

template <int R>
void tiles_q4(const GemvRows& p, int64_t n, __m512i scale_lanes, int groups_per_chunk, int group_shift) {
  const int64_t M = p.a->m;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_q4<R, 4>(p, n, m, scale_lanes, groups_per_chunk, group_shift);
  switch (M - m) {
    case 3: tile_q4<R, 3>(p, n, m, scale_lanes, groups_per_chunk, group_shift); break;
    case 2: tile_q4<R, 2>(p, n, m, scale_lanes, groups_per_chunk, group_shift); break;
    case 1: tile_q4<R, 1>(p, n, m, scale_lanes, groups_per_chunk, group_shift); break;
  }
}


void gemv_bf16(const GemvRows& p, int64_t n0, int64_t n1) {
  // At M = 1, 4 rows give 4 independent VDPBF16PS chains (one chain alone is bound by its latency, not memory).
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tiles_bf16<4>(p, n);
  for (; n < n1; ++n) tiles_bf16<1>(p, n);
}

void gemv_q8(const GemvRows& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows_q8<4>(p, n);
  for (; n < n1; ++n) rows_q8<1>(p, n);
}

void gemv_q4(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  // Lane l of a chunk belongs to block l / 4, of group (l / 4) * 32 / group counted from the chunk's first.
  alignas(64) int32_t lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = int32_t((l / 4) * 32 / a.group);
  const __m512i scale_lanes = _mm512_load_si512(lanes);
  const int groups_per_chunk = int(std::max<int64_t>(1, 128 / a.group));
  const int group_shift = __builtin_ctzll(uint64_t(a.group));  // a power of two (checked)
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tiles_q4<4>(p, n, scale_lanes, groups_per_chunk, group_shift);
  for (; n < n1; ++n) tiles_q4<1>(p, n, scale_lanes, groups_per_chunk, group_shift);
}

// ------------------------------------------------------------------------------------------------------
// The int4 prefill GEMM's panel (gemm_q4.cpp: the algorithm, its numerics and the scalar reference).
// ------------------------------------------------------------------------------------------------------

constexpr int kPanel = kQ4Panel;
constexpr int kMR = 4;  // x rows per micro-tile: 8 float accumulators + 8 integer ones + 2 weight vectors
                        // (6 rows: no clear difference, 460-504 vs 467-484 GFLOP/s at 64 rows)

// One panel, repacked: rows n0 .. n0 + 31 (rows past N are zeros and never stored).
struct Panel {
  // w: per 32-block b, 8 steps s, 2 halves h: 64 bytes, lane l = 4 bytes, the weights (0..15) of row
  // n0 + 16h + l at k = 32b + 4s .. 32b + 4s + 3 (s < 4: a block's low nibbles; s >= 4: its high ones).
  uint8_t* w;
  float* scales;  // (G, 32): row n0 + j's at j
  float* mins;

  void pack(const GemvArgs& a, int64_t n0) {
    const int64_t K = a.k, B = K / 32, G = K / a.group, half = K / 2, rows = std::min<int64_t>(kPanel, a.n - n0);
    std::fill(scales, scales + G * kPanel, 0.f), std::fill(mins, mins + G * kPanel, 0.f);
    const uint8_t* src = static_cast<const uint8_t*>(a.w) + n0 * half;
    // 32-bit word j of a block's 16 bytes holds k = 4j .. 4j + 3 in its low nibbles and k = 16 + 4j .. in its
    // high ones: each word moves to its row's lane (a 16 x 4 transpose of words per block and 16 rows: 4 rows
    // per vector, two VPERMT2D and a lane shuffle per output), then AND / SHIFT+AND split the nibbles. (A
    // scalar copy of the words took ~1/3 of the GEMM at 64 rows on SmolLM2's shapes.)
    const __m512i low4 = _mm512_set1_epi8(15);
    const __m512i even = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i odd = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* out = &w[b * 8 * 2 * 64];
      for (int h = 0; h < 2; ++h) {
        __m512i z[4];  // rows 16h + 4q .. + 3, one 128-bit lane each (zeros past N)
        for (int q = 0; q < 4; ++q) {
          z[q] = _mm512_setzero_si512();
          for (int l = 0; l < 4; ++l) {
            const int64_t r = 16 * h + 4 * q + l;
            if (r < rows) {
              const __m128i blk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + r * half + b * 16));
              z[q] = _mm512_mask_broadcast_i32x4(z[q], __mmask16(0xf << (4 * l)), blk);
            }
          }
        }
        const __m512i t01 = _mm512_permutex2var_epi32(z[0], even, z[1]), t23 = _mm512_permutex2var_epi32(z[0], odd, z[1]);
        const __m512i u01 = _mm512_permutex2var_epi32(z[2], even, z[3]), u23 = _mm512_permutex2var_epi32(z[2], odd, z[3]);
        const __m512i word[4] = {_mm512_shuffle_i64x2(t01, u01, 0x44), _mm512_shuffle_i64x2(t01, u01, 0xee),
                                 _mm512_shuffle_i64x2(t23, u23, 0x44), _mm512_shuffle_i64x2(t23, u23, 0xee)};
        for (int j = 0; j < 4; ++j) {
          _mm512_storeu_si512(out + (j * 2 + h) * 64, _mm512_and_si512(word[j], low4));
          _mm512_storeu_si512(out + ((4 + j) * 2 + h) * 64, _mm512_and_si512(_mm512_srli_epi16(word[j], 4), low4));
        }
      }
    }
    const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n0 * G;
    const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n0 * G;
    for (int64_t r = 0; r < rows; ++r)  // VCVTPH2PS: exact, as f16_to_f32 (whose branches cost ~1/3 of a pack)
      for (int64_t g = 0; g < G; ++g) {
        scales[g * kPanel + r] = _cvtsh_ss(sc[r * G + g]);
        mins[g * kPanel + r] = _cvtsh_ss(mn[r * G + g]);
      }
  }
};

// MR x rows from m0 against one panel: 2 x MR float accumulators (16 outputs each), per block 2 x MR integer
// sums of 8 VPDPBUSD each (their 2 x MR independent chains hide its latency).
template <int MR>
void tile(const Panel& p, const QuantizedRows& x, int64_t m0, int64_t n0, int64_t n_valid, float* y,
                 int64_t y_stride) {
  const int64_t B = x.B, G = x.G, per_group = x.group / 32, kp = x.kp;
  __m512 acc[MR][2];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512 s0 = _mm512_loadu_ps(&p.scales[g * kPanel]), s1 = _mm512_loadu_ps(&p.scales[g * kPanel + 16]);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      const uint8_t* wb = &p.w[b * 8 * 2 * 64];
      const int8_t* xb = &x.xq[m0 * kp + b * 32];
      __m512i d[MR][2];
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) d[i][0] = d[i][1] = _mm512_setzero_si512();
      #pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) {
        const __m512i w0 = _mm512_loadu_si512(wb + s * 128), w1 = _mm512_loadu_si512(wb + s * 128 + 64);
        #pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          int32_t four;
          std::memcpy(&four, xb + i * kp + 4 * s, 4);
          const __m512i xv = _mm512_set1_epi32(four);
          d[i][0] = _mm512_dpbusd_epi32(d[i][0], w0, xv);
          d[i][1] = _mm512_dpbusd_epi32(d[i][1], w1, xv);
        }
      }
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 xs = _mm512_set1_ps(x.xs[(m0 + i) * B + b]);
        acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][0]), _mm512_mul_ps(s0, xs), acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][1]), _mm512_mul_ps(s1, xs), acc[i][1]);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 m0v = _mm512_loadu_ps(&p.mins[g * kPanel]), m1v = _mm512_loadu_ps(&p.mins[g * kPanel + 16]);
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xm = _mm512_set1_ps(x.xmin[(m0 + i) * G + g]);
      acc[i][0] = _mm512_fmadd_ps(m0v, xm, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(m1v, xm, acc[i][1]);
    }
  }
  const __mmask16 k0 = n_valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << n_valid) - 1);
  const __mmask16 k1 = n_valid >= 32 ? __mmask16(0xffff) : n_valid <= 16 ? __mmask16(0) : __mmask16((1u << (n_valid - 16)) - 1);
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + (m0 + i) * y_stride + n0, k0, acc[i][0]);
    _mm512_mask_storeu_ps(y + (m0 + i) * y_stride + n0 + 16, k1, acc[i][1]);
  }
}

void gemm_q4_panel(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                   uint8_t* buffer) {
  const int64_t G = a.k / a.group;
  Panel p{buffer, reinterpret_cast<float*>(buffer + (a.k / 32) * 8 * 128), nullptr};
  p.mins = p.scales + G * kPanel;
  p.pack(a, n0);
  const int64_t M = a.m, n_valid = std::min<int64_t>(kPanel, a.n - n0);
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) tile<kMR>(p, x, m, n0, n_valid, y, y_stride);
  switch (M - m) {
    case 3: tile<3>(p, x, m, n0, n_valid, y, y_stride); break;
    case 2: tile<2>(p, x, m, n0, n_valid, y, y_stride); break;
    case 1: tile<1>(p, x, m, n0, n_valid, y, y_stride); break;
  }
}

// ------------------------------------------------------------------------------------------------------
// The int8 prefill GEMM's panel (gemm_q8.cpp: the algorithm, its numerics and the scalar reference). The panel
// holds the stored bytes u (VPDPBUSD's unsigned operand); each block's integer sums start at -128 x the x row's
// block sum (exact), as the GEMV does. kMR x rows against all 32 outputs (two vectors), as the int4 tile.
// ------------------------------------------------------------------------------------------------------

template <int MR>
void q8_tile(const uint8_t* w, const float* scales, const QuantizedRows& x, int64_t m0, int64_t n0, int64_t n_valid,
             float* y, int64_t y_stride) {
  const int64_t B = x.B, kp = x.kp;
  __m512 acc[MR][2];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = w + b * 8 * 128;
    const int8_t* xb = &x.xq[m0 * kp + b * 32];
    __m512i d[MR][2];
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) d[i][0] = d[i][1] = _mm512_set1_epi32(-128 * x.xsum[(m0 + i) * B + b]);
    #pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      const __m512i w0 = _mm512_loadu_si512(wb + s * 128), w1 = _mm512_loadu_si512(wb + s * 128 + 64);
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        std::memcpy(&four, xb + i * kp + 4 * s, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        d[i][0] = _mm512_dpbusd_epi32(d[i][0], w0, xv);
        d[i][1] = _mm512_dpbusd_epi32(d[i][1], w1, xv);
      }
    }
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xs = _mm512_set1_ps(x.xs[(m0 + i) * B + b]);
      acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][0]), xs, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][1]), xs, acc[i][1]);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(scales), s1 = _mm512_loadu_ps(scales + 16);
  const __mmask16 k0 = n_valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << n_valid) - 1);
  const __mmask16 k1 = n_valid >= 32 ? __mmask16(0xffff) : n_valid <= 16 ? __mmask16(0) : __mmask16((1u << (n_valid - 16)) - 1);
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + (m0 + i) * y_stride + n0, k0, _mm512_mul_ps(acc[i][0], s0));
    _mm512_mask_storeu_ps(y + (m0 + i) * y_stride + n0 + 16, k1, _mm512_mul_ps(acc[i][1], s1));
  }
}

void gemm_q8_panel(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                   uint8_t* panel) {
  float* scales = reinterpret_cast<float*>(panel + q8_panel_scales_offset(x.B));
  pack_q8_panel(a, n0, panel, scales, 0);
  const int64_t M = a.m, n_valid = std::min<int64_t>(kPanel, a.n - n0);
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) q8_tile<kMR>(panel, scales, x, m, n0, n_valid, y, y_stride);
  switch (M - m) {
    case 3: q8_tile<3>(panel, scales, x, m, n0, n_valid, y, y_stride); break;
    case 2: q8_tile<2>(panel, scales, x, m, n0, n_valid, y, y_stride); break;
    case 1: q8_tile<1>(panel, scales, x, m, n0, n_valid, y, y_stride); break;
  }
}

// ------------------------------------------------------------------------------------------------------
// Dequantization (dequantize.cpp): VCVTNEPS2BF16 rounds to nearest even as torch does.
// ------------------------------------------------------------------------------------------------------

inline void put16(void* out, int dtype, int64_t i, __m512 v) {
  if (dtype == kActBF16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), (__m256i)_mm512_cvtneps_pbh(v));
  } else {
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
  }
}

void dequantize_rows(const GemvArgs& a, void* out, int dtype, int64_t n0, int64_t n1) {
  const int64_t K = a.k;
  if (a.format == kWeightQ8 && K % 16 == 0) {
    const __m512i offset = _mm512_set1_epi32(128);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
      const __m512 s = _mm512_set1_ps(static_cast<const float*>(a.scales)[n]);
      for (int64_t k = 0; k < K; k += 16) {
        const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + k))), offset);
        put16(out, dtype, n * K + k, _mm512_mul_ps(_mm512_cvtepi32_ps(q), s));
      }
    }
    return;
  }
  if (a.format == kWeightQ4) {
    const __m512i low4 = _mm512_set1_epi32(15);
    const int64_t G = K / a.group;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
      const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
      const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
      for (int64_t b = 0; b < K; b += 32) {
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sc[b / a.group])), m = _mm512_set1_ps(_cvtsh_ss(mn[b / a.group]));
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + b / 2)));
        // q * s + m as a multiply and an add (not a fused multiply-add): the same roundings as the torch path
        put16(out, dtype, n * K + b, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), s), m));
        put16(out, dtype, n * K + b + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), s), m));
      }
    }
    return;
  }
  dequantize_rows_scalar(a, out, dtype, n0, n1);
}

}  // namespace

const KernelTable* avx512_vnni_kernels() {
  static const KernelTable table{
      "avx512", "avx512_vnni",
      nullptr, gemv_bf16, gemv_q8, gemv_q4, layout_bytes, prepare,
      nullptr, gemm_q4_panel, dequantize_rows,
      nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
      nullptr, nullptr, gemm_q8_panel};
  return &table;
}

}  // namespace llava_fast
