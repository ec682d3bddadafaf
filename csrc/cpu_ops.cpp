// RMSNorm (+ residual) for CPU inference in one pass (contract: cpu_ops.h).
//
// Why: in a CPU prefill the torch reference runs as 8 ATen ops (add, to(float32), pow, mean, rsqrt, mul,
// to(dtype), mul), each a pass over the activations and a dispatch, 60 times per SmolLM2-135M prefill (~5% of
// a 130-token prefill next to the GEMMs). Each row here is read once and written once; rows split over the
// GEMV pool's threads. Values are rounded where the reference stores them (bfloat16 models), so the two agree
// up to float32 summation order (tests/test_cpu_ops.py). (SwiGLU stays on ATen: its vectorised exp beats a
// scalar one here by ~10x.)
#include "cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "convert.h"
#include "gemv.h"

namespace llava_fast {
namespace {

struct Values {  // float32 or bfloat16 arrays read and written as float
  bool bf16;
  float get(const void* p, int64_t i) const {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  void put(void* p, int64_t i, float v) const {
    if (bf16) {
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    } else {
      static_cast<float*>(p)[i] = v;
    }
  }
  float round(float v) const { return bf16 ? round_to_bf16(v) : v; }
};

// Rows in chunks over the pool: ~32k values per chunk, so a short prompt stays on the calling thread.
void over_rows(int64_t rows, int64_t width, int threads, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, rows * width / 32768));
  parallel_for(chunks > 1 ? threads : 1, int(chunks), [&](int c) { body(rows * c / chunks, rows * (c + 1) / chunks); });
}

}  // namespace

void rms_norm_rows(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride, const void* weight,
                   float eps, int64_t rows, int64_t C, int dtype, void* normed_out, void* hidden_out, int threads) {
  const Values v{dtype == kActBF16};
  over_rows(rows, C, threads, [&](int64_t r0, int64_t r1) {
    std::vector<float> h(C);
    for (int64_t r = r0; r < r1; ++r) {
      double sq = 0.0;
      for (int64_t i = 0; i < C; ++i) {
        float value = v.get(x, r * x_stride + i);
        if (residual) {
          value = v.round(value + v.get(residual, r * residual_stride + i));
          v.put(hidden_out, r * C + i, value);
        }
        h[i] = value;
        sq += double(value) * value;
      }
      const float inv = 1.f / std::sqrt(float(sq / double(C)) + eps);
      for (int64_t i = 0; i < C; ++i) v.put(normed_out, r * C + i, v.get(weight, i) * v.round(h[i] * inv));
    }
  });
}

}  // namespace llava_fast
