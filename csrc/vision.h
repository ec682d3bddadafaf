// The CLIP vision tower's elementwise glue and attention on the CPU (vision.cpp), over the tensors the torch
// tower holds (llava_fast/model.py ClipEncoderLayer), in place or into a given output. Their references are
// ops.py's quick_gelu_reference and vision_attention_reference, which tests/test_native_vision.py compares them
// with.
#pragma once

#include <cstdint>

namespace llava_fast {

// x * sigmoid(1.702 x) over n values in place, float32 or bfloat16 (bits), in float32 and rounded once.
void vision_quick_gelu(void* x, int64_t n, bool bf16, int threads);

// Whether vision_attention runs on the active kernel table for head_dim D and this dtype.
bool vision_attention_supported(int64_t D, bool bf16);

// Non-causal attention of N images' T tokens: qkv (N, T, 3, H, D) as the tower's fused q/k/v projection writes
// it (rows of q, k, v read in place at a row stride of 3 H D), out (N, T, H, D). Both in the compute dtype.
// False (nothing written) where vision_attention_supported is false.
bool vision_attention(const void* qkv, int64_t N, int64_t T, int64_t H, int64_t D, bool bf16, void* out, int threads);

}  // namespace llava_fast
