// llava_fast_kernel_tests: every kernel table this CPU runs, checked against the scalar table (csrc/isa/kernels.h).
// Built by CMake with -DLLAVA_FAST_BUILD_TESTS=ON (no Python needed: -DLLAVA_FAST_PYTHON=OFF); run by
// csrc/tests/run_kernel_tests.sh natively and, cross-compiled, under qemu-aarch64.
//
// What must hold (kernels.h, "Contract"):
//   exact     activation quantization (bytes and scales), the int4 GEMM panel, dequantization (float32 and
//             bfloat16), K/V stores and RoPE (elementwise, the same operations);
//   within    GEMV (float32, bfloat16, int8, int4 at every group size; float32 and bfloat16 x and y),
//   1e-5      RMSNorm, SwiGLU, attention: |table - scalar| <= 1e-5 x max|scalar| (+ a bfloat16 output's
//             rounding: one bfloat16 ulp of max|scalar|);
//   invariant in every table, a GEMV row and an int4 GEMM row give the same bits alone as in a call of 65 rows,
//             and 1 and 3 threads give the same bits.
// Shapes are odd on purpose: K not a multiple of any block (1, 33, 100, 1000), N with every remainder mod 4 and
// mod 32, 1 and 65 rows. Exits 0 only when every check of every table holds; prints one line per table.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "convert.h"
#include "dequantize.h"
#include "gemm_q4.h"
#include "gemm_q8.h"
#include "gemv.h"
#include "isa/kernels.h"

namespace lf = llava_fast;

namespace {

std::mt19937 rng(1234);

std::vector<float> randn(size_t n, float shift = 0.1f) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng) + shift;
  return v;
}

uint16_t random_f16(float min_exp, float max_exp, bool positive) {  // |value| in [2^min_exp, 2^max_exp)
  std::uniform_int_distribution<int> e(int(min_exp) + 15, int(max_exp) + 14), m(0, 1023), s(0, 1);
  return uint16_t(((positive ? 0 : s(rng)) << 15) | (e(rng) << 10) | m(rng));
}

struct Weight {
  int format;
  int64_t n, k, group;
  std::vector<float> f32, q8_scales;
  std::vector<uint16_t> bf16, q4_scales, q4_mins;
  std::vector<uint8_t> bytes;

  Weight(int format_, int64_t n_, int64_t k_, int64_t group_) : format(format_), n(n_), k(k_), group(group_) {
    std::uniform_int_distribution<int> u8(1, 255), byte(0, 255);
    switch (format) {
      case lf::kWeightF32: f32 = randn(n * k, 0.f); break;
      case lf::kWeightBF16:
        for (float v : randn(n * k, 0.f)) bf16.push_back(lf::f32_to_bf16(v));
        break;
      case lf::kWeightQ8:
        bytes.resize(n * k);
        for (auto& b : bytes) b = uint8_t(u8(rng));
        for (float v : randn(n, 0.f)) q8_scales.push_back(0.01f + std::fabs(v) * 0.01f);
        break;
      case lf::kWeightQ4:
        bytes.resize(n * k / 2);
        for (auto& b : bytes) b = uint8_t(byte(rng));
        for (int64_t i = 0; i < n * (k / group); ++i) {
          q4_scales.push_back(random_f16(-8, -4, true));
          q4_mins.push_back(random_f16(-6, -2, false));
        }
        break;
    }
  }

  lf::GemvArgs args(const void* x, int x_dtype, int64_t m, void* y) const {
    const void* w = format == lf::kWeightF32 ? static_cast<const void*>(f32.data())
                  : format == lf::kWeightBF16 ? static_cast<const void*>(bf16.data()) : bytes.data();
    const void* scales = format == lf::kWeightQ8 ? static_cast<const void*>(q8_scales.data())
                       : format == lf::kWeightQ4 ? static_cast<const void*>(q4_scales.data()) : nullptr;
    return lf::GemvArgs{x, x_dtype, m, k, w, format, n, k, group, scales,
                        format == lf::kWeightQ4 ? q4_mins.data() : nullptr, y, n};
  }
};

const char* kFormatNames[] = {"f32", "bf16", "int8", "int4"};

struct Checks {
  std::string table;
  int run = 0, failed = 0;

  void expect(bool ok, const std::string& what) {
    ++run;
    if (!ok) {
      ++failed;
      if (failed <= 20) std::printf("  FAIL [%s] %s\n", table.c_str(), what.c_str());
    }
  }
};

float max_abs(const std::vector<float>& v) {
  float m = 0.f;
  for (float x : v) m = std::max(m, std::fabs(x));
  return m;
}

// |a - b| <= rel x max|b| + abs, elementwise; "" or where it fails.
std::string close(const std::vector<float>& a, const std::vector<float>& b, float rel, float abs = 0.f) {
  const float tol = rel * max_abs(b) + abs;
  for (size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(a[i] - b[i]) <= tol))
      return "at " + std::to_string(i) + ": " + std::to_string(a[i]) + " vs " + std::to_string(b[i]) + " (tol " + std::to_string(tol) + ")";
  return "";
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

bool use(const char* name) { return *lf::use_kernels_named(name) == 0; }

// y (m, n) float32 of gemv through the active table; x float32 (or rounded to bfloat16 when bf16_io).
std::vector<float> run_gemv(const Weight& w, const std::vector<float>& x, int64_t m, bool bf16_io, int threads) {
  std::vector<float> y(m * w.n);
  if (!bf16_io) {
    lf::gemv(w.args(x.data(), lf::kActF32, m, y.data()), threads);
    return y;
  }
  std::vector<uint16_t> xb(x.size()), yb(m * w.n);
  for (size_t i = 0; i < x.size(); ++i) xb[i] = lf::f32_to_bf16(x[i]);
  lf::gemv(w.args(xb.data(), lf::kActBF16, m, yb.data()), threads);
  for (size_t i = 0; i < yb.size(); ++i) y[i] = lf::bf16_to_f32(yb[i]);
  return y;
}

void check_gemv(Checks& c, const char* table) {
  struct Case { int format; int64_t n, k, group; };
  std::vector<Case> cases;
  for (int64_t k : {1, 33, 100, 1000}) cases.push_back({lf::kWeightF32, 37, k, 0});
  for (int64_t k : {2, 34, 98, 1030}) cases.push_back({lf::kWeightBF16, 21, k, 0});
  // bfloat16 over several 16-row AMX blocks, with an N tail and K tails (66, 578) and without one (576)
  for (int64_t k : {66, 576, 578}) cases.push_back({lf::kWeightBF16, 37, k, 0});
  for (int64_t k : {1, 31, 123, 160, 1000}) cases.push_back({lf::kWeightQ8, 45, k, 0});
  for (int64_t g : {32, 64, 128, 256}) {
    cases.push_back({lf::kWeightQ4, 29, g, g});
    cases.push_back({lf::kWeightQ4, 67, g * 3, g});
    cases.push_back({lf::kWeightQ4, 6, g * 5, g});
  }
  for (const Case& cs : cases) {
    const Weight w(cs.format, cs.n, cs.k, cs.group);
    // bfloat16 also at 7 and 16 rows (one AMX block of activations, partly and fully used) and 33 (three)
    const std::vector<int64_t> ms = cs.format == lf::kWeightBF16 ? std::vector<int64_t>{1, 3, 7, 16, 33, 65}
                                                                  : std::vector<int64_t>{1, 3, 65};
    for (int64_t m : ms) {
      const std::vector<float> x = randn(m * cs.k);
      for (bool bf16_io : {false, true}) {
        const std::string what = std::string("gemv ") + kFormatNames[cs.format] + " N=" + std::to_string(cs.n) +
                                 " K=" + std::to_string(cs.k) + " group=" + std::to_string(cs.group) + " M=" +
                                 std::to_string(m) + (bf16_io ? " bf16 x/y" : " f32 x/y");
        use("scalar");
        const std::vector<float> ref = run_gemv(w, x, m, bf16_io, 1);
        use(table);
        const std::vector<float> out = run_gemv(w, x, m, bf16_io, 1);
        // float32 y: summation order only. bfloat16 y: plus at most one bfloat16 rounding apart (2^-8 relative).
        const std::string diff = close(out, ref, bf16_io ? 1.f / 128 : 1e-5f, 1e-6f);
        c.expect(diff.empty(), what + ": vs scalar " + diff);
        c.expect(same_bits(run_gemv(w, x, m, bf16_io, 3), out), what + ": 3 threads changed bits");
        if (m > 1) {  // batch invariance: each row alone gives the bits it gets in the call
          for (int64_t r : {int64_t(0), m / 2, m - 1}) {
            const std::vector<float> xr(x.begin() + r * cs.k, x.begin() + (r + 1) * cs.k);
            const std::vector<float> alone = run_gemv(w, xr, 1, bf16_io, 1);
            c.expect(same_bits(alone, std::vector<float>(out.begin() + r * cs.n, out.begin() + (r + 1) * cs.n)),
                     what + ": row " + std::to_string(r) + " alone differs from the batch");
          }
        }
      }
    }
  }
}

// float32 at prompt row counts (from 96 rows the AVX-512 tables run their lane-major GEMM: panels of 32 weight
// rows, tiles of 11-12 x rows; the AVX2 tables theirs: panels of 16, tiles of 5-6): N and K with and without
// tails, several panels and tiles, a tile remainder of every kind. Within 1e-5 of scalar; each row's bits those of the row alone (M = 1: the GEMV tiles), of the call split
// in two, and of 3 threads. Its own random stream, so the other checks see the numbers they always saw.
void check_gemm_f32(Checks& c, const char* table) {
  const std::mt19937 saved = rng;
  struct Case { int64_t n, k; };
  for (const Case& cs : {Case{70, 48}, Case{64, 64}, Case{37, 1000}, Case{33, 517}, Case{5, 1}})
    for (int64_t m : {100, 128, 131, 260}) {
      const Weight w(lf::kWeightF32, cs.n, cs.k, 0);
      const std::vector<float> x = randn(m * cs.k);
      for (bool bf16_io : {false, true}) {
        const std::string what = "gemm f32 N=" + std::to_string(cs.n) + " K=" + std::to_string(cs.k) + " M=" +
                                 std::to_string(m) + (bf16_io ? " bf16 x/y" : " f32 x/y");
        use("scalar");
        const std::vector<float> ref = run_gemv(w, x, m, bf16_io, 1);
        use(table);
        const std::vector<float> out = run_gemv(w, x, m, bf16_io, 1);
        c.expect(close(out, ref, bf16_io ? 1.f / 128 : 1e-5f, 1e-6f).empty(), what + ": vs scalar " + close(out, ref, 1e-5f, 1e-6f));
        c.expect(same_bits(run_gemv(w, x, m, bf16_io, 3), out), what + ": 3 threads changed bits");
        const int64_t half = m / 2;  // the prompt split in two calls (at 100, 128 and 131 rows: the GEMV tiles)
        std::vector<float> split = run_gemv(w, std::vector<float>(x.begin(), x.begin() + half * cs.k), half, bf16_io, 1);
        const std::vector<float> rest = run_gemv(w, std::vector<float>(x.begin() + half * cs.k, x.end()), m - half, bf16_io, 1);
        split.insert(split.end(), rest.begin(), rest.end());
        c.expect(same_bits(split, out), what + ": the call split in two changed bits");
        for (int64_t r : {int64_t(0), int64_t(13), std::min<int64_t>(127, m - 2), m - 1}) {
          const std::vector<float> xr(x.begin() + r * cs.k, x.begin() + (r + 1) * cs.k);
          c.expect(same_bits(run_gemv(w, xr, 1, bf16_io, 1), std::vector<float>(out.begin() + r * cs.n, out.begin() + (r + 1) * cs.n)),
                   what + ": row " + std::to_string(r) + " alone differs from the batch");
        }
      }
    }
  rng = saved;
}

// bfloat16 at decode and prompt row counts (the AMX table's GEMM: 2 x 2 tiles of 16 weight rows x 16 x rows,
// each call's C tiles written to y during the next call's k steps; bfloat16 y rounded by the kernel itself):
// N and K with and without tails, 1-19 pairs of x-row blocks. Within bfloat16's rounding of scalar; each row's
// bits those of the row alone (a decode step), of the call split in two (a prompt in chunks) and of 3 threads;
// a bfloat16 y is exactly the float32 y rounded by f32_to_bf16. Its own random stream, like check_gemm_f32.
void check_gemm_bf16(Checks& c, const char* table) {
  const std::mt19937 saved = rng;
  struct Case { int64_t n, k; };
  for (const Case& cs : {Case{70, 578}, Case{33, 64}, Case{5, 98}, Case{48, 1030}})
    for (int64_t m : {2, 17, 128, 300}) {
      const Weight w(lf::kWeightBF16, cs.n, cs.k, 0);
      const std::vector<float> x = randn(m * cs.k);
      std::vector<float> f32_out;
      for (bool bf16_io : {false, true}) {
        const std::string what = "gemm bf16 N=" + std::to_string(cs.n) + " K=" + std::to_string(cs.k) + " M=" +
                                 std::to_string(m) + (bf16_io ? " bf16 x/y" : " f32 x/y");
        use("scalar");
        const std::vector<float> ref = run_gemv(w, x, m, bf16_io, 1);
        use(table);
        const std::vector<float> out = run_gemv(w, x, m, bf16_io, 1);
        const std::string diff = close(out, ref, bf16_io ? 1.f / 128 : 1e-5f, 1e-6f);
        c.expect(diff.empty(), what + ": vs scalar " + diff);
        c.expect(same_bits(run_gemv(w, x, m, bf16_io, 3), out), what + ": 3 threads changed bits");
        const int64_t half = m / 2;
        std::vector<float> split = run_gemv(w, std::vector<float>(x.begin(), x.begin() + half * cs.k), half, bf16_io, 1);
        const std::vector<float> rest = run_gemv(w, std::vector<float>(x.begin() + half * cs.k, x.end()), m - half, bf16_io, 1);
        split.insert(split.end(), rest.begin(), rest.end());
        c.expect(same_bits(split, out), what + ": the call split in two changed bits");
        for (int64_t r : {int64_t(0), std::min<int64_t>(13, m - 1), m / 2, m - 1}) {
          const std::vector<float> xr(x.begin() + r * cs.k, x.begin() + (r + 1) * cs.k);
          c.expect(same_bits(run_gemv(w, xr, 1, bf16_io, 1), std::vector<float>(out.begin() + r * cs.n, out.begin() + (r + 1) * cs.n)),
                   what + ": row " + std::to_string(r) + " alone differs from the batch");
        }
        if (!bf16_io) {
          f32_out = out;
          // round_y_bf16 (a bfloat16 model's float32 y): exactly f32_to_bf16 of each output
          std::vector<float> rounded(m * cs.n);
          lf::GemvArgs ra = w.args(x.data(), lf::kActF32, m, rounded.data());
          ra.round_y_bf16 = true;
          lf::gemv(ra, 2);
          for (float& v : f32_out) v = lf::round_to_bf16(v);
          c.expect(same_bits(rounded, f32_out), what + ": round_y_bf16 is not f32_to_bf16 of y");
          f32_out = out;
        } else {  // x is rounded to bfloat16 either way: the bfloat16 y must be the float32 y, rounded
          std::vector<float> rounded(f32_out.size());
          for (size_t i = 0; i < rounded.size(); ++i) rounded[i] = lf::round_to_bf16(f32_out[i]);
          c.expect(same_bits(rounded, out), what + ": y is not the float32 y rounded to bfloat16");
        }
      }
    }
  rng = saved;
}

void check_quantize(Checks& c, const char* table) {
  for (int64_t K : {1, 31, 32, 33, 95, 100, 576, 1000}) {
    std::vector<float> x = randn(K);
    if (K > 40) x[7] = 0.5f * (x[3] = 127.f);  // an exact tie after scaling (x_s = 1): 63.5 rounds to 64
    if (K > 70) std::fill(x.begin() + 64, x.begin() + 70, 0.f);  // part of a block zero
    const int64_t B = (K + 31) / 32;
    std::vector<int8_t> q_ref(K, 0), q(K, 0);
    std::vector<float> s_ref(B), s(B);
    use("scalar");
    lf::quantize_activations_q8(x.data(), K, q_ref.data(), s_ref.data());
    use(table);
    lf::quantize_activations_q8(x.data(), K, q.data(), s.data());
    c.expect(same_bits(q, q_ref) && same_bits(s, s_ref), "quantize_row_q8 K=" + std::to_string(K) + ": bytes differ");
  }
}

void check_gemm_q4(Checks& c, const char* table) {
  for (int64_t g : {32, 64, 128, 256})
    for (int64_t n : {1, 33, 70}) {
      const int64_t K = g == 32 ? 96 : g * 2;
      const Weight w(lf::kWeightQ4, n, K, g);
      for (int64_t m : {1, 2, 3, 65}) {
        const std::vector<float> x = randn(m * K);
        std::vector<float> ref(m * n), out(m * n), out3(m * n);
        const std::string what = "gemm_q4 N=" + std::to_string(n) + " K=" + std::to_string(K) + " group=" +
                                 std::to_string(g) + " M=" + std::to_string(m);
        use("scalar");
        lf::gemm_q4(w.args(x.data(), lf::kActF32, m, ref.data()), 1);
        use(table);
        lf::gemm_q4(w.args(x.data(), lf::kActF32, m, out.data()), 1);
        lf::gemm_q4(w.args(x.data(), lf::kActF32, m, out3.data()), 3);
        c.expect(same_bits(out, ref), what + ": not bit for bit scalar's " + close(out, ref, 0.f));
        c.expect(same_bits(out3, out), what + ": 3 threads changed bits");
        if (m > 1) {
          std::vector<float> alone(n);
          lf::gemm_q4(w.args(x.data() + (m - 1) * K, lf::kActF32, 1, alone.data()), 1);
          c.expect(same_bits(alone, std::vector<float>(out.end() - n, out.end())), what + ": last row alone differs");
        }
      }
    }
}

// Every K remainder mod 32 that matters (a partial last block, K % 4 != 0), N % 32 and % 8 tails, 1, 2, 3, 4
// (every micro-tile remainder) and 65 rows, and 16, 17, 128, 300 (the AMX tiles' full and partial 16-row blocks;
// the tiles run from K = 1024: 1024 and 1091);
// bit for bit scalar's, on 1 and 3 threads, a row alone as in a batch, and a prompt split into two calls (whose
// parts may run different panels: 17 rows on tiles, the rest not).
void check_gemm_q8(Checks& c, const char* table) {
  for (int64_t K : {32, 45, 96, 131, 256, 1024, 1091})
    for (int64_t n : {1, 33, 70}) {
      const Weight w(lf::kWeightQ8, n, K, 0);
      for (int64_t m : {1, 2, 3, 4, 16, 17, 65, 128, 300}) {
        const std::vector<float> x = randn(m * K);
        std::vector<float> ref(m * n), out(m * n), out3(m * n);
        const std::string what = "gemm_q8 N=" + std::to_string(n) + " K=" + std::to_string(K) + " M=" + std::to_string(m);
        use("scalar");
        lf::gemm_q8(w.args(x.data(), lf::kActF32, m, ref.data()), 1);
        use(table);
        lf::gemm_q8(w.args(x.data(), lf::kActF32, m, out.data()), 1);
        lf::gemm_q8(w.args(x.data(), lf::kActF32, m, out3.data()), 3);
        c.expect(same_bits(out, ref), what + ": not bit for bit scalar's " + close(out, ref, 0.f));
        c.expect(same_bits(out3, out), what + ": 3 threads changed bits");
        // and the GEMV's numbers (its own summation order): the same W . x' within float32 rounding. At the K the
        // check was written for: at K = 1024, N = 1 avx2_maddubs' GEMV is 1e-4 off (not this GEMM's concern).
        if (K <= 256) {
          std::vector<float> gemv_out(m * n);
          lf::gemv(w.args(x.data(), lf::kActF32, m, gemv_out.data()), 1);
          c.expect(close(out, gemv_out, 1e-5f).empty(), what + ": far from the GEMV " + close(out, gemv_out, 1e-5f));
        }
        if (m > 1) {
          std::vector<float> alone(n);
          lf::gemm_q8(w.args(x.data() + (m - 1) * K, lf::kActF32, 1, alone.data()), 1);
          c.expect(same_bits(alone, std::vector<float>(out.end() - n, out.end())), what + ": last row alone differs");
        }
        if (m > 17) {
          std::vector<float> split(m * n);
          lf::gemm_q8(w.args(x.data(), lf::kActF32, 17, split.data()), 2);
          lf::gemm_q8(w.args(x.data() + 17 * K, lf::kActF32, m - 17, split.data() + 17 * n), 2);
          c.expect(same_bits(split, out), what + ": split into 17 + " + std::to_string(m - 17) + " rows changed bits");
        }
      }
    }
}

void check_dequantize(Checks& c, const char* table) {
  struct Case { int format; int64_t n, k, group; };
  for (const Case& cs : {Case{lf::kWeightQ8, 5, 100, 0}, Case{lf::kWeightQ8, 7, 64, 0}, Case{lf::kWeightQ4, 9, 96, 32},
                         Case{lf::kWeightQ4, 3, 256, 128}, Case{lf::kWeightQ4, 4, 512, 256}}) {
    const Weight w(cs.format, cs.n, cs.k, cs.group);
    for (int dtype : {lf::kActF32, lf::kActBF16}) {
      const size_t bytes = cs.n * cs.k * (dtype == lf::kActF32 ? 4 : 2);
      std::vector<uint8_t> ref(bytes), out(bytes);
      use("scalar");
      lf::dequantize(w.args(nullptr, 0, 1, nullptr), ref.data(), dtype, 1);
      use(table);
      lf::dequantize(w.args(nullptr, 0, 1, nullptr), out.data(), dtype, 2);
      c.expect(same_bits(out, ref), std::string("dequantize ") + kFormatNames[cs.format] + " K=" + std::to_string(cs.k) +
                                        (dtype == lf::kActF32 ? " f32" : " bf16") + ": not bit for bit scalar's");
    }
  }
}

// Attention of one query over keys 0 .. T - 1 of a cache (position stride D) by a table's dot / axpy: the generic
// per-row loop of decode.cpp.
std::vector<float> attend_loop(const lf::KernelTable& k, const float* q, const uint8_t* kc, const uint8_t* vc, int64_t T,
                               int64_t D, bool bf16, float scale) {
  const int64_t elem = bf16 ? 2 : 4;
  std::vector<float> o(D, 0.f), sc(T);
  float top = -INFINITY, total = 0.f;
  for (int64_t t = 0; t < T; ++t) top = std::max(top, sc[t] = k.attn_dot(q, kc + t * D * elem, bf16, D) * scale);
  for (int64_t t = 0; t < T; ++t) total += (sc[t] = std::exp(sc[t] - top));
  for (int64_t t = 0; t < T; ++t) k.attn_axpy(o.data(), sc[t], vc + t * D * elem, bf16, D);
  for (int64_t d = 0; d < D; ++d) o[d] /= total;
  return o;
}

// The decode glue and attention, table entry against scalar entry.
void check_decode_kernels(Checks& c, const lf::KernelTable& t, const lf::KernelTable& s) {
  for (bool bf16 : {false, true}) {
    const std::string dt = bf16 ? " bf16" : " f32";
    auto rounded = [&](std::vector<float> v) {
      if (bf16)
        for (auto& x : v) x = lf::round_to_bf16(x);
      return v;
    };
    const float ulp = bf16 ? 1.f / 128 : 0.f;
    for (int64_t C : {1, 17, 576, 1000}) {
      const std::vector<float> x = rounded(randn(C)), h0 = rounded(randn(C)), wf = rounded(randn(C));
      std::vector<uint16_t> wb(C);
      for (int64_t i = 0; i < C; ++i) wb[i] = lf::f32_to_bf16(wf[i]);
      const void* weight = bf16 ? static_cast<const void*>(wb.data()) : wf.data();
      std::vector<float> h_ref = h0, h = h0, o_ref(C), o(C);
      s.add_rms_norm_row(x.data(), h_ref.data(), weight, 1e-6f, C, o_ref.data(), bf16);
      t.add_rms_norm_row(x.data(), h.data(), weight, 1e-6f, C, o.data(), bf16);
      c.expect(same_bits(h, h_ref), "add_rms_norm_row C=" + std::to_string(C) + dt + ": residual differs");
      c.expect(close(o, o_ref, 1e-5f + ulp).empty(), "add_rms_norm_row C=" + std::to_string(C) + dt + ": " + close(o, o_ref, 1e-5f + ulp));
      // SwiGLU (exp differs by a few ulp between tables)
      const std::vector<float> gate = randn(C, 0.f), up = randn(C, 0.f);
      std::vector<float> g_ref(C), g(C);
      s.swiglu_row(gate.data(), up.data(), g_ref.data(), C, bf16);
      t.swiglu_row(gate.data(), up.data(), g.data(), C, bf16);
      c.expect(close(g, g_ref, 1e-5f + ulp).empty(), "swiglu_row C=" + std::to_string(C) + dt + ": " + close(g, g_ref, 1e-5f + ulp));
      // The CLIP tower's quick_gelu in place (vision.cpp): one rounding of the float32 result, exp per table
      std::vector<uint8_t> a_ref(C * 4), a;
      for (int64_t i = 0; i < C; ++i) {
        if (bf16) {
          reinterpret_cast<uint16_t*>(a_ref.data())[i] = lf::f32_to_bf16(3.f * gate[i]);
        } else {
          reinterpret_cast<float*>(a_ref.data())[i] = 3.f * gate[i];
        }
      }
      a = a_ref;
      s.quick_gelu_row(a_ref.data(), C, bf16);
      (t.quick_gelu_row ? t.quick_gelu_row : s.quick_gelu_row)(a.data(), C, bf16);
      std::vector<float> af_ref(C), af(C);
      for (int64_t i = 0; i < C; ++i) {
        af_ref[i] = bf16 ? lf::bf16_to_f32(reinterpret_cast<uint16_t*>(a_ref.data())[i]) : reinterpret_cast<float*>(a_ref.data())[i];
        af[i] = bf16 ? lf::bf16_to_f32(reinterpret_cast<uint16_t*>(a.data())[i]) : reinterpret_cast<float*>(a.data())[i];
      }
      c.expect(close(af, af_ref, 1e-5f + ulp).empty(), "quick_gelu_row C=" + std::to_string(C) + dt + ": " + close(af, af_ref, 1e-5f + ulp));
      // K/V store: exact
      std::vector<uint8_t> kv_ref(C * 4), kv(C * 4);
      s.store_row(kv_ref.data(), x.data(), C, bf16);
      t.store_row(kv.data(), x.data(), C, bf16);
      c.expect(same_bits(kv, kv_ref), "store_row n=" + std::to_string(C) + dt + ": differs");
    }
    for (int64_t D : {2, 34, 64, 96, 128}) {  // RoPE: elementwise, exact
      const int64_t heads = 3;
      const std::vector<float> x0 = rounded(randn(heads * D)), cs = randn(D / 2), sn = randn(D / 2);
      std::vector<float> r_ref = x0, r = x0;
      s.rope(r_ref.data(), heads, D, cs.data(), sn.data(), bf16);
      t.rope(r.data(), heads, D, cs.data(), sn.data(), bf16);
      c.expect(same_bits(r, r_ref), "rope D=" + std::to_string(D) + dt + ": differs");
    }
    // Attention of one head over T keys: the table's dot/axpy loop and its block kernel, against scalar's loop.
    for (int64_t D : {32, 64, 96, 128, 40}) {
      // Tmax = 3, 6, 9, 72 keys: every remainder of the kernels' 4-key groups (their last group's stores must stop
      // at a query's last score: the next query's scores follow).
      for (int64_t T0 : {1, 4, 7, 70}) {
        const int nb = 3;  // queries at positions T0 - 1 .. T0 + 1
        const int64_t Tmax = T0 + nb - 1, elem = bf16 ? 2 : 4;
        // q rounded as a bfloat16 model stores it (the AMX kernel's products take bfloat16 q).
        const std::vector<float> q = rounded(randn(nb * D)), kf = rounded(randn(Tmax * D)), vf = rounded(randn(Tmax * D));
        std::vector<uint8_t> kc(Tmax * D * elem), vc(Tmax * D * elem);
        for (int64_t t = 0; t < Tmax; ++t) {
          s.store_row(kc.data() + t * D * elem, kf.data() + t * D, D, bf16);
          s.store_row(vc.data() + t * D * elem, vf.data() + t * D, D, bf16);
        }
        const float scale = 1.f / std::sqrt(float(D));
        auto attend_rows = [&](const lf::KernelTable& k) {
          std::vector<float> o(nb * D);
          for (int i = 0; i < nb; ++i) {
            const std::vector<float> oi = attend_loop(k, &q[i * D], kc.data(), vc.data(), T0 + i, D, bf16, scale);
            std::copy(oi.begin(), oi.end(), o.begin() + i * D);
          }
          return o;
        };
        const std::vector<float> ref = attend_rows(s);
        const std::string what = "attention D=" + std::to_string(D) + " T0=" + std::to_string(T0) + dt;
        c.expect(close(attend_rows(t), ref, 1e-5f).empty(), what + " (rows): " + close(attend_rows(t), ref, 1e-5f));
        const lf::AttendKernel block = t.attend_kernel(D, bf16);
        const float tol = block.bf16_products ? 5e-3f : 1e-5f;  // p rounded to bfloat16 (kernels.h)
        if (block.fn) {
          std::vector<float> o(nb * D), scores(nb * Tmax);
          for (int i = 0; i < nb; i += block.rows) {
            const int n = std::min(block.rows, nb - i);
            block.fn(&q[i * D], D, n, reinterpret_cast<const char*>(kc.data()), reinterpret_cast<const char*>(vc.data()),
                     D * elem, T0 + i, scale, scores.data(), &o[i * D], D);
          }
          c.expect(close(o, ref, tol).empty(), what + " (block kernel): " + close(o, ref, tol));
          for (int i = 0; i < nb; ++i) {  // block invariance: a query alone (a decode row) gets its bits in the block
            std::vector<float> alone(D);
            block.fn(&q[i * D], D, 1, reinterpret_cast<const char*>(kc.data()), reinterpret_cast<const char*>(vc.data()),
                     D * elem, T0 + i, scale, scores.data(), alone.data(), D);
            c.expect(same_bits(alone, std::vector<float>(o.begin() + i * D, o.begin() + (i + 1) * D)),
                     what + ": query " + std::to_string(i) + " alone differs from its block");
          }
        }
        if (block.many) {  // all nb queries, twice (two query heads of one KV head), in one call: the block's bits
          const int n = 2 * nb;
          std::vector<float> q2(n * D), o2(n * D, 7.f), scratch(n * (Tmax + 1)), one_scores(Tmax);
          std::vector<const float*> qs(n);
          std::vector<float*> os(n);
          std::vector<int64_t> lens(n);
          for (int i = 0; i < n; ++i) {
            const int row = i / 2;  // head 0 = the block's queries, head 1 = the same rows' queries reversed
            const int src = i % 2 ? nb - 1 - row : row;
            std::copy(q.begin() + src * D, q.begin() + (src + 1) * D, q2.begin() + i * D);
            qs[i] = &q2[i * D], os[i] = &o2[i * D], lens[i] = T0 + row;
          }
          block.many(qs.data(), lens.data(), os.data(), n, reinterpret_cast<const char*>(kc.data()),
                     reinterpret_cast<const char*>(vc.data()), D * elem, scale, scratch.data());
          for (int i = 0; i < n; ++i) {
            std::vector<float> alone(D);
            block.fn(qs[i], D, 1, reinterpret_cast<const char*>(kc.data()), reinterpret_cast<const char*>(vc.data()),
                     D * elem, lens[i], scale, one_scores.data(), alone.data(), D);
            c.expect(same_bits(alone, std::vector<float>(o2.begin() + i * D, o2.begin() + (i + 1) * D)),
                     what + ": query " + std::to_string(i) + " of the many-query kernel differs from attend_block's");
          }
          std::vector<float> head0(nb * D);
          for (int i = 0; i < nb; ++i) std::copy(o2.begin() + 2 * i * D, o2.begin() + (2 * i + 1) * D, head0.begin() + i * D);
          c.expect(close(head0, ref, tol).empty(), what + " (many-query kernel): " + close(head0, ref, tol));
        }
      }
    }
  }
}

// The many-query attention kernel's invariance (kernels.h AttendManyFn): a query's output depends on its own q,
// keys and values only. A prompt's rows at positions P0 .. P0 + 64 times the 3 query heads of one KV head (GQA)
// go through the kernel alone (one query a call, as a decode row), all in one call, in chunks of 7, 16 and 42
// rows, one head's rows only, and in reverse order: every output must be the bits of its query alone. The cache
// past the last row's position holds NaN (never read: zero times NaN would reach every output). The outputs are
// also within the table's tolerance of the scalar loop.
// randn times 2^e, e uniform in [-span, span], every 16th a zero and every 16th times 2^-130 (a float32 denormal,
// or a bfloat16 one once rounded): the exponent range, zeros and denormals a plain randn never reaches.
std::vector<float> wide_randn(size_t n, int span) {
  std::vector<float> v = randn(n);
  std::uniform_int_distribution<int> e(-span, span), pick(0, 15);
  for (auto& x : v) {
    const int p = pick(rng);
    x = p == 0 ? 0.f : std::ldexp(x, p == 1 ? -130 : e(rng));
  }
  return v;
}

// wide: K, V and q over wide exponents (wide_randn; scores up to ~2^40, still finite), checked for invariance
// only (the scalar loop's tolerance is relative to the output's scale, which one huge value sets).
// P0 = 2,011: a call's 195 queries x 2,076 keys of scores exceed the AMX kernel's bound (kScoreFloats), so it
// runs them in groups of 96, 96 and 3 over one build of the K/V tiles.
void check_attend_invariance(Checks& c, const lf::KernelTable& t, const lf::KernelTable& s) {
  for (int64_t P0 : {37, 2011})
  for (bool wide : {false, true})
  for (bool bf16 : {false, true})
    for (int64_t D : {32, 64, 128}) {
      const lf::AttendKernel kern = t.attend_kernel(D, bf16);
      if (!kern.many) continue;
      const int64_t R = 65, G = 3, T = P0 + R, cap = T + 40, elem = bf16 ? 2 : 4;
      const std::string what = "attention invariance D=" + std::to_string(D) + (bf16 ? " bf16" : " f32") +
                               (wide ? " wide" : "") + " P0=" + std::to_string(P0);
      auto rounded = [&](std::vector<float> v) {
        if (bf16)
          for (auto& x : v) x = lf::round_to_bf16(x);
        return v;
      };
      auto draw = [&](size_t n, int span) { return rounded(wide ? wide_randn(n, span) : randn(n)); };
      std::vector<float> kf = draw(cap * D, 16), vf = draw(cap * D, 30);
      for (int64_t i = T * D; i < cap * D; ++i) kf[i] = vf[i] = NAN;
      std::vector<uint8_t> kc(cap * D * elem), vc(cap * D * elem);
      for (int64_t p = 0; p < cap; ++p) {
        s.store_row(kc.data() + p * D * elem, kf.data() + p * D, D, bf16);
        s.store_row(vc.data() + p * D * elem, vf.data() + p * D, D, bf16);
      }
      const std::vector<float> q = draw(R * G * D, 8);  // query r * G + h: row r, head h
      const float scale = 1.f / std::sqrt(float(D));
      auto len = [&](int64_t qi) { return P0 + qi / G + 1; };
      // Outputs of the listed queries through one call, each D floats, in the list's order.
      auto run = [&](const std::vector<int64_t>& which) {
        const int n = int(which.size());
        std::vector<float> o(n * D, 7.f), scratch(n * (T + 1));
        std::vector<const float*> qs(n);
        std::vector<float*> os(n);
        std::vector<int64_t> lens(n);
        for (int i = 0; i < n; ++i) qs[i] = &q[which[i] * D], os[i] = &o[i * D], lens[i] = len(which[i]);
        kern.many(qs.data(), lens.data(), os.data(), n, reinterpret_cast<const char*>(kc.data()),
                  reinterpret_cast<const char*>(vc.data()), D * elem, scale, scratch.data());
        return o;
      };
      std::vector<float> alone(R * G * D);
      for (int64_t qi = 0; qi < R * G; ++qi) {
        const std::vector<float> o = run({qi});
        std::copy(o.begin(), o.end(), alone.begin() + qi * D);
      }
      auto expect_alone = [&](const std::vector<int64_t>& which, const std::string& how) {
        const std::vector<float> o = run(which);
        bool same = true;
        for (size_t i = 0; i < which.size(); ++i)
          same = same && std::memcmp(&o[i * D], &alone[which[i] * D], D * sizeof(float)) == 0;
        c.expect(same, what + ": " + how + " differs from each query alone");
      };
      std::vector<int64_t> all, reversed, one_head;
      for (int64_t qi = 0; qi < R * G; ++qi) all.push_back(qi), reversed.insert(reversed.begin(), qi);
      for (int64_t r = 0; r < R; ++r) one_head.push_back(r * G + 1);
      expect_alone(all, "65 rows x 3 heads in one call");
      expect_alone(reversed, "the same in reverse order");
      expect_alone(one_head, "one head's 65 rows");
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 7}, {7, 23}, {23, 65}}) {
        std::vector<int64_t> chunk;
        for (int64_t qi = r0 * G; qi < r1 * G; ++qi) chunk.push_back(qi);
        expect_alone(chunk, "rows " + std::to_string(r0) + " .. " + std::to_string(r1 - 1) + " as a chunk");
      }
      // A decode row's GQA group and other calls of 2 .. 16 queries (the few-query path of a table that has one).
      expect_alone({50 * G, 50 * G + 1}, "a group of 2");
      expect_alone({64 * G + 2, 3, 40 * G}, "3 queries of different lengths");
      expect_alone({R * G - 1, 0, 33 * G + 1, 17 * G}, "4 queries of different lengths");
      std::vector<int64_t> sixteen;
      for (int64_t i = 0; i < 16; ++i) sixteen.push_back((i * 37) % (R * G));
      expect_alone(sixteen, "16 queries of different lengths");
      if (wide) continue;
      std::vector<float> ref(R * G * D);  // the scalar loop
      for (int64_t qi = 0; qi < R * G; ++qi) {
        const std::vector<float> oi = attend_loop(s, &q[qi * D], kc.data(), vc.data(), len(qi), D, bf16, scale);
        std::copy(oi.begin(), oi.end(), ref.begin() + qi * D);
      }
      const float tol = kern.bf16_products ? 5e-3f : 1e-5f;
      c.expect(close(alone, ref, tol).empty(), what + ": against the scalar loop: " + close(alone, ref, tol));
    }
}

}  // namespace

int main() {
  lf::KernelChoice choices[16];
  const int n = lf::kernel_choices(choices, 16);
  const lf::KernelTable* scalar = lf::scalar_kernels();
  int failed_tables = 0, tested = 0;
  std::printf("llava_fast kernel tables (best first):\n");
  for (int i = 0; i < n; ++i) {
    const lf::KernelChoice& ch = choices[i];
    if (!ch.table || *ch.missing) {
      std::printf("  %-14s skipped: missing %s\n", ch.name, ch.missing);
      continue;
    }
    Checks c{ch.name};
    // A name this CPU cannot run must be refused with the missing feature named.
    for (int j = 0; j < n; ++j)
      if (choices[j].table && *choices[j].missing) {
        const std::string why = lf::use_kernels_named(choices[j].name);
        c.expect(why.find(choices[j].missing) != std::string::npos, std::string("refusal of ") + choices[j].name + ": '" + why + "'");
      }
    c.expect(*lf::use_kernels_named("no-such-isa") != 0, "an unknown name was accepted");
    check_quantize(c, ch.name);
    check_gemv(c, ch.name);
    check_gemm_q4(c, ch.name);
    check_gemm_q8(c, ch.name);
    check_dequantize(c, ch.name);
    check_decode_kernels(c, *ch.table, *scalar);
    check_attend_invariance(c, *ch.table, *scalar);
    check_gemm_f32(c, ch.name);
    check_gemm_bf16(c, ch.name);
    ++tested;
    if (c.failed) ++failed_tables;
    std::printf("  %-14s %s: %d checks, %d failed\n", ch.name, c.failed ? "FAIL" : "ok", c.run, c.failed);
  }
  lf::use_kernels_named("best");
  std::printf("%d tables tested, %d failed\n", tested, failed_tables);
  return failed_tables || tested == 0 ? 1 : 0;
}
