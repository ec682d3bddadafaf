// The scalar reference of every kernel of kernels.h. Each lives beside its algorithm (gemv.cpp, gemm_q4.cpp,
// gemm_q8.cpp, dequantize.cpp, decode.cpp, vision.cpp), compiled without ISA flags; scalar.cpp lists them as the scalar
// table, and the other tables point at them for what they do not vectorise.
#pragma once

#include "kernels.h"

namespace llava_fast {

// gemv.cpp
void gemv_f32_scalar(const GemvRows& p, int64_t n0, int64_t n1);
void gemv_bf16_scalar(const GemvRows& p, int64_t n0, int64_t n1);
void gemv_q8_scalar(const GemvRows& p, int64_t n0, int64_t n1);
void gemv_q4_scalar(const GemvRows& p, int64_t n0, int64_t n1);
void quantize_row_q8_scalar(const float* x, int64_t K, int8_t* xq, float* xs);
// gemm_q4.cpp
void gemm_q4_panel_scalar(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                          uint8_t* panel);
// gemm_q8.cpp
void gemm_q8_panel_scalar(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                          uint8_t* panel);
// dequantize.cpp
void dequantize_rows_scalar(const GemvArgs& a, void* out, int out_dtype, int64_t n0, int64_t n1);
// decode.cpp
void add_rms_norm_row_scalar(const float* x, float* h, const void* weight, float eps, int64_t C, float* out, bool bf16);
void rope_scalar(float* x, int64_t count, int64_t D, const float* cos_row, const float* sin_row, bool bf16);
void store_row_scalar(void* dst, const float* src, int64_t n, bool bf16);
void swiglu_row_scalar(const float* gate, const float* up, float* out, int64_t I, bool bf16);
float attn_dot_scalar(const float* q, const void* k, bool bf16, int64_t D);
void attn_axpy_scalar(float* out, float p, const void* v, bool bf16, int64_t D);
AttendKernel attend_kernel_none(int64_t D, bool bf16);
// vision.cpp
void quick_gelu_row_scalar(void* x, int64_t n, bool bf16);

}  // namespace llava_fast
