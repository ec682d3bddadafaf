// Batch-1 (few-row) matrix-vector products for CPU decode: y (M, N) = x (M, K) @ W (N, K)^T, W in one of
// four weight formats. See gemv.cpp for the kernels; llava_fast/cpu/gemv.py holds the torch reference (the
// dequantized weight through F.linear) that they are tested against, and the packing of each format.
// Numerics: kWeightQ8 and kWeightQ4 multiply by x quantized to int8 per block of 32 along K (scale
// max|x| / 127, round half to even), as llama.cpp's Q8_0 / Q4_1 dot products do; F32 and BF16 use x as is
// (rounded to bf16 for BF16).
#pragma once

#include <cstdint>
#include <functional>

namespace llava_fast {

enum WeightFormat : int {
  kWeightF32 = 0,   // w: float (N, K)
  kWeightBF16 = 1,  // w: bfloat16 bits (N, K); x must be bfloat16 (its products are exact in fp32)
  kWeightQ8 = 2,    // w: uint8 (N, K) holding int8 weights offset-binary, u = q + 128 (q in -127..127: the
                    //   unsigned operand of VPDPBUSD); scales: float (N,); W[n, k] = scales[n] * (u[n, k] - 128).
  kWeightQ4 = 3,    // w: uint8 (N, K / 2), 16 bytes per 32 weights: byte j of a 32-block holds weight j in its
                    //   low nibble and weight j + 16 in its high nibble; scales, mins: float16 bits
                    //   (N, K / group); W[n, k] = q * scales[n, g] + mins[n, g] with q in 0..15, g = k / group
};

enum ActivationDtype : int { kActF32 = 0, kActBF16 = 1 };

struct GemvArgs {
  const void* x;          // (M, K) activations, row stride x_stride elements, dtype x_dtype
  int x_dtype;
  int64_t m, x_stride;
  const void* w;          // weights, contiguous, layout by format
  int format;
  int64_t n, k, group;    // group: Q4's group size (a power of two >= 32 dividing k); ignored otherwise
  const void* scales;     // Q8: float (N,); Q4: float16 (N, K / group)
  const void* mins;       // Q4: float16 (N, K / group)
  void* y;                // (M, N) output, row stride y_stride elements, dtype x_dtype
  int64_t y_stride;
  // float32 y only: each output rounded to bfloat16's nearest value (f32_to_bf16), as a bfloat16 model stores
  // it; done inside the threads' ranges (by the kernel where the table can), not in a pass afterwards.
  bool round_y_bf16 = false;
};

// Empty when the arguments are usable, else what is wrong (the caller raises it).
const char* gemv_check(const GemvArgs& args);
// The same for the weight's description alone (w, format, n, k, group, scales, mins; x, m and y are not read).
const char* gemv_weight_check(const GemvArgs& args);

// Runs on up to `threads` threads (a pool kept between calls; its workers spin ~100 us after each call, then
// sleep), which claim chunks of W's N rows from a shared counter. Touches no Python state.
void gemv(const GemvArgs& args, int threads);

// Runs task(c) for c in [0, chunks) on up to `threads` threads of the same pool (the caller among them): the
// native decode step (decode.cpp) splits its attention heads with it, so one set of spinning workers serves
// both and no second pool fights them for the cores.
void parallel_for(int threads, int chunks, const std::function<void(int)>& task);

// One row of x quantized as the int8 and int4 kernels read it: x_q = round(x / x_s) per block of 32 along K
// (round half to even), x_s = max|x in block| / 127; xq (K,) must be zeroed by the caller, xs has ceil(K / 32)
// entries. The same bytes from every kernel table.
void quantize_activations_q8(const float* x, int64_t K, int8_t* xq, float* xs);

// What an int4 group's min multiplies, for one quantized row: xmin[g] = sum over the group's 32-blocks b, in
// order, of x_s[b] * sum(x_q in b) (float); K a multiple of group, group of 32. xmin (K / group,) must be zeroed.
void activation_group_sums(const int8_t* xq, const float* xs, int64_t K, int64_t group, float* xmin);

// Switch the table: "best", a family or a variant (csrc/isa/kernels.h use_kernels_named); false when the name is
// unknown or the CPU cannot run it. For tests.
bool gemv_use_kernels(const char* name);

}  // namespace llava_fast
