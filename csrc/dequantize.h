// Dequantize a packed weight of gemv.h's formats into a dense float32 or bfloat16 (N, K) matrix, for CPU
// prefill: a prompt of T > 8 tokens is a GEMM, which oneDNN runs on the dense weight (see dequantize.cpp).
#pragma once

#include "gemv.h"

namespace llava_fast {

// a.w / format (kWeightQ8 or kWeightQ4) / n / k / group / scales / mins describe the weight (a.x, a.m, a.y are ignored); out: (N, K)
// contiguous, out_dtype kActF32 or kActBF16. Rows split over `threads` threads of the GEMV pool.
void dequantize(const GemvArgs& a, void* out, int out_dtype, int threads);

}  // namespace llava_fast
