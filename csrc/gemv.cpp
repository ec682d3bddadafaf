// Few-row GEMV for CPU decode: y (M, N) = x (M, K) @ W (N, K)^T with W in float32, bfloat16, int8 (a scale
// per row) or int4 (a float16 scale and min per group of input channels). Formats: gemv.h.
//
// Why: at batch 1 a decode step reads every weight once and does 2 FLOPs per weight, so it is bound by
// memory reads (~22 GB/s measured on the 2-core EPYC this was written on). PyTorch 2.13's CPU kernels reach
// a fraction of that at M = 1 (576 x 1536, 2 threads, a busy host: float32 F.linear ~12 GB/s, bfloat16
// F.linear ~1.2 GB/s, aten._weight_int8pack_mm ~0.1-1.6 GB/s, torchao's int4 CPU kernel ~0.7 GB/s), so the
// int8 and int4 models ran slower than float32. These kernels stream each weight once with AVX-512:
//   float32  16 weights per FMA;          bfloat16  32 weights per VDPBF16PS (x rounded to bf16, fp32 sums);
//   int8     16 weights: VPMOVSXBD, VCVTDQ2PS, FMA, the row's scale applied once at the end;
//   int4     32 weights per 16 bytes: VPMOVZXBD, AND/SHIFT for the two nibbles, 2 FMAs; the group's scale
//            multiplies the group's partial dot, and sum_g min_g * sum(x in g) adds the mins (x's group sums
//            are computed once per call and shared by all rows).
// Four weight rows are processed together and all M activation rows reuse them from L1, so W is read from
// memory once per call whatever M is (the callers use these for M <= 8 only: above that oneDNN's blocked
// GEMM wins). Threads split the N rows; accumulation order is fixed by K, so results do not depend on the
// thread count. A scalar version of every kernel runs where AVX-512 is missing (and in tests, as a check).
#include "gemv.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace llava_fast {
namespace {

// ------------------------------------------------------------------------------------------------------
// Conversions
// ------------------------------------------------------------------------------------------------------

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {  // IEEE half -> float, subnormals included
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { mant <<= 1; ++e; } while (!(mant & 0x400u));
      u = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One call's inputs as the kernels read them: float32 x (and bf16 x for the bf16 format), Q4 group sums.
struct Prepared {
  const GemvArgs* a;
  const float* xf;       // (M, K) float32, row stride K
  const uint16_t* xb;    // (M, K) bf16 bits, row stride K (bf16 format only)
  const float* xsum;     // (M, K / group) Q4 only
  float* yf;             // (M, N) float32 results (row stride N) when y is bf16; else null
};

inline void store(const Prepared& p, int64_t m, int64_t n, float v) {
  if (p.yf) {
    p.yf[m * p.a->n + n] = v;
  } else {
    static_cast<float*>(p.a->y)[m * p.a->y_stride + n] = v;
  }
}

// ------------------------------------------------------------------------------------------------------
// Scalar kernels (any CPU; the reference the AVX-512 ones are checked against in tests)
// ------------------------------------------------------------------------------------------------------

void rows_scalar(const Prepared& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = p.xf + m * K;
      float acc = 0.f;
      switch (a.format) {
        case kWeightF32: {
          const float* w = static_cast<const float*>(a.w) + n * K;
          for (int64_t k = 0; k < K; ++k) acc += w[k] * x[k];
          break;
        }
        case kWeightBF16: {
          const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
          const uint16_t* xb = p.xb + m * K;
          for (int64_t k = 0; k < K; ++k) acc += bf16_to_f32(w[k]) * bf16_to_f32(xb[k]);
          break;
        }
        case kWeightQ8: {
          const int8_t* w = static_cast<const int8_t*>(a.w) + n * K;
          for (int64_t k = 0; k < K; ++k) acc += float(w[k]) * x[k];
          acc *= static_cast<const float*>(a.scales)[n];
          break;
        }
        case kWeightQ4: {
          const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
          const int64_t G = K / a.group;
          const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
          const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
          const float* xs = p.xsum + m * G;
          for (int64_t g = 0; g < G; ++g) {
            float d = 0.f;
            for (int64_t b = g * a.group; b < (g + 1) * a.group; b += 32) {
              const uint8_t* blk = w + b / 2;
              for (int j = 0; j < 16; ++j) d += float(blk[j] & 15) * x[b + j] + float(blk[j] >> 4) * x[b + 16 + j];
            }
            acc += d * f16_to_f32(sc[g]) + f16_to_f32(mn[g]) * xs[g];
          }
          break;
        }
      }
      store(p, m, n, acc);
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// AVX-512 kernels: 4 weight rows at a time, each reused by all M activation rows while it is in L1
// ------------------------------------------------------------------------------------------------------

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512dq,fma,f16c")))

AVX512 inline __mmask16 tail16(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

template <int R>
AVX512 void block_f32(const Prepared& p, int64_t n) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  const float* w = static_cast<const float*>(a.w) + n * K;
  for (int64_t m = 0; m < a.m; ++m) {
    const float* x = p.xf + m * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = tail16(K - k);
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < R; ++r) store(p, m, n + r, _mm512_reduce_add_ps(acc[r]));
  }
}

template <int R>
AVX512 void block_bf16(const Prepared& p, int64_t n) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
  for (int64_t m = 0; m < a.m; ++m) {
    const uint16_t* x = p.xb + m * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {  // K % 2 == 0 (checked): pairs never straddle the tail
      const int64_t left = K - k;
      const __mmask32 mk = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1);
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + k);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(mk, w + r * K + k), xv);
    }
    for (int r = 0; r < R; ++r) store(p, m, n + r, _mm512_reduce_add_ps(acc[r]));
  }
}

template <int R>
AVX512 void block_q8(const Prepared& p, int64_t n) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  const int8_t* w = static_cast<const int8_t*>(a.w) + n * K;
  const float* scales = static_cast<const float*>(a.scales) + n;
  for (int64_t m = 0; m < a.m; ++m) {
    const float* x = p.xf + m * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = tail16(K - k);
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
      for (int r = 0; r < R; ++r) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, w + r * K + k));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), xv, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) store(p, m, n + r, scales[r] * _mm512_reduce_add_ps(acc[r]));
  }
}

template <int R>
AVX512 void block_q4(const Prepared& p, int64_t n) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, G = K / a.group;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
  const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
  const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t m = 0; m < a.m; ++m) {
    const float* x = p.xf + m * K;
    const float* xs = p.xsum + m * G;
    __m512 acc[R];
    float bias[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), bias[r] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      __m512 d[R];
      for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_ps();
      for (int64_t b = g * a.group; b < (g + 1) * a.group; b += 32) {
        const __m512 x_lo = _mm512_loadu_ps(x + b), x_hi = _mm512_loadu_ps(x + b + 16);
        for (int r = 0; r < R; ++r) {
          const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + r * (K / 2) + b / 2)));
          d[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), x_lo, d[r]);
          d[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), x_hi, d[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(d[r], _mm512_set1_ps(_cvtsh_ss(sc[r * G + g])), acc[r]);
        bias[r] += _cvtsh_ss(mn[r * G + g]) * xs[g];
      }
    }
    for (int r = 0; r < R; ++r) store(p, m, n + r, _mm512_reduce_add_ps(acc[r]) + bias[r]);
  }
}

using BlockFn = void (*)(const Prepared&, int64_t);

AVX512 void rows_avx512(const Prepared& p, int64_t n0, int64_t n1) {
  BlockFn four, one;
  switch (p.a->format) {
    case kWeightF32: four = block_f32<4>, one = block_f32<1>; break;
    case kWeightBF16: four = block_bf16<4>, one = block_bf16<1>; break;
    case kWeightQ8: four = block_q8<4>, one = block_q8<1>; break;
    default: four = block_q4<4>, one = block_q4<1>; break;
  }
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) four(p, n);
  for (; n < n1; ++n) one(p, n);
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

using RowsFn = void (*)(const Prepared&, int64_t, int64_t);
std::atomic<RowsFn> g_rows{cpu_has_avx512() ? rows_avx512 : rows_scalar};

// ------------------------------------------------------------------------------------------------------
// Threads: a pool kept between calls. A decode step makes ~200 calls a few microseconds apart, so waking a
// sleeping thread each time (~5-50 us) would cost as much as the call: workers spin ~100 us after each
// call (yielding the core now and then), then sleep on a condition variable. Work is split into chunks that
// every thread claims from one counter, the caller included: on a host with more runnable threads than
// cores a worker may not be scheduled for milliseconds, and then the caller does its share instead of
// waiting for it (with a fixed split, one descheduled worker stalled a whole decode step: 10 s per token
// measured on the 2-core host shared with other jobs).
// ------------------------------------------------------------------------------------------------------

class Pool {
 public:
  // Runs task(c) for each chunk c in [0, chunks) on up to `threads` threads, the caller among them.
  void run(int threads, int chunks, const std::function<void(int)>& task) {
    if (threads <= 1 || chunks <= 1) {
      for (int c = 0; c < chunks; ++c) task(c);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mutex_);  // one call at a time (callers may be several threads)
    while (int(workers_.size()) < threads - 1) {
      // The generation a worker has "seen" is read here, not in the thread: a thread that starts late
      // would otherwise read the incremented value below and sleep through its first task.
      const uint64_t start = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, start] { work(start); });
    }
    task_ = &task;
    chunks_ = chunks;
    done_.store(0, std::memory_order_relaxed);
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      gen = generation_.load(std::memory_order_relaxed) + 1;
      ticket_.store(gen << 32, std::memory_order_release);
      generation_.store(gen, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    while (claim_and_run(gen)) {
    }
    for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
      if (spins % 64 == 63) std::this_thread::yield();  // a claimed chunk's thread may be off its core
      _mm_pause();
    }
  }

 private:
  // Claims the next chunk of call `gen` and runs it; false when that call has no chunk left.
  bool claim_and_run(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if ((t >> 32) != gen || int(t & 0xffffffffu) >= chunks_) return false;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        (*task_)(int(t & 0xffffffffu));
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
  }

  void work(uint64_t seen) {
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
      uint64_t now;
      int polls = 0;
      while ((now = generation_.load(std::memory_order_acquire)) == seen) {
        _mm_pause();
        if (++polls % 64 == 0) {
          if (std::chrono::steady_clock::now() > spin_until) {
            std::unique_lock<std::mutex> lock(mutex_);
            sleepers_.fetch_add(1, std::memory_order_acq_rel);
            wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          } else {
            std::this_thread::yield();
          }
        }
      }
      seen = now;
      while (claim_and_run(now)) {
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> ticket_{0};  // (generation << 32) | next chunk
  std::atomic<int> done_{0}, sleepers_{0};
  const std::function<void(int)>* task_ = nullptr;
  int chunks_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: joining threads at interpreter exit can deadlock
  return *p;
}

}  // namespace

const char* gemv_check(const GemvArgs& a) {
  if (a.m < 1 || a.n < 1 || a.k < 1) return "gemv: empty shape";
  if (a.x_dtype != kActF32 && a.x_dtype != kActBF16) return "gemv: x must be float32 or bfloat16";
  if (a.x_stride < a.k || a.y_stride < a.n) return "gemv: row strides smaller than the rows";
  if (!a.x || !a.w || !a.y) return "gemv: null pointer";
  switch (a.format) {
    case kWeightF32:
      return "";
    case kWeightBF16:
      return a.k % 2 ? "gemv: bfloat16 weights need an even K" : "";
    case kWeightQ8:
      return a.scales ? "" : "gemv: int8 weights need scales";
    case kWeightQ4:
      if (a.group < 32 || a.group % 32 || a.k % a.group) return "gemv: int4 group must be a multiple of 32 dividing K";
      return a.scales && a.mins ? "" : "gemv: int4 weights need scales and mins";
    default:
      return "gemv: unknown weight format";
  }
}

void gemv(const GemvArgs& a, int threads) {
  const int64_t M = a.m, K = a.k;
  // x as the kernels read it. thread_local: each calling thread keeps its own buffers, grown once.
  thread_local std::vector<float> xf_buf, xsum_buf, y_buf;
  thread_local std::vector<uint16_t> xb_buf;
  Prepared p{&a, nullptr, nullptr, nullptr, nullptr};
  if (a.format == kWeightBF16) {
    if (a.x_dtype == kActBF16 && a.x_stride == K) {
      p.xb = static_cast<const uint16_t*>(a.x);
    } else {
      xb_buf.resize(M * K);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k)
          xb_buf[m * K + k] = a.x_dtype == kActBF16 ? static_cast<const uint16_t*>(a.x)[m * a.x_stride + k]
                                                    : f32_to_bf16(static_cast<const float*>(a.x)[m * a.x_stride + k]);
      p.xb = xb_buf.data();
    }
    if (g_rows.load() == rows_scalar) {  // the scalar kernel reads float x
      xf_buf.resize(M * K);
      for (int64_t i = 0; i < M * K; ++i) xf_buf[i] = bf16_to_f32(p.xb[i]);
      p.xf = xf_buf.data();
    }
  } else if (a.x_dtype == kActF32 && a.x_stride == K) {
    p.xf = static_cast<const float*>(a.x);
  } else {
    xf_buf.resize(M * K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        xf_buf[m * K + k] = a.x_dtype == kActBF16 ? bf16_to_f32(static_cast<const uint16_t*>(a.x)[m * a.x_stride + k])
                                                  : static_cast<const float*>(a.x)[m * a.x_stride + k];
    p.xf = xf_buf.data();
  }
  if (a.format == kWeightQ4) {
    const int64_t G = K / a.group;
    xsum_buf.resize(M * G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) s += p.xf[m * K + k];
        xsum_buf[m * G + g] = s;
      }
    p.xsum = xsum_buf.data();
  }
  if (a.x_dtype == kActBF16) {
    y_buf.resize(M * a.n);
    p.yf = y_buf.data();
  }
  // Chunks of whole 4-row blocks, 4 per thread (few enough that claiming one costs nothing next to it).
  const RowsFn rows = g_rows.load();
  const int64_t blocks = (a.n + 3) / 4;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(int64_t(threads) * 4, blocks)));
  pool().run(threads, parts, [&](int i) {
    const int64_t n0 = std::min(a.n, blocks * i / parts * 4), n1 = std::min(a.n, blocks * (i + 1) / parts * 4);
    rows(p, n0, n1);
    if (p.yf) {  // bfloat16 output: each thread rounds its own range
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n)
          static_cast<uint16_t*>(a.y)[m * a.y_stride + n] = f32_to_bf16(p.yf[m * a.n + n]);
    }
  });
}

void parallel_for(int threads, int chunks, const std::function<void(int)>& task) { pool().run(threads, chunks, task); }

const char* gemv_isa() { return g_rows.load() == rows_avx512 ? "avx512" : "scalar"; }

bool gemv_use_kernels(const char* name) {
  const std::string s(name);
  if (s == "scalar") {
    g_rows = rows_scalar;
  } else if (s == "best") {
    g_rows = cpu_has_avx512() ? rows_avx512 : rows_scalar;
  } else {
    return false;
  }
  return true;
}

}  // namespace llava_fast
