// Helpers of the AVX-512 tables (avx512.cpp, avx512_vnni.cpp, avx512_amx.cpp; only those files include this: it
// needs their flags). Everything here has internal linkage, so no copy compiled with AVX-512 can stand in for another file's.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace llava_fast {
namespace {

// Sums of 4 vectors -> (sum a0, sum a1, sum a2, sum a3): one shuffle tree for 4 sums instead of 4 reductions.
// The GEMV tiles and attention's 4-key groups both use it, so each sum's order is fixed by this tree alone.
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline __mmask16 tail16(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }
inline __mmask64 tail64(int64_t left) { return left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1; }

// e^x, 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n (VSCALEFPS). Within
// 2 ulp of std::exp; a scalar exp per score was ~40 cycles, the largest piece of a prefill's attention (tiny
// preset, 274 tokens: 1.8M of them), and SwiGLU's 75k per 55-row chunk and layer took 6 of a prefill's 70 ms.
inline __m512 exp16(__m512 x) {
  // e^-87.3 ~ 1e-38: no denormals; above 88.7 the result is inf (2^n overflows; 100 keeps r accurate). x second:
  // VMAXPS / VMINPS return their second operand when either is NaN, so a NaN (an inf in q or K) stays NaN, as
  // in torch's softmax, instead of becoming a weight of ~0.
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), _mm512_min_ps(_mm512_set1_ps(100.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// bfloat16 rows (1,152 bytes at K = 576) and float32 ones at M = 1 prefetch into L2, 8 KB ahead. bfloat16,
// measured on a standalone stream of 226 MB (2 threads, medians of 6 interleaved rounds): 24 GB/s with an L1
// prefetch 1 KB ahead (2 KB: 23), 26 with none, 27-28 into L2 4 KB ahead, 29-33 into L2 8 KB ahead;
// the L1 hint had made it the slowest stream of the four formats (~76% of the roofline; SmolLM2 decode 0.98x
// -> 1.13-1.18x llama.cpp's F16). float32 at M = 1: equal on that stream, SmolLM2 decode 40.9-44.8 -> 42.8-46.2
// tok/s (two interleaved pairs).
constexpr int kPrefetchL2 = 8192;
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchL2, _MM_HINT_T1); }


// int8/int4 blocks of R rows: while a block is read (R streams, one line of each per step), the next block
// is prefetched linearly, one line per line read. Measured on the int8 lm_head (49152 x 576, one thread, CPU
// time): 17 GB/s, where prefetching 1 KB ahead of each row's own position gave 8.5 GB/s (those
// lines were still to be read by the other rows: prefetched twice, the next block's first lines never).
inline void prefetch_next_block(const uint8_t* next_block, int64_t line) {
  _mm_prefetch(reinterpret_cast<const char*>(next_block + line * 64), _MM_HINT_T0);
}

}  // namespace
}  // namespace llava_fast
