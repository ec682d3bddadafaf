// The table of instruction-set-specific inner loops behind the native CPU code.
//
// The algorithms (tiling over rows and threads, activation quantization layouts, the bit-invariance rules,
// input checks, the decode and prefill drivers) live once in gemv.cpp, gemm_q4.cpp, dequantize.cpp and
// decode.cpp, beside the scalar reference of every kernel. What changes with the instruction set is only the
// loop over one row or one panel; those loops sit behind one KernelTable per instruction set, one source file
// per table, each compiled with its own flags (CMakeLists.txt) and nothing else compiled with any:
//   scalar.cpp       plain C++: the reference tables are tested against (the functions live beside their
//                    algorithms; this file only lists them)
//   avx2.cpp         AVX2 + FMA + F16C (x86-64-v3); compiled twice: avx2 (VPMADDUBSW for the int8/int4 dot
//                    products) and avx2_vnni (+ AVX-VNNI: VPDPBUSD on ymm)
//   avx512.cpp       AVX-512 F/BW/VL/DQ (Skylake-SP and later): float32 GEMV, activation quantization, decode
//                    glue and attention; int8/int4/bfloat16 come from the AVX2 table ...
//   avx512_vnni.cpp  ... unless the CPU also has AVX512_VNNI and AVX512_BF16 (Cooper Lake, Sapphire Rapids,
//                    Zen 4): then VPDPBUSD / VDPBF16PS kernels on zmm
//   avx512_amx.cpp   + AMX-TILE / AMX-BF16 (Sapphire Rapids and later): the bfloat16 GEMV/GEMM and the
//                    attention over bfloat16 K/V caches on tiles (TDPBF16PS), and with AMX-INT8 the int8
//                    prefill GEMM's larger calls (TDPBSSD); the rest is avx512_vnni's
//   neon.cpp         ARMv8.2-A + dotprod (SDOT) for int8/int4, FMLA for float32/bfloat16
// cpu_features.cpp probes the CPU once (CPUID + XGETBV on x86, HWCAP / sysctl on aarch64) and dispatch.cpp
// picks the best table it supports; LLAVA_FAST_CPU_ISA forces a lower one.
//
// Contract of every table (tested by csrc/tests/kernel_tests.cpp against scalar on odd shapes):
//  - within a table, an output's arithmetic is fixed by K (and the group) alone: the same bits whatever the
//    number of rows in the call, the thread count or how a prompt is split into calls;
//  - integer parts (activation quantization bytes, each 32-block's integer dot product, int4 GEMM panel and
//    dequantization, which are specified operation by operation) equal scalar exactly;
//  - floating sums (which each table orders by its vector width) agree with scalar within a relative
//    1e-5 of the output's scale (the driver's tolerance; measured ~1e-6 at K = 4096).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../gemv.h"

namespace llava_fast {

// One GEMV call's inputs as the row kernels read them (gemv.cpp builds it once per call, for all N rows).
// The int8 and int4 formats take x quantized to int8 per block of 32 along K (x_s = max|x in block| / 127,
// x_q = round(x / x_s), ties to even), as llama.cpp's Q8_0 / Q4_1 dot products do.
struct GemvRows {
  const GemvArgs* a;
  const float* xf;      // (M, K) float32, row stride K (F32; Q8/Q4 before quantization)
  const uint16_t* xb;   // (M, K) x rounded to bfloat16, bits, row stride K (BF16)
  const float* xbf;     // (M, K) the same values as float32 (BF16: kernels that widen instead of VDPBF16PS)
  float* yf;            // (M, N) float32 results (row stride N) when y is bfloat16; else null
  int64_t blocks, kp;   // Q8/Q4: B = ceil(K / 32) blocks; kp = row length of xq, a multiple of 128, zeros past K
  const int8_t* xq;     // (M, kp) x_q in K order
  const float* xs;      // (M, B) x_s per block
  const float* xmin;    // Q4: (M, K / group) sum over the group's blocks of x_s * sum(x_q) (what a min multiplies)
  const void* layout;   // a table's own layout of x_q (gemv_prepare), or null
};

// Where a GEMV writes output (m, n): float32 y, or the float32 buffer rounded to bfloat16 afterwards.
static inline void gemv_store(const GemvRows& p, int64_t m, int64_t n, float v) {
  if (p.yf) {
    p.yf[m * p.a->n + n] = v;
  } else {
    static_cast<float*>(p.a->y)[m * p.a->y_stride + n] = v;
  }
}

// x rows quantized once per int4 / int8 GEMM call (gemm_q4.cpp, gemm_q8.cpp), read by every thread.
struct QuantizedRows {
  int64_t M, K, B, G, kp, group;  // kp: row length of xq (a multiple of 32; int4: of 64), zeros past K
  const int8_t* xq;               // (M, kp)
  const float* xs;                // (M, B)
  const float* xmin;              // int4: (M, G)
  const int32_t* xsum = nullptr;  // int8: (M, B) sum of a block's x_q (what the offset-binary weight's 128 multiplies)
  const int16_t* xq16 = nullptr;  // int8, tables with gemm_q8_x16: xq widened to int16, (M, kp)
};

// The int4 GEMM's weight panel: 32 rows repacked k-major (gemm_q4.cpp says why). Per 32-block b and step s
// (0..7; s < 4: the block's low nibbles k = 32b + 4s .. + 3, s >= 4: its high ones k = 32b + 16 + 4(s - 4) ..),
// 128 bytes: row j's 4 weights (0..15, one byte each) at 4j. Then scales and mins as float, (G, 32).
constexpr int kQ4Panel = 32;
static inline size_t q4_panel_bytes(int64_t K, int64_t G) { return size_t(K / 32) * 8 * 128 + size_t(G) * kQ4Panel * 8; }

// The int8 GEMM's weight panel: 32 rows repacked k-major. Per 32-block b (B = ceil(K / 32)) and step s (0..7:
// k = 32b + 4s .. + 3), 128 bytes: row j's 4 weights at 4j (zeros past K and past N; which byte encoding, the
// stored offset-binary u or the signed u - 128, is the table's). A table with gemm_q8_x16 holds the signed weights
// as int16 instead: per block, 16 steps of 2 k, row j's pair at 4j (256 bytes a step). Then the rows' scales as
// float (32).
constexpr int kQ8Panel = 32;
static inline size_t q8_panel_scales_offset(int64_t B) { return size_t(B) * 16 * 128; }  // room for the int16 one
static inline size_t q8_panel_bytes(int64_t K) { return q8_panel_scales_offset((K + 31) / 32) + kQ8Panel * 4; }

using GemvRowsFn = void (*)(const GemvRows& p, int64_t n0, int64_t n1);
using GemmPanelFn = void (*)(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride,
                             uint8_t* panel);
using AttendFn = void (*)(const float* q, int64_t q_stride, int nb, const char* k, const char* v, int64_t pos_bytes,
                          int64_t T0, float scale, float* scores, float* o, int64_t o_stride);

// Many queries of one cache row and KV head that share their first key (a prompt chunk's rows, times the
// query heads of a GQA group): query i (at q[i], out o[i]) sees keys 0 .. lens[i] - 1. Each key and value is
// read once per call instead of once per block of AttendFn, and every query's arithmetic is AttendFn's alone
// (bit for bit). scratch: n * (max(lens) + 1) floats.
using AttendManyFn = void (*)(const float* const* q, const int64_t* lens, float* const* o, int n, const char* k,
                              const char* v, int64_t pos_bytes, float scale, float* scratch);

// A block-of-queries attention kernel for one head_dim and cache dtype; fn null: the generic per-row loop.
struct AttendKernel {
  AttendFn fn;
  int rows;  // queries per block
  AttendManyFn many = nullptr;  // null: blocks of `rows` through fn
  // q and p rounded to bfloat16 for bfloat16 products (the AMX table): within 5e-3 of the output's scale of the
  // scalar loop, where the float32 kernels are within 1e-5 (csrc/tests/kernel_tests.cpp).
  bool bf16_products = false;
  // `many` keeps its own scores within L2 however many queries a call has (the AMX table: groups of queries
  // over K/V panels built once per call), so a caller passes a prompt chunk's queries of a KV head in one call;
  // false: the caller bounds a call's queries x keys (decode.cpp).
  bool bounds_scores = false;
};

struct KernelTable {
  const char* name;     // "scalar", "avx2", "avx512", "neon": the family LLAVA_FAST_CPU_ISA names
  const char* variant;  // the exact kernels, e.g. "avx2+avx_vnni"

  // GEMV: outputs n0 .. n1 - 1 of every x row, one function per weight format (gemv.h).
  GemvRowsFn gemv_f32, gemv_bf16, gemv_q8, gemv_q4;
  // Optional: bytes of the table's own x_q layout for this call, and building it into `scratch`
  // (p.layout = scratch afterwards). Null: the kernels read xq / xs in K order.
  size_t (*gemv_layout_bytes)(const GemvRows& p);
  void (*gemv_prepare)(const GemvRows& p, void* scratch);

  // One row of x quantized (gemv.h quantize_activations_q8): the same bytes in every table.
  void (*quantize_row_q8)(const float* x, int64_t K, int8_t* xq, float* xs);

  // int4 GEMM: pack rows n0 .. n0 + 31 into `panel` (q4_panel_bytes), then all M rows of x against it into y.
  // Bit for bit the scalar panel's result.
  GemmPanelFn gemm_q4_panel;

  // Dense rows n0 .. n1 - 1 of an int8/int4 weight (dequantize.h), float32 or bfloat16: bit for bit scalar's.
  void (*dequantize_rows)(const GemvArgs& a, void* out, int out_dtype, int64_t n0, int64_t n1);

  // Decode glue (decode.cpp): one row each, float32 activations, `bf16` rounds as a bfloat16 model stores.
  void (*add_rms_norm_row)(const float* x, float* h, const void* weight, float eps, int64_t C, float* out, bool bf16);
  void (*rope)(float* x, int64_t count, int64_t D, const float* cos_row, const float* sin_row, bool bf16);
  void (*store_row)(void* dst, const float* src, int64_t n, bool bf16);
  void (*swiglu_row)(const float* gate, const float* up, float* out, int64_t I, bool bf16);
  // Attention: q . k_t and out += p * v_t over one head (k, v float32 or bfloat16 bits), and optionally a
  // register-blocked kernel for a block of consecutive queries.
  float (*attn_dot)(const float* q, const void* k, bool bf16, int64_t D);
  void (*attn_axpy)(float* out, float p, const void* v, bool bf16, int64_t D);
  AttendKernel (*attend_kernel)(int64_t D, bool bf16);

  // Optional: bytes of the bfloat16 kernel's own layout of x_b for this call, and building it into `scratch`
  // (p.layout = scratch afterwards; the AMX table's B tiles). Null: gemv_bf16 reads xb in K order.
  // The prepare builds x rows m0 .. m1 - 1 into their place in the layout (m0 a multiple of
  // gemv_bf16_prepare_rows, m1 too or M), so a caller may split a prompt's rows over threads.
  size_t (*gemv_bf16_layout_bytes)(const GemvRows& p);
  void (*gemv_bf16_prepare)(const GemvRows& p, void* scratch, int64_t m0, int64_t m1);

  // int8 GEMM (gemm_q8.cpp): pack rows n0 .. n0 + 31 into `panel` (q8_panel_bytes), then all M rows of x
  // against it into y. Bit for bit the scalar panel's result.
  GemmPanelFn gemm_q8_panel;

  // Optional: the float32 GEMV's own layout of x for this call (0 bytes: none, the row kernels read xf) and
  // building it into `scratch` (p.layout = scratch afterwards): the AVX-512 prompt GEMM's lane-major x. With a
  // layout, gemv.cpp starts every thread's range of weight rows at a multiple of gemv_f32_cols (the GEMM's
  // panel width). The bits of every output stay the row kernels'.
  size_t (*gemv_f32_layout_bytes)(const GemvRows& p);
  void (*gemv_f32_prepare)(const GemvRows& p, void* scratch);
  int gemv_f32_cols;

  // gemv_bf16 writes a bfloat16 y itself (rounded as f32_to_bf16, convert.h), so gemv.cpp gives it no float32
  // y buffer (p.yf stays null) and rounds nothing afterwards, and it does GemvArgs::round_y_bf16 itself; its
  // prepare also reads a float32 x (p.xf, row stride K; p.xb null), rounding as f32_to_bf16. The AMX table,
  // whose y store transposes a tile anyway: a separate rounding pass re-read M x N floats (25-35% of its
  // 128-row calls at SmolLM2's shapes), and gemv.cpp's conversion of x ran on one thread.
  bool gemv_bf16_writes_y = false;

  // The int8 GEMM's panel reads QuantizedRows::xq16 (gemm_q8.cpp builds it only for such a table).
  bool gemm_q8_x16 = false;

  // Optional: a second int8 GEMM panel (gemm_q8_panel's contract) that gemm_q8.cpp runs instead for calls of at
  // least gemm_q8_tiles_min_rows rows and K >= gemm_q8_tiles_min_k: the AMX table's tiles, which lose to its
  // VNNI panel below either (avx512_amx.cpp gives the figures).
  GemmPanelFn gemm_q8_tiles = nullptr;
  int64_t gemm_q8_tiles_min_rows = 0, gemm_q8_tiles_min_k = 0;

  // Rows per unit of gemv_bf16_prepare's layout (the AMX table's B tiles hold 16 x rows each).
  int gemv_bf16_prepare_rows = 1;

  // Optional (0: decode.cpp's 128): rows per prompt chunk for a bfloat16 model whose linears are all bfloat16,
  // where gemv_bf16's cost per row falls with the rows up to it (the AMX table: 512, avx512_amx.cpp).
  int64_t gemv_bf16_prompt_rows = 0;

  // Optional (null: the scalar loop): the CLIP tower's activation over n float32 or bfloat16 values in place,
  // x * sigmoid(1.702 x) in float32 rounded once (vision.cpp).
  void (*quick_gelu_row)(void* x, int64_t n, bool bf16) = nullptr;
};

// The tables this build holds (null where not compiled for this architecture or compiler). The avx512 one
// is assembled by dispatch.cpp from avx512.cpp's part and either avx512_vnni.cpp's or the AVX2 table's.
const KernelTable* scalar_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx2_vnni_kernels();
const KernelTable* avx512_base_kernels();   // avx512.cpp's own entries; the integer/bf16 ones null
const KernelTable* avx512_vnni_kernels();   // avx512_vnni.cpp's entries: bf16, q8, q4, gemm_q4, dequantize
const KernelTable* avx512_amx_kernels();    // avx512_amx.cpp's entries: bf16 and its layout
const KernelTable* neon_kernels();

// This thread's float scratch of at least `floats`, 64-byte aligned, grown when a call needs more and kept (the
// pool's threads live as long as the process): the float32 prompt GEMMs' weight panels (avx2.cpp, avx512.cpp).
// Defined in dispatch.cpp, which is compiled without ISA flags, so no table's code is shared through it.
float* thread_panel_f32(size_t floats);

// ---- Selection (dispatch.cpp) ---------------------------------------------------------------------------

// The active table: the best the CPU supports, or what LLAVA_FAST_CPU_ISA names (read at first use; an
// unusable value is an error raised by select_kernels_from_env at import, see module.cpp).
const KernelTable& kernels();

struct KernelChoice {
  const char* name;     // as LLAVA_FAST_CPU_ISA / use_kernels accept it: a family or an exact variant
  const KernelTable* table;  // null when the build does not hold it
  const char* missing;  // "" when the CPU runs it, else which CPU features (or build support) it lacks
};
// Every family and variant of this build's architecture, best first (the test driver runs each usable one).
int kernel_choices(KernelChoice* out, int capacity);

// Switch the active table: "best" (the probe's choice, capped by LLAVA_FAST_CPU_ISA), a family ("avx2": its
// best variant this CPU runs) or an exact variant ("avx2_vnni"). Returns "" or why not (the missing feature).
const char* use_kernels_named(const char* name);

// "" or the problem with LLAVA_FAST_CPU_ISA (unknown name, or a table the CPU cannot run).
const char* kernels_env_problem();

}  // namespace llava_fast
