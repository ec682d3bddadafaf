// A CPU inference version of llava_fast/ops.py's RMSNorm with the residual add fused in front (its reference:
// ops.rms_norm_reference), one native pass over float32 or bfloat16 rows.
#pragma once

#include <cstdint>

namespace llava_fast {

// hidden = x + residual (x alone when residual is null; then hidden_out is not written), normed = weight *
// hidden / rms(hidden), rounded as ops.rms_norm_reference rounds in `dtype` (kActF32 / kActBF16). Rows of C
// values; strides in elements; normed_out and hidden_out are contiguous (rows, C).
void rms_norm_rows(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride, const void* weight,
                   float eps, int64_t rows, int64_t C, int dtype, void* normed_out, void* hidden_out, int threads);

}  // namespace llava_fast
