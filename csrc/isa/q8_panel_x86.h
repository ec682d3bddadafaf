// The int8 GEMM's panel repack (gemm_q8.cpp; layout: kernels.h) for the x86 tables (avx2.cpp, avx512_vnni.cpp):
// AVX2 only, so it compiles under either file's flags. Internal linkage: each file keeps its own copy.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace llava_fast {
namespace {

// Rows n0 .. n0 + 31 of a kWeightQ8 weight into `w` k-major, each byte XOR `flip` (0: the stored offset-binary u,
// 0x80: the signed weight u - 128), weight 0 past K and past N; their scales into `scales` (0 past N). Per block
// and 8 rows, an 8 x 8 transpose of 32-bit words (row i's word s -> step s's lane i): 24 shuffles per 256 bytes
// where a word-by-word copy takes 128 loads and stores.
inline void pack_q8_panel(const GemvArgs& a, int64_t n0, uint8_t* w, float* scales, uint8_t flip) {
  const int64_t K = a.k, B = (K + 31) / 32, rows = std::min<int64_t>(kQ8Panel, a.n - n0);
  const uint8_t* src = static_cast<const uint8_t*>(a.w) + n0 * K;
  const __m256i flip_v = _mm256_set1_epi8(char(flip)), zero_w = _mm256_set1_epi8(char(0x80 ^ flip));
  for (int64_t b = 0; b < B; ++b) {
    const bool full = b * 32 + 32 <= K;
    for (int g = 0; g < kQ8Panel / 8; ++g) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = 8 * g + i;
        // 32 rows are 32 streams, more than the hardware prefetchers follow: ask for each row 8 blocks ahead.
        if (row < rows && b + 8 < B) _mm_prefetch(reinterpret_cast<const char*>(src + row * K + (b + 8) * 32), _MM_HINT_T0);
        if (row >= rows) {
          r[i] = zero_w;
        } else if (full) {
          r[i] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + row * K + b * 32)), flip_v);
        } else {  // the last, partial block: weight 0 (u = 128) past K
          alignas(32) uint8_t t[32];
          std::memset(t, 0x80, 32);
          std::memcpy(t, src + row * K + b * 32, K - b * 32);
          r[i] = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)), flip_v);
        }
      }
      __m256i t[8], u[8];
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);      // words 0, 1 | 4, 5 of rows i, i + 1, interleaved
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);  // words 2, 3 | 6, 7
      }
      for (int q = 0; q < 2; ++q) {  // rows 4q .. 4q + 3
        u[4 * q + 0] = _mm256_unpacklo_epi64(t[4 * q], t[4 * q + 2]);      // word 0 | 4
        u[4 * q + 1] = _mm256_unpackhi_epi64(t[4 * q], t[4 * q + 2]);      // word 1 | 5
        u[4 * q + 2] = _mm256_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);  // word 2 | 6
        u[4 * q + 3] = _mm256_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);  // word 3 | 7
      }
      uint8_t* out = w + b * 8 * 128 + g * 32;
      for (int s = 0; s < 4; ++s) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + s * 128), _mm256_permute2x128_si256(u[s], u[4 + s], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (s + 4) * 128), _mm256_permute2x128_si256(u[s], u[4 + s], 0x31));
      }
    }
  }
  const float* sc = static_cast<const float*>(a.scales) + n0;
  for (int64_t j = 0; j < kQ8Panel; ++j) scales[j] = j < rows ? sc[j] : 0.f;
}

}  // namespace
}  // namespace llava_fast
