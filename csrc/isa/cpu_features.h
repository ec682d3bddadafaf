// What this CPU (and its operating system) lets the native kernels run: probed once, without any ISA flags.
#pragma once

namespace llava_fast {

struct CpuFeatures {
  // x86-64. The AVX ones count only when the OS saves the registers (XGETBV: XCR0 has the YMM state, and
  // for AVX-512 the opmask/ZMM states too): a kernel that disables AVX-512 leaves CPUID's bits set.
  bool avx2 = false, fma = false, f16c = false, avx_vnni = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512_vnni = false, avx512_bf16 = false;
  // AMX: CPUID's bits, XCR0's tile states (17, 18), and on Linux the process's permission to use the tile data
  // state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once by the probe; a kernel that refuses it leaves these false).
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  // aarch64 (HWCAP on Linux, sysctl hw.optional on macOS). Advanced SIMD is part of ARMv8-A.
  bool neon = false, dotprod = false, i8mm = false, fp16 = false;
};

const CpuFeatures& cpu_features();

}  // namespace llava_fast
