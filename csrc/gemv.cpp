// Few-row GEMV for CPU decode: y (M, N) = x (M, K) @ W (N, K)^T with W in float32, bfloat16, int8 (a scale
// per row) or int4 (a float16 scale and min per group of input channels). Formats: gemv.h.
//
// Why: at batch 1 a decode step reads every weight once and does 2 FLOPs per weight, so it is bound by
// memory reads (~22 GB/s measured on the 2-core EPYC this was written on). PyTorch 2.13's CPU kernels reach
// a fraction of that at M = 1 (576 x 1536, 2 threads, a busy host: float32 F.linear ~12 GB/s, bfloat16
// F.linear ~1.2 GB/s, aten._weight_int8pack_mm ~0.1-1.6 GB/s, torchao's int4 CPU kernel ~0.7 GB/s), so the
// int8 and int4 models ran slower than float32. The kernels (csrc/isa/, one table per instruction set)
// stream each weight once; with AVX-512 (avx512.cpp, avx512_vnni.cpp):
//   float32  16 weights per FMA; above M = 1 a tile of 4 weight rows x 6 x rows (24 FMAs per 10 loads);
//            from 96 rows the same sums as outer products on lane-major copies of x and W (avx512.cpp);
//   bfloat16  32 weights per VDPBF16PS (x rounded to bf16, fp32 sums); one row at a time, the rows of a
//            thread one sequential stream, prefetched into L2 8 KB ahead.
//   int8     64 weights per VPDPBUSD (AVX512_VNNI, u8 x s8 -> int32): the weight stored offset-binary (w + 128)
//            is the unsigned operand, x quantized to int8 per 32-block the signed one; the accumulator starts
//            at -128 * sum(x_q) (exact), then one convert + one FMA with the blocks' x scales per 64 weights.
//   int4     128 weights per 64 bytes: AND / SHIFT+AND give the nibbles (0..15, unsigned operands), 2 VPDPBUSD
//            against x_q reordered to match; the group's fp16 scale times the block's x scale multiplies each
//            block's integer sum; sum_g min_g * (sum over g of x_s x_q) adds the mins (per call, all rows).
// int8 and int4 therefore compute W . x' with x' = x quantized per 32-block (llama.cpp's Q8_0 / Q4_1 dot
// products do the same); llava_fast/cpu/gemv.py `reference` models it exactly. On SmolLM2-135M (2,048 tokens,
// through this kernel) it moves perplexity by +0.06 (int8) and +0.03 (int4-32) over F.linear on the same
// weights. Before (VPMOVSXBD/VPMOVZXBD + VCVTDQ2PS + FMA per 16 weights) both were compute-bound.
// All M activation rows reuse a weight row (or block of 4 rows) from L1, so W is read from
// memory once per call whatever M is (GemvLinear uses these for M <= 8, above which oneDNN's blocked GEMM
// wins; the native decode step for up to 64 rows: the server's batches). Threads split the N rows into
// contiguous ranges; each output's accumulation order is fixed by K alone (not by M, the tile or the thread
// count), so a row's result does not depend on what else is in the batch. The scalar version of every kernel
// (below; the same integer arithmetic for int8 and int4) runs where no vector table does, and in tests.
// Here: the algorithm (x prepared once per call, rows split over threads, the thread pool, the checks) and the
// scalar reference of each kernel; the instruction-set-specific loops are in csrc/isa/ (kernels.h).
#include "gemv.h"

#include "convert.h"
#include "isa/kernels.h"
#include "isa/reference.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace llava_fast {
namespace {

// A spin-wait hint without ISA flags: PAUSE is SSE2 (baseline x86-64), YIELD is ARMv8-A.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// ------------------------------------------------------------------------------------------------------
// Scalar kernels (any CPU; the reference every table is checked against, csrc/tests/kernel_tests.cpp). Same
// arithmetic: float products for F32/BF16; for Q8/Q4 an exact integer sum per 32-block, scaled per block.
// ------------------------------------------------------------------------------------------------------

}  // namespace

void gemv_f32_scalar(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.m; ++m) {
      const float* w = static_cast<const float*>(a.w) + n * K;
      const float* x = p.xf + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += w[k] * x[k];
      gemv_store(p, m, n, acc);
    }
}

void gemv_bf16_scalar(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.m; ++m) {
      const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
      const uint16_t* xb = p.xb + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += bf16_to_f32(w[k]) * bf16_to_f32(xb[k]);
      gemv_store(p, m, n, acc);
    }
}

void gemv_q8_scalar(const GemvRows& p, int64_t n0, int64_t n1) {  // offset-binary: the weight is u - 128
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.m; ++m) {
      const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
      const int8_t* xq = p.xq + m * p.kp;
      float acc = 0.f;
      for (int64_t b = 0; b < p.blocks; ++b) {
        int32_t d = 0;
        for (int64_t k = b * 32; k < std::min(K, b * 32 + 32); ++k) d += (int32_t(w[k]) - 128) * xq[k];
        acc += p.xs[m * p.blocks + b] * float(d);
      }
      gemv_store(p, m, n, acc * static_cast<const float*>(a.scales)[n]);
    }
}

void gemv_q4_scalar(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, G = K / a.group;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.m; ++m) {
      const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
      const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
      const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
      const int8_t* xq = p.xq + m * p.kp;
      float acc = 0.f;
      for (int64_t b = 0; b < p.blocks; ++b) {
        const uint8_t* blk = w + b * 16;
        int32_t d = 0;
        for (int j = 0; j < 16; ++j) d += int32_t(blk[j] & 15) * xq[b * 32 + j] + int32_t(blk[j] >> 4) * xq[b * 32 + 16 + j];
        acc += (f16_to_f32(sc[b * 32 / a.group]) * p.xs[m * p.blocks + b]) * float(d);
      }
      for (int64_t g = 0; g < G; ++g) acc += f16_to_f32(mn[g]) * p.xmin[m * G + g];
      gemv_store(p, m, n, acc);
    }
}

// x_s = max|x| / 127 per 32-block, x_q = round(x / x_s) ties to even: every table's quantize_row_q8 gives these
// bytes (the same IEEE operations: an exact max, one division per element).
void quantize_row_q8_scalar(const float* x, int64_t K, int8_t* xq, float* xs) {
  for (int64_t b = 0, k0 = 0; k0 < K; ++b, k0 += 32) {
    const int64_t k1 = std::min(K, k0 + 32);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float d = amax / 127.f;
    xs[b] = d;
    if (d > 0.f)
      for (int64_t k = k0; k < k1; ++k) xq[k] = int8_t(std::nearbyint(x[k] / d));
  }
}

namespace {

// x quantized per 32-block (GemvRows) in K order, plus the table's own layout when it has one.
struct QuantizedX {
  std::vector<int8_t> xq;
  std::vector<float> xs, xmin;
  std::vector<uint64_t> layout;  // 8-byte aligned scratch for the table's layout

  void build(GemvRows& p, const KernelTable& t) {
    const GemvArgs& a = *p.a;
    const int64_t M = a.m, K = a.k, B = (K + 31) / 32, kp = (K + 127) / 128 * 128;
    p.blocks = B, p.kp = kp;
    xq.assign(M * kp, 0);
    xs.assign(M * B, 0.f);
    for (int64_t m = 0; m < M; ++m) t.quantize_row_q8(p.xf + m * K, K, &xq[m * kp], &xs[m * B]);
    p.xq = xq.data(), p.xs = xs.data();
    if (a.format == kWeightQ4) {
      const int64_t G = K / a.group;
      xmin.assign(M * G, 0.f);
      for (int64_t m = 0; m < M; ++m) activation_group_sums(&xq[m * kp], &xs[m * B], K, a.group, &xmin[m * G]);
      p.xmin = xmin.data();
    }
    p.layout = nullptr;
    if (t.gemv_prepare) {
      layout.resize((t.gemv_layout_bytes(p) + 7) / 8);
      t.gemv_prepare(p, layout.data());
      p.layout = layout.data();
    }
  }
};


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
    if (chunks > kMaxChunks) {  // the ticket holds 16 bits of chunk count: run the rest as further calls
      for (int base = 0; base < chunks; base += kMaxChunks) {
        const int count = std::min(kMaxChunks, chunks - base);
        const std::function<void(int)> part = [&task, base](int c) { task(base + c); };
        run_locked(count, part);
      }
      return;
    }
    run_locked(chunks, task);
  }

 private:
  static constexpr int kMaxChunks = 0xffff;

  void run_locked(int chunks, const std::function<void(int)>& task) {
    task_ = &task;
    done_.store(0, std::memory_order_relaxed);
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      gen = generation_.load(std::memory_order_relaxed) + 1;
      // The chunk count travels in the ticket itself: a worker still polling the previous call's ticket
      // must never compare it against this call's count (a larger one would let it claim a chunk of the
      // old ticket, run it as this call's, and count it twice, so the caller returned before a chunk ended).
      ticket_.store((gen << 32) | (uint64_t(chunks) << 16), std::memory_order_release);
      generation_.store(gen, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    while (claim_and_run(gen)) {
    }
    for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
      if (spins % 64 == 63) std::this_thread::yield();  // a claimed chunk's thread may be off its core
      cpu_relax();
    }
  }

  // Claims the next chunk of call `gen` and runs it; false when that call has no chunk left.
  bool claim_and_run(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if ((t >> 32) != gen || (t & 0xffffu) >= ((t >> 16) & 0xffffu)) return false;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        (*task_)(int(t & 0xffffu));
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
        cpu_relax();
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
  std::atomic<uint64_t> ticket_{0};  // (generation << 32) | (chunks << 16) | next chunk
  std::atomic<int> done_{0}, sleepers_{0};
  const std::function<void(int)>* task_ = nullptr;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: joining threads at interpreter exit can deadlock
  return *p;
}

}  // namespace

const char* gemv_weight_check(const GemvArgs& a) {
  const char* isa = kernels_env_problem();  // LLAVA_FAST_CPU_ISA names a table this CPU cannot run
  if (*isa) return isa;
  if (a.n < 1 || a.k < 1) return "gemv: empty shape";
  if (!a.w) return "gemv: null pointer";
  switch (a.format) {
    case kWeightF32:
      return "";
    case kWeightBF16:
      return a.k % 2 ? "gemv: bfloat16 weights need an even K" : "";
    case kWeightQ8:
      return a.scales ? "" : "gemv: int8 weights need scales";
    case kWeightQ4:
      if (a.group < 32 || (a.group & (a.group - 1)) || a.k % a.group)
        return "gemv: int4 group must be a power of two >= 32 dividing K";
      return a.scales && a.mins ? "" : "gemv: int4 weights need scales and mins";
    default:
      return "gemv: unknown weight format";
  }
}

const char* gemv_check(const GemvArgs& a) {
  if (a.m < 1 || a.n < 1 || a.k < 1) return "gemv: empty shape";
  if (a.x_dtype != kActF32 && a.x_dtype != kActBF16) return "gemv: x must be float32 or bfloat16";
  if (a.x_stride < a.k || a.y_stride < a.n) return "gemv: row strides smaller than the rows";
  if (!a.x || !a.y) return "gemv: null pointer";
  return gemv_weight_check(a);
}

void gemv(const GemvArgs& a, int threads) {
  const int64_t M = a.m, K = a.k;
  // x as the kernels read it. thread_local: each calling thread keeps its own buffers, grown once.
  thread_local std::vector<float> xf_buf, y_buf;
  thread_local std::vector<uint16_t> xb_buf;
  thread_local std::vector<float> xbf_buf;
  thread_local QuantizedX xq_buf;
  thread_local std::vector<uint64_t> bf16_layout;
  const KernelTable& t = kernels();
  GemvRows p{};
  p.a = &a;
  const bool bf16_writes_y = a.format == kWeightBF16 && t.gemv_bf16_writes_y;
  if (a.format == kWeightBF16) {
    if (a.x_dtype == kActBF16 && a.x_stride == K) {
      p.xb = static_cast<const uint16_t*>(a.x);
    } else if (bf16_writes_y && a.x_dtype == kActF32 && a.x_stride == K) {
      p.xf = static_cast<const float*>(a.x);  // rounded to bfloat16 by the table's prepare, as it packs x
    } else {
      xb_buf.resize(M * K);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k)
          xb_buf[m * K + k] = a.x_dtype == kActBF16 ? static_cast<const uint16_t*>(a.x)[m * a.x_stride + k]
                                                    : f32_to_bf16(static_cast<const float*>(a.x)[m * a.x_stride + k]);
      p.xb = xb_buf.data();
    }
    if (t.gemv_bf16_prepare) {  // the table's own layout of x (AMX: B tiles)
      bf16_layout.resize((t.gemv_bf16_layout_bytes(p) + 7) / 8);
      // A prompt's rows packed on every thread, in ranges of whole layout units: on the calling thread alone
      // this was ~5% of a tiny-next bfloat16 prefill's wall time (123-row chunks, 2 threads).
      uint64_t* layout = bf16_layout.data();
      const int64_t unit = t.gemv_bf16_prepare_rows, units = (M + unit - 1) / unit;
      const int parts = M >= 32 ? int(std::min<int64_t>(int64_t(threads) * 2, units)) : 1;
      pool().run(threads, parts, [&](int i) {
        t.gemv_bf16_prepare(p, layout, std::min(M, units * i / parts * unit), std::min(M, units * (i + 1) / parts * unit));
      });
      p.layout = layout;
    } else {
      xbf_buf.resize(M * K);  // the same values widened, for tables without a bfloat16 dot product
      for (int64_t i = 0; i < M * K; ++i) xbf_buf[i] = bf16_to_f32(p.xb[i]);
      p.xbf = xbf_buf.data();
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
  if (a.format == kWeightQ8 || a.format == kWeightQ4) xq_buf.build(p, t);
  thread_local std::vector<uint64_t> f32_layout;
  int64_t align = 1;  // row ranges start at multiples of this
  if (a.format == kWeightF32 && t.gemv_f32_prepare) {  // the table's prompt GEMM (0 bytes: not at this M)
    const size_t bytes = t.gemv_f32_layout_bytes(p);
    if (bytes) {
      f32_layout.resize((bytes + 7) / 8);
      t.gemv_f32_prepare(p, f32_layout.data());
      p.layout = f32_layout.data();
      align = t.gemv_f32_cols;
    }
  }
  if (a.x_dtype == kActBF16 && !bf16_writes_y) {
    y_buf.resize(M * a.n);
    p.yf = y_buf.data();
  }
  // Contiguous row ranges, 4 per thread (few enough that claiming one costs nothing next to it; several, so a
  // thread whose core is taken by other work leaves its share to the others), each at least 16 rows.
  const GemvRowsFn rows = a.format == kWeightF32 ? t.gemv_f32 : a.format == kWeightBF16 ? t.gemv_bf16
                         : a.format == kWeightQ8 ? t.gemv_q8 : t.gemv_q4;
  // With a panel width (align > 1): ranges of whole panels, the last one holding N's remainder.
  const int64_t units = (a.n + align - 1) / align;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(int64_t(threads) * 4, align > 1 ? units : a.n / 16)));
  pool().run(threads, parts, [&](int i) {
    const int64_t n0 = align > 1 ? units * i / parts * align : a.n * i / parts;
    const int64_t n1 = align > 1 ? std::min(a.n, units * (i + 1) / parts * align) : a.n * (i + 1) / parts;
    rows(p, n0, n1);
    if (p.yf) {  // bfloat16 output: each thread rounds its own range
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n)
          static_cast<uint16_t*>(a.y)[m * a.y_stride + n] = f32_to_bf16(p.yf[m * a.n + n]);
    } else if (a.round_y_bf16 && a.x_dtype == kActF32 && !bf16_writes_y) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) {
          float& v = static_cast<float*>(a.y)[m * a.y_stride + n];
          v = round_to_bf16(v);
        }
    }
  });
}

void parallel_for(int threads, int chunks, const std::function<void(int)>& task) { pool().run(threads, chunks, task); }

void quantize_activations_q8(const float* x, int64_t K, int8_t* xq, float* xs) {
  kernels().quantize_row_q8(x, K, xq, xs);
}

void activation_group_sums(const int8_t* xq, const float* xs, int64_t K, int64_t group, float* xmin) {
  for (int64_t b = 0; b < K / 32; ++b) {
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += xq[b * 32 + j];
    xmin[b * 32 / group] += xs[b] * float(s);
  }
}


bool gemv_use_kernels(const char* name) { return *use_kernels_named(name) == 0; }

}  // namespace llava_fast
