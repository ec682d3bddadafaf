// Which kernel table runs (kernels.h): the best this CPU supports, chosen once, or the one LLAVA_FAST_CPU_ISA
// names. Compiled with no ISA flags; it only reads cpu_features() and copies function pointers.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>

#include "cpu_features.h"
#include "kernels.h"

namespace llava_fast {

// The tables a build for another architecture (or an older compiler) does not compile.
#if !defined(LLAVA_FAST_HAVE_X86_TABLES)
const KernelTable* avx2_kernels() { return nullptr; }
const KernelTable* avx512_base_kernels() { return nullptr; }
const KernelTable* avx512_vnni_kernels() { return nullptr; }
#endif
#if !defined(LLAVA_FAST_HAVE_AMX_TABLE)
const KernelTable* avx512_amx_kernels() { return nullptr; }
#endif
#if !defined(LLAVA_FAST_HAVE_AVX2_VNNI)
const KernelTable* avx2_vnni_kernels() { return nullptr; }
#endif
#if !defined(LLAVA_FAST_HAVE_NEON_TABLE)
const KernelTable* neon_kernels() { return nullptr; }
#endif

namespace {

// The AMX table's attention: its tile kernels for bfloat16 K/V caches at head_dim 32, 64, 96, 128; else
// avx512.cpp's (float32 caches and other head dims).
AttendKernel attend_kernel_amx_or_avx512(int64_t D, bool bf16) {
  const AttendKernel tiles = avx512_amx_kernels()->attend_kernel(D, bf16);
  return tiles.many ? tiles : avx512_base_kernels()->attend_kernel(D, bf16);
}

// The AVX-512 table: avx512.cpp's entries, with the int8/int4/bfloat16 ones from avx512_vnni.cpp where the CPU
// has AVX512_VNNI + AVX512_BF16, else from the AVX2 table (Skylake-SP and Cascade Lake: AVX-512 F/BW/VL/DQ
// without BF16; AVX2 and FMA are on every AVX-512 CPU).
KernelTable combine(const KernelTable& base, const KernelTable& integer, const char* variant) {
  KernelTable t = base;
  t.variant = variant;
  t.gemv_bf16 = integer.gemv_bf16, t.gemv_q8 = integer.gemv_q8, t.gemv_q4 = integer.gemv_q4;
  t.gemv_layout_bytes = integer.gemv_layout_bytes, t.gemv_prepare = integer.gemv_prepare;
  t.gemv_bf16_layout_bytes = integer.gemv_bf16_layout_bytes, t.gemv_bf16_prepare = integer.gemv_bf16_prepare;
  t.gemv_bf16_prepare_rows = integer.gemv_bf16_prepare_rows;
  t.gemm_q4_panel = integer.gemm_q4_panel, t.dequantize_rows = integer.dequantize_rows;
  t.gemm_q8_panel = integer.gemm_q8_panel, t.gemm_q8_x16 = integer.gemm_q8_x16;
  return t;
}

struct Choice {
  const char* name;
  const char* family;
  const KernelTable* table;
  std::string missing;
};

// The names of the features whose flag is false, comma-separated ("" when none is missing).
std::string join_missing(std::initializer_list<std::pair<bool, const char*>> needs) {
  std::string out;
  for (const auto& need : needs)
    if (!need.first) out += (out.empty() ? "" : ", ") + std::string(need.second);
  return out;
}

std::string join(const std::string& a, const std::string& b) { return a.empty() ? b : b.empty() ? a : a + ", " + b; }

// Best first. An entry whose table this build lacks says so in `missing`.
struct Choices {
  Choice list[8];
  int count = 0;
  KernelTable avx512_amx, avx512_vnni, avx512_core;

  Choices() {
    const CpuFeatures& f = cpu_features();
    auto add = [&](const char* name, const char* family, const KernelTable* t, std::string missing) {
      if (!t && missing.empty()) missing = "not compiled into this build";
      list[count++] = Choice{name, family, t, missing};
    };
#if defined(__x86_64__) || defined(_M_X64)
    const std::string avx2 = join_missing({{f.avx2, "avx2"}, {f.fma, "fma"}, {f.f16c, "f16c"}});
    const std::string avx512 = join_missing({{f.avx512f, "avx512f"}, {f.avx512bw, "avx512bw"},
                                             {f.avx512vl, "avx512vl"}, {f.avx512dq, "avx512dq"}});
    const KernelTable* a2v = avx2_vnni_kernels();
    const KernelTable* a2 = (f.avx_vnni && a2v) ? a2v : avx2_kernels();
    const KernelTable* base = avx512_base_kernels();
    const KernelTable* vnni = avx512_vnni_kernels();
    const KernelTable* amx = avx512_amx_kernels();
    if (base && vnni) avx512_vnni = combine(*base, *vnni, "avx512_vnni");
    if (base && a2) avx512_core = combine(*base, *a2, "avx512_core");
    if (base && vnni && amx) {  // avx512_vnni with the bfloat16 GEMV and attention on AMX tiles
      avx512_amx = combine(*base, *vnni, "avx512_amx");
      avx512_amx.gemv_bf16 = amx->gemv_bf16;
      avx512_amx.gemv_bf16_layout_bytes = amx->gemv_bf16_layout_bytes, avx512_amx.gemv_bf16_prepare = amx->gemv_bf16_prepare;
      avx512_amx.gemv_bf16_prepare_rows = amx->gemv_bf16_prepare_rows;
      avx512_amx.gemv_bf16_writes_y = amx->gemv_bf16_writes_y;
      avx512_amx.gemv_bf16_prompt_rows = amx->gemv_bf16_prompt_rows;
      avx512_amx.attend_kernel = attend_kernel_amx_or_avx512;
      if (f.amx_int8) {  // the int8 GEMM's TDPBSSD tiles (the AMX-BF16 kernels above need only AMX-BF16)
        avx512_amx.gemm_q8_tiles = amx->gemm_q8_tiles;
        avx512_amx.gemm_q8_tiles_min_rows = amx->gemm_q8_tiles_min_rows, avx512_amx.gemm_q8_tiles_min_k = amx->gemm_q8_tiles_min_k;
      }
    }
    const std::string vnni_missing =
        join(avx512, join_missing({{f.avx512_vnni, "avx512_vnni"}, {f.avx512_bf16, "avx512_bf16"}}));
    add("avx512_amx", "avx512", base && vnni && amx ? &avx512_amx : nullptr,
        join(vnni_missing, join_missing({{f.amx_tile, "amx_tile (or the OS's permission for its state)"},
                                         {f.amx_bf16, "amx_bf16"}})));
    add("avx512_vnni", "avx512", base && vnni ? &avx512_vnni : nullptr, vnni_missing);
    add("avx512_core", "avx512", base && a2 ? &avx512_core : nullptr, join(avx512, avx2));
    add("avx2_vnni", "avx2", a2v, join(avx2, join_missing({{f.avx_vnni, "avx_vnni"}})));
    add("avx2_maddubs", "avx2", avx2_kernels(), avx2);
#elif defined(__aarch64__)
    add("neon_dotprod", "neon", neon_kernels(), join_missing({{f.neon, "asimd"}, {f.dotprod, "asimddp (dotprod)"}}));
#endif
    add("scalar", "scalar", scalar_kernels(), "");
  }

  // The best usable choice of a family (or any family: null), or null.
  const Choice* best(const char* family) const {
    for (int i = 0; i < count; ++i)
      if (list[i].table && list[i].missing.empty() && (!family || std::strcmp(family, list[i].family) == 0)) return &list[i];
    return nullptr;
  }
};

const Choices& choices() {
  static const Choices c;
  return c;
}

std::string g_problem;  // why a name was refused (kept for the returned pointer)

// "" and *out set, or why `name` cannot run here.
const char* resolve(const char* name, const Choice** out) {
  const Choices& c = choices();
  bool known = false;
  for (int i = 0; i < c.count; ++i) {
    const Choice& ch = c.list[i];
    if (std::strcmp(name, ch.name) == 0) {
      if (!ch.table || !ch.missing.empty()) {
        g_problem = std::string("CPU kernels '") + name + "' cannot run here: missing " + ch.missing;
        return g_problem.c_str();
      }
      *out = &ch;
      return "";
    }
    if (std::strcmp(name, ch.family) == 0) known = true;
  }
  if (known) {
    if ((*out = c.best(name))) return "";
    for (int i = 0; i < c.count; ++i)  // the family's first entry says what is missing
      if (std::strcmp(name, c.list[i].family) == 0) {
        g_problem = std::string("CPU kernels '") + name + "' cannot run here: missing " + c.list[i].missing;
        return g_problem.c_str();
      }
  }
  static const char* families =
#if defined(__x86_64__) || defined(_M_X64)
      "avx512, avx2 or scalar (or a variant: avx512_amx, avx512_vnni, avx512_core, avx2_vnni, avx2_maddubs)";
#elif defined(__aarch64__)
      "neon or scalar (or the variant neon_dotprod)";
#else
      "scalar";
#endif
  const bool other_arch = !std::strcmp(name, "neon") || !std::strcmp(name, "avx2") || !std::strcmp(name, "avx512");
  g_problem = std::string("CPU kernels '") + name + "' " +
              (other_arch ? "are not built for this architecture" : "are unknown") + "; use " + families;
  return g_problem.c_str();
}

// The probe's choice, or LLAVA_FAST_CPU_ISA's when it is usable (else the probe's; module.cpp raises the problem).
const KernelTable* default_table(std::string* problem) {
  const char* env = std::getenv("LLAVA_FAST_CPU_ISA");
  if (env && *env) {
    const Choice* ch = nullptr;
    const char* why = resolve(env, &ch);
    if (!*why) return ch->table;
    if (problem) *problem = std::string("LLAVA_FAST_CPU_ISA=") + env + ": " + why;
  }
  return choices().best(nullptr)->table;
}

std::string g_env_problem;
std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    t = default_table(&g_env_problem);
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

const char* kernels_env_problem() {
  kernels();
  return g_env_problem.c_str();
}

int kernel_choices(KernelChoice* out, int capacity) {
  const Choices& c = choices();
  int n = 0;
  for (int i = 0; i < c.count && n < capacity; ++i) out[n++] = KernelChoice{c.list[i].name, c.list[i].table, c.list[i].missing.c_str()};
  return n;
}

const char* use_kernels_named(const char* name) {
  if (std::strcmp(name, "best") == 0) {
    g_active.store(default_table(nullptr), std::memory_order_release);
    return "";
  }
  const Choice* ch = nullptr;
  const char* why = resolve(name, &ch);
  if (*why) return why;
  g_active.store(ch->table, std::memory_order_release);
  return "";
}

float* thread_panel_f32(size_t floats) {
  thread_local float* panel = nullptr;
  thread_local size_t panel_floats = 0;
  if (panel_floats < floats) {
    std::free(panel);
    panel_floats = (floats + 15) / 16 * 16;  // aligned_alloc takes a size that is a multiple of the alignment
    panel = static_cast<float*>(std::aligned_alloc(64, panel_floats * sizeof(float)));
  }
  return panel;
}

}  // namespace llava_fast
