// AVX-512 helpers shared by gemv.cpp and decode.cpp (each compiles its kernels for its own AVX-512 target).
#pragma once

#include <immintrin.h>

namespace llava_fast {

// Sums of 4 vectors -> (sum a0, sum a1, sum a2, sum a3): one shuffle tree for 4 sums instead of 4 reductions.
// The GEMV tiles and attention's 4-key groups both use it, so each sum's order is fixed by this tree alone.
__attribute__((target("avx512f,avx512dq"))) inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

}  // namespace llava_fast
