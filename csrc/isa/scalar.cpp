// The scalar table (kernels.h): plain C++, compiled without ISA flags, runs on any CPU; the reference every
// other table is tested against. The functions live beside their algorithms (reference.h says where).
#include "kernels.h"
#include "reference.h"

namespace llava_fast {

const KernelTable* scalar_kernels() {
  // The optional entries after the positional ones are set by name.
  static const KernelTable table = [] {
    KernelTable t{
        "scalar", "scalar",
        gemv_f32_scalar, gemv_bf16_scalar, gemv_q8_scalar, gemv_q4_scalar, nullptr, nullptr,
        quantize_row_q8_scalar,
        gemm_q4_panel_scalar,
        dequantize_rows_scalar,
        add_rms_norm_row_scalar, rope_scalar, store_row_scalar, swiglu_row_scalar,
        attn_dot_scalar, attn_axpy_scalar, attend_kernel_none,
        nullptr, nullptr, gemm_q8_panel_scalar};
    t.quick_gelu_row = quick_gelu_row_scalar;
    return t;
  }();
  return &table;
}

}  // namespace llava_fast
