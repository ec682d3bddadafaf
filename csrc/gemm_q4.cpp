// Prefill GEMM for int4 weights: y (M, N) = x (M, K) @ W (N, K)^T, W in gemv.h's kWeightQ4 format (16 bytes
// per 32 weights, a float16 scale and min per group), x float32 quantized to int8 per 32-block as for the GEMV.
//
// Why: the GEMV's int4 tile (gemv.cpp tile_q4) is an inner product: its lanes run along K, so every 128
// weights of every (weight row, x row) pair pay a convert, a multiply and an FMA to scale the four blocks'
// integer sums, and a reduction at the end: 23 multiply-adds per instruction. On a prompt it lost to oneDNN's
// bfloat16 GEMM over a dequantized copy, and that left SmolLM2-135M's int4 prefill at 456 tok/s where
// llama.cpp's Q4_0 (a repacked int8 GEMM) reaches 752 on this 2-core EPYC. This kernel is an outer
// product, as llama.cpp's and BLIS's are: each 32-bit lane of a vector is one output (16 weight rows), each
// VPDPBUSD adds 4 consecutive k of 16 rows times the same 4 x_q (broadcast), 64 multiply-adds, and a block's
// integer sums are scaled once per 32 k: ~46 multiply-adds per vector arithmetic instruction (loads and
// broadcasts not counted; ~23 for the tile).
//
// Layout: the weight's N rows are cut into panels of 32 (two 16-lane vectors); a thread repacks a panel into
// k-major order once per call (the nibbles as bytes: 16 rows x 4 k per 64 bytes; scales and mins as float, 32
// per group), then runs all M x rows over it, kMR at a time. No second copy of the weights is kept. A 1-row call
// (mostly the repack and the pool's wake-up) takes ~15% of a 64-row call's time on SmolLM2's shapes (0.16 vs
// 1.02 ms for its four projections), less at the prompt chunks' up to 128 rows.
//
// Numerics: per output, the blocks in K order: acc = fma(d_b, s_g * x_s, acc) with d_b the block's exact
// integer sum of q * x_q, then the groups in order: acc = fma(min_g, xmin_g, acc) (xmin as in gemv.cpp). The
// same operations for every output whatever M, the panel, the tile or the thread count: a row's result does
// not depend on the other rows (a prompt's bits do not depend on how it is split into calls). They are not the
// GEMV's bits (its lanes sum along K); both compute W . x' for the same x' (gemv.py `reference`). The scalar
// loop below is the reference, with the same operations: the tests compare the two bit for bit.
#include "gemm_q4.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "convert.h"

namespace llava_fast {
namespace {

constexpr int kPanel = 32;  // weight rows per panel: two vectors of 16 outputs
constexpr int kMR = 4;      // x rows per micro-tile: 8 float accumulators + 8 integer ones + 2 weight vectors
                            // (6 rows: no clear difference, 460-504 vs 467-484 GFLOP/s at 64 rows)

// x quantized once per call, read by every thread.
struct QuantizedRows {
  int64_t M = 0, K = 0, B = 0, G = 0, kp = 0, group = 0;
  std::vector<int8_t> xq;   // (M, kp) x_q, zeros past K
  std::vector<float> xs;    // (M, B) block scales
  std::vector<float> xmin;  // (M, G) sum over the group's blocks of x_s * sum(x_q)

  void build(const float* x, int64_t x_stride, int64_t M_, int64_t K_, int64_t group_) {
    M = M_, K = K_, group = group_, B = K / 32, G = K / group, kp = (K + 63) / 64 * 64;
    xq.assign(M * kp, 0), xs.assign(M * B, 0.f), xmin.assign(M * G, 0.f);
    for (int64_t m = 0; m < M; ++m) {
      quantize_activations_q8(x + m * x_stride, K, &xq[m * kp], &xs[m * B]);
      activation_group_sums(&xq[m * kp], &xs[m * B], K, group, &xmin[m * G]);
    }
  }
};

inline int nibble(const uint8_t* row, int64_t k) {  // weight k of a kWeightQ4 row: 0..15
  const uint8_t byte = row[(k / 32) * 16 + k % 16];
  return k % 32 < 16 ? byte & 15 : byte >> 4;
}

// The reference: every output on its own, the operations of the header comment in order.
void gemm_q4_scalar(const GemvArgs& a, const QuantizedRows& x, float* y) {
  const int64_t K = a.k, G = x.G, B = x.B;
  for (int64_t n = 0; n < a.n; ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
    const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
    const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
    for (int64_t m = 0; m < a.m; ++m) {
      const int8_t* xq = &x.xq[m * x.kp];
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        int32_t d = 0;
        for (int64_t k = b * 32; k < b * 32 + 32; ++k) d += nibble(w, k) * xq[k];
        acc = std::fma(float(d), f16_to_f32(sc[b * 32 / x.group]) * x.xs[m * B + b], acc);
      }
      for (int64_t g = 0; g < G; ++g) acc = std::fma(f16_to_f32(mn[g]), x.xmin[m * G + g], acc);
      y[m * a.y_stride + n] = acc;
    }
  }
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// One panel, repacked: rows n0 .. n0 + 31 (rows past N are zeros and never stored).
struct Panel {
  // w: per 32-block b, 8 steps s, 2 halves h: 64 bytes, lane l = 4 bytes, the weights (0..15) of row
  // n0 + 16h + l at k = 32b + 4s .. 32b + 4s + 3 (s < 4: a block's low nibbles; s >= 4: its high ones).
  std::vector<uint8_t> w;
  std::vector<float> scales, mins;  // (G, 32): row n0 + j's at j

  AVX512 void pack(const GemvArgs& a, int64_t n0) {
    const int64_t K = a.k, B = K / 32, G = K / a.group, half = K / 2, rows = std::min<int64_t>(kPanel, a.n - n0);
    w.resize(B * 8 * 2 * 64), scales.assign(G * kPanel, 0.f), mins.assign(G * kPanel, 0.f);
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
AVX512 void tile(const Panel& p, const QuantizedRows& x, int64_t m0, int64_t n0, int64_t n_valid, float* y,
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

AVX512 void panel_avx512(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y) {
  thread_local Panel p;  // each pool thread keeps its own, grown once
  p.pack(a, n0);
  const int64_t M = a.m, n_valid = std::min<int64_t>(kPanel, a.n - n0);
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) tile<kMR>(p, x, m, n0, n_valid, y, a.y_stride);
  switch (M - m) {
    case 3: tile<3>(p, x, m, n0, n_valid, y, a.y_stride); break;
    case 2: tile<2>(p, x, m, n0, n_valid, y, a.y_stride); break;
    case 1: tile<1>(p, x, m, n0, n_valid, y, a.y_stride); break;
  }
}

}  // namespace

const char* gemm_q4_check(const GemvArgs& a) {
  const char* problem = gemv_check(a);
  if (*problem) return problem;
  if (a.format != kWeightQ4) return "gemm_q4: int4 weights only";
  if (a.x_dtype != kActF32) return "gemm_q4: x must be float32";
  return "";
}

void gemm_q4(const GemvArgs& a, int threads) {
  thread_local QuantizedRows x;
  x.build(static_cast<const float*>(a.x), a.x_stride, a.m, a.k, a.group);
  float* y = static_cast<float*>(a.y);
  if (std::strcmp(gemv_isa(), "avx512") != 0) {
    gemm_q4_scalar(a, x, y);
    return;
  }
  const QuantizedRows* xp = &x;  // by address: the pool's workers have their own (empty) thread_locals
  const int panels = int((a.n + kPanel - 1) / kPanel);
  parallel_for(threads, panels, [&](int i) { panel_avx512(a, *xp, int64_t(i) * kPanel, y); });
}

}  // namespace llava_fast
