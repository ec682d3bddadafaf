// What this CPU (and its operating system) lets the native kernels run: probed once, without any ISA flags.
#pragma once

namespace llava_fast {

struct CpuFeatures {
  // x86-64. The AVX ones count only when the OS saves the registers (XGETBV: XCR0 has the YMM state, and
  // for AVX-512 the opmask/ZMM states too): a kernel that disables AVX-512 leaves CPUID's bits set.
  bool avx2 = false, fma = false, f16c = false, avx_vnni = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512_vnni = false, avx512_bf16 = false;
  // aarch64 (HWCAP on Linux, sysctl hw.optional on macOS). Advanced SIMD is part of ARMv8-A.
  bool neon = false, dotprod = false, i8mm = false, fp16 = false;
};

const CpuFeatures& cpu_features();

}  // namespace llava_fast
