// The CPU-feature probe (cpu_features.h). Compiled with no ISA flags: it runs on every CPU the build targets.
// __builtin_cpu_supports is not used: GCC 12's does not know AVX-VNNI, and it does not check that the OS
// enabled the AVX-512 state (a VM or kernel may not), which XGETBV does.
#include "cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace llava_fast {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
inline unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));  // the instruction itself: no -mxsave needed
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

#if defined(__x86_64__) || defined(_M_X64)
// Linux gives a process the AMX tile data state (8 KB per thread) only on request; without it the first tile
// instruction raises SIGILL. Other kernels: no AMX.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

#if defined(__aarch64__) && defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int value = 0;
  size_t size = sizeof(value);
  return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
}
#endif

CpuFeatures probe() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;       // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;     // + opmask, ZMM0-15 upper halves, ZMM16-31
  if (!os_ymm || __get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  f.fma = fma, f.f16c = f16c;
  if (os_zmm) {
    f.avx512f = b & (1u << 16), f.avx512dq = b & (1u << 17), f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31), f.avx512_vnni = c & (1u << 11);
  }
  const bool amx_tile = d & (1u << 24), amx_bf16 = d & (1u << 22), amx_int8 = d & (1u << 25);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx_vnni = a & (1u << 4);
  if (os_zmm) f.avx512_bf16 = a & (1u << 5);
  const bool os_tiles = (xcr0 & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  if (os_zmm && os_tiles && amx_tile && amx_permitted()) f.amx_tile = true, f.amx_bf16 = amx_bf16, f.amx_int8 = amx_int8;
#elif defined(__aarch64__) && defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.neon = hw & (1ul << 1);       // HWCAP_ASIMD
  f.fp16 = hw & (1ul << 10);      // HWCAP_ASIMDHP
  f.dotprod = hw & (1ul << 20);   // HWCAP_ASIMDDP
  f.i8mm = hw2 & (1ul << 13);     // HWCAP2_I8MM
#elif defined(__aarch64__) && defined(__APPLE__)
  f.neon = true;
  f.fp16 = sysctl_flag("hw.optional.arm.FEAT_FP16");
  f.dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
#elif defined(__aarch64__)
  f.neon = true;  // another OS: ARMv8-A's Advanced SIMD only
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = probe();
  return features;
}

}  // namespace llava_fast
