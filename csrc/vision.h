// The CLIP vision tower's elementwise glue on the CPU (vision.cpp), in place over the tensors the torch tower
// holds (llava_fast/model.py ClipMLP). The reference is ops.py's quick_gelu_reference, which
// tests/test_native_vision.py compares it with.
#pragma once

#include <cstdint>

namespace llava_fast {

// x * sigmoid(1.702 x) over n values in place, float32 or bfloat16 (bits), in float32 and rounded once.
void vision_quick_gelu(void* x, int64_t n, bool bf16, int threads);

}  // namespace llava_fast
