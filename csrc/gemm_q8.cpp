// Prefill GEMM for int8 weights: y (M, N) = x (M, K) @ W (N, K)^T, W in gemv.h's kWeightQ8 format (one byte per
// weight, offset-binary, a float scale per row), x float32 quantized to int8 per 32-block as for the GEMV.
//
// Why: the GEMV's int8 kernels are inner products (lanes along K): every 32 weights of every (weight row, x row)
// pair pay an integer dot product, a convert and an FMA (8 lanes of partial sums each), and a reduction at the
// end. Run over a prompt's rows they lost to the torch prefill (oneDNN's GEMM on a dequantized copy) from ~200
// rows on, so int8 models prefilled through torch at 0.4-0.7x llama.cpp's Q8_0. This kernel is an outer product,
// as gemm_q4.cpp's: each 32-bit lane is one output (a weight row), each VPDPBUSD adds 4 consecutive k of 8 or 16
// rows times the same 4 x_q (broadcast), and a block's integer sums are converted and scaled once per 32 k: 8
// vector dot products per convert + FMA instead of 1.
//
// Layout: the weight's N rows are cut into panels of 32 (kQ8Panel); a thread repacks a panel k-major once per
// call (kernels.h), then runs all M x rows over it, a few at a time. No second copy of the weights is kept.
//
// Numerics: per output, the blocks in K order: acc = fma(d_b, x_s[b], acc) with d_b the block's exact integer
// sum of w * x_q (w = u - 128), then y = acc * scale[n]. The same operations for every output whatever M, the
// tile, the table or the thread count: a row's result does not depend on the other rows, and every table's panel
// equals the scalar one below bit for bit (tested). They are not the GEMV's bits (its lanes sum along K); both
// compute W . x' for the same x' (gemv.py `reference`).
#include "gemm_q8.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "isa/kernels.h"
#include "isa/reference.h"

namespace llava_fast {

// The reference: every output of rows n0 .. n0 + 31 on its own, the operations of the header comment in order
// (std::fma: one rounding, as the tables' vector FMAs). It needs no repacked panel.
void gemm_q8_panel_scalar(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                          uint8_t*) {
  const int64_t K = a.k, B = x.B;
  for (int64_t n = n0; n < std::min<int64_t>(a.n, n0 + kQ8Panel); ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
    for (int64_t m = 0; m < a.m; ++m) {
      const int8_t* xq = &x.xq[m * x.kp];
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        int32_t d = 0;
        for (int64_t k = b * 32; k < std::min(K, b * 32 + 32); ++k) d += (int32_t(w[k]) - 128) * xq[k];
        acc = std::fma(float(d), x.xs[m * B + b], acc);
      }
      y[m * y_stride + n] = acc * static_cast<const float*>(a.scales)[n];
    }
  }
}

const char* gemm_q8_check(const GemvArgs& a) {
  const char* problem = gemv_check(a);
  if (*problem) return problem;
  if (a.format != kWeightQ8) return "gemm_q8: int8 weights only";
  if (a.x_dtype != kActF32) return "gemm_q8: x must be float32";
  return "";
}

namespace {

// x quantized once per call, read by every thread; xsum: what the offset-binary weight's 128 multiplies; xq16
// instead of xsum: xq widened for a table whose panel multiplies signed int16 (kernels.h gemm_q8_x16). Rows are
// quantized on the pool's threads (each row on its own: the same bytes however they are split): on one thread this
// took ~12 of the ~60 ms SmolLM2-135M's projections take at 127 rows on the AVX-VNNI table (Xeon, 2 threads).
struct QuantizedBuffers {
  std::vector<int8_t> xq;
  std::vector<float> xs;
  std::vector<int32_t> xsum;
  std::vector<int16_t> xq16;

  QuantizedRows build(const float* x, int64_t x_stride, int64_t M, int64_t K, bool wide, int threads) {
    const int64_t B = (K + 31) / 32;
    QuantizedRows r{M, K, B, 0, B * 32, 32, nullptr, nullptr, nullptr, nullptr};
    xq.resize(M * r.kp), xs.resize(M * B);
    if (wide) {
      xq16.resize(M * r.kp);
    } else {
      xsum.resize(M * B);
    }
    const int64_t kp = r.kp;
    const int parts = int(std::min<int64_t>(M, int64_t(threads) * 4));
    parallel_for(threads, parts, [&](int i) {
      for (int64_t m = M * i / parts; m < M * (i + 1) / parts; ++m) {
        int8_t* q = &xq[m * kp];
        std::fill(q + K, q + kp, int8_t(0));  // zeros past K
        quantize_activations_q8(x + m * x_stride, K, q, &xs[m * B]);
        if (wide) {  // the int16 panel's weights are signed: no offset to correct, no xsum
          int16_t* q16 = &xq16[m * kp];
          for (int64_t k = 0; k < kp; ++k) q16[k] = q[k];
          continue;
        }
        for (int64_t b = 0; b < B; ++b) {
          int32_t sum = 0;
          for (int j = 0; j < 32; ++j) sum += q[b * 32 + j];
          xsum[m * B + b] = sum;
        }
      }
    });
    r.xq = xq.data(), r.xs = xs.data();
    r.xsum = wide ? nullptr : xsum.data(), r.xq16 = wide ? xq16.data() : nullptr;
    return r;
  }
};

}  // namespace

void gemm_q8(const GemvArgs& a, int threads) {
  thread_local QuantizedBuffers buffers;
  const KernelTable& t = kernels();
  const QuantizedRows x = buffers.build(static_cast<const float*>(a.x), a.x_stride, a.m, a.k, t.gemm_q8_x16, threads);
  float* y = static_cast<float*>(a.y);
  const bool tiles = t.gemm_q8_tiles && a.m >= t.gemm_q8_tiles_min_rows && a.k >= t.gemm_q8_tiles_min_k;
  const auto panel = tiles ? t.gemm_q8_tiles : t.gemm_q8_panel;
  const size_t bytes = q8_panel_bytes(a.k);
  const int panels = int((a.n + kQ8Panel - 1) / kQ8Panel);
  parallel_for(threads, panels, [&](int i) {
    thread_local std::vector<uint64_t> buffer;  // each pool thread keeps its own repacked panel, grown once
    buffer.resize((bytes + 7) / 8);
    panel(a, x, int64_t(i) * kQ8Panel, y, a.y_stride, reinterpret_cast<uint8_t*>(buffer.data()));
  });
}

}  // namespace llava_fast
