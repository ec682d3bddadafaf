// The prefill GEMM for int8 weights (gemm_q8.cpp): y (M, N) = x (M, K) @ W (N, K)^T, W in gemv.h's kWeightQ8
// format, x float32 quantized to int8 per block of 32 along K as for the GEMV, y float32. Each output's
// arithmetic is fixed by K alone (the same bits at any M, thread count or split of the rows into calls, and in
// every kernel table), but it is not the GEMV's: decode.cpp uses it for prompt rows only.
#pragma once

#include "gemv.h"

namespace llava_fast {

// Empty when the arguments are usable (gemv_check, an int8 weight, float32 x), else what is wrong.
const char* gemm_q8_check(const GemvArgs& args);

// Runs on up to `threads` threads of gemv.cpp's pool.
void gemm_q8(const GemvArgs& args, int threads);

}  // namespace llava_fast
