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

// Block b (k = 32b .. 32b + 31) of panel row `row` (of `rows` valid) as 32 bytes, each XOR `flip` (0: the stored
// offset-binary u, 0x80: the signed weight u - 128); weight 0 past K and past N. Asks for the row 8 blocks ahead:
// 32 rows are 32 streams, more than the hardware prefetchers follow.
inline __m256i load_q8_block(const uint8_t* src, int64_t K, int64_t B, int64_t b, int64_t row, int64_t rows,
                             uint8_t flip) {
  if (row >= rows) return _mm256_set1_epi8(char(0x80 ^ flip));
  const uint8_t* p = src + row * K + b * 32;
  if (b + 8 < B) _mm_prefetch(reinterpret_cast<const char*>(p + 8 * 32), _MM_HINT_T0);
  const __m256i flip_v = _mm256_set1_epi8(char(flip));
  if (b * 32 + 32 <= K) return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), flip_v);
  alignas(32) uint8_t t[32];  // the last, partial block: weight 0 (u = 128) past K
  std::memset(t, 0x80, 32);
  std::memcpy(t, p, K - b * 32);
  return _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)), flip_v);
}

// 8 rows of 8 32-bit words -> out[s]: word s of rows 0 .. 7. 24 shuffles where a word-by-word copy takes 64 loads
// and stores.
inline void transpose_8x8_epi32(const __m256i (&r)[8], __m256i (&out)[8]) {
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
  for (int s = 0; s < 4; ++s) {
    out[s] = _mm256_permute2x128_si256(u[s], u[4 + s], 0x20);
    out[s + 4] = _mm256_permute2x128_si256(u[s], u[4 + s], 0x31);
  }
}

// The panel's scales: rows n0 .. n0 + 31's, 0 past N.
inline void pack_q8_scales(const GemvArgs& a, int64_t n0, float* scales) {
  const int64_t rows = std::min<int64_t>(kQ8Panel, a.n - n0);
  const float* sc = static_cast<const float*>(a.scales) + n0;
  for (int64_t j = 0; j < kQ8Panel; ++j) scales[j] = j < rows ? sc[j] : 0.f;
}

// Rows n0 .. n0 + 31 of a kWeightQ8 weight into `w` k-major, each byte XOR `flip` (load_q8_block); their scales
// into `scales`. Per block and 8 rows, an 8 x 8 transpose of 32-bit words (row i's word s -> step s's lane i).
inline void pack_q8_panel(const GemvArgs& a, int64_t n0, uint8_t* w, float* scales, uint8_t flip) {
  const int64_t K = a.k, B = (K + 31) / 32, rows = std::min<int64_t>(kQ8Panel, a.n - n0);
  const uint8_t* src = static_cast<const uint8_t*>(a.w) + n0 * K;
  for (int64_t b = 0; b < B; ++b)
    for (int g = 0; g < kQ8Panel / 8; ++g) {
      __m256i r[8], out[8];
      for (int i = 0; i < 8; ++i) r[i] = load_q8_block(src, K, B, b, 8 * g + i, rows, flip);
      transpose_8x8_epi32(r, out);
      for (int s = 0; s < 8; ++s)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + b * 8 * 128 + s * 128 + g * 32), out[s]);
    }
  pack_q8_scales(a, n0, scales);
}

}  // namespace
}  // namespace llava_fast
