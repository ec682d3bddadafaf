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
// loop below is the reference, with the same operations: every table's panel equals it bit for bit (tested).
//
// Here: the algorithm (x quantized once, panels over threads) and the scalar panel; the tables' panels
// (repack + micro-tiles) are in csrc/isa/.
#include "gemm_q4.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "convert.h"
#include "isa/kernels.h"
#include "isa/reference.h"

namespace llava_fast {
namespace {

// x quantized once per call, read by every thread. Rows are quantized on the pool's threads (each row on its own:
// the same bytes however they are split), as gemm_q8.cpp's.
struct QuantizedBuffers {
  std::vector<int8_t> xq;
  std::vector<float> xs, xmin;

  QuantizedRows build(const float* x, int64_t x_stride, int64_t M, int64_t K, int64_t group, int threads) {
    QuantizedRows r{M, K, K / 32, K / group, (K + 63) / 64 * 64, group, nullptr, nullptr, nullptr};
    xq.resize(M * r.kp), xs.resize(M * r.B), xmin.resize(M * r.G);
    const int parts = int(std::min<int64_t>(M, int64_t(threads) * 4));
    parallel_for(threads, parts, [&](int i) {
      for (int64_t m = M * i / parts; m < M * (i + 1) / parts; ++m) {
        std::fill(&xq[m * r.kp + K], &xq[m * r.kp] + r.kp, int8_t(0));  // zeros past K
        std::fill(&xmin[m * r.G], &xmin[m * r.G] + r.G, 0.f);
        quantize_activations_q8(x + m * x_stride, K, &xq[m * r.kp], &xs[m * r.B]);
        activation_group_sums(&xq[m * r.kp], &xs[m * r.B], K, group, &xmin[m * r.G]);
      }
    });
    r.xq = xq.data(), r.xs = xs.data(), r.xmin = xmin.data();
    return r;
  }
};

inline int nibble(const uint8_t* row, int64_t k) {  // weight k of a kWeightQ4 row: 0..15
  const uint8_t byte = row[(k / 32) * 16 + k % 16];
  return k % 32 < 16 ? byte & 15 : byte >> 4;
}

}  // namespace

// The reference: every output of rows n0 .. n0 + 31 on its own, the operations of the header comment in order
// (std::fma: one rounding, as the tables' vector FMAs). It needs no repacked panel.
void gemm_q4_panel_scalar(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                          uint8_t*) {
  const int64_t K = a.k, G = x.G, B = x.B;
  for (int64_t n = n0; n < std::min<int64_t>(a.n, n0 + kQ4Panel); ++n) {
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
      y[m * y_stride + n] = acc;
    }
  }
}

const char* gemm_q4_check(const GemvArgs& a) {
  const char* problem = gemv_check(a);
  if (*problem) return problem;
  if (a.format != kWeightQ4) return "gemm_q4: int4 weights only";
  if (a.x_dtype != kActF32) return "gemm_q4: x must be float32";
  return "";
}

void gemm_q4(const GemvArgs& a, int threads) {
  thread_local QuantizedBuffers buffers;
  const QuantizedRows x = buffers.build(static_cast<const float*>(a.x), a.x_stride, a.m, a.k, a.group, threads);
  float* y = static_cast<float*>(a.y);
  const auto panel = kernels().gemm_q4_panel;
  const size_t bytes = q4_panel_bytes(a.k, a.k / a.group);
  const int panels = int((a.n + kQ4Panel - 1) / kQ4Panel);
  parallel_for(threads, panels, [&](int i) {
    thread_local std::vector<uint64_t> buffer;  // each pool thread keeps its own repacked panel, grown once
    buffer.resize((bytes + 7) / 8);
    panel(a, x, int64_t(i) * kQ4Panel, y, a.y_stride, reinterpret_cast<uint8_t*>(buffer.data()));
  });
}

}  // namespace llava_fast
