// The CLIP vision tower's glue and attention on the CPU (contract: vision.h).
//
// Why: in a LLaVA-NeXT bfloat16 time to first token (tiny-next, 5 tiles x 577 tokens, 2 cores, Sapphire Rapids)
// the tower was ~47 of ~215 ms, and of it torch's SDPA took 35% and quick_gelu 18%: the activation as three
// elementwise torch passes (1.702 x, sigmoid, times x), each reading and writing the (tiles x 577, 1024) block
// and two of them allocating it, where one pass in place does the same work from registers. The attention runs
// the decoder's attention kernel (kernels.h AttendKernel::many; the AMX table's tiles), which reads K and V
// straight from the fused q/k/v projection's rows, one call per (image, head) over all T queries.
//
// Numerics: quick_gelu is computed in float32 and rounded once to the storage dtype, where the torch reference
// rounds 1.702 x, the sigmoid and the product each to bfloat16; attention is the decoder kernel's (q and p as
// bfloat16 for the AMX tiles, as a bfloat16 model's SDPA rounds them). Tests compare both with the float32
// reference within twice torch's own bfloat16 error.
#include "vision.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "convert.h"
#include "gemv.h"
#include "isa/kernels.h"
#include "isa/reference.h"

namespace llava_fast {

// The scalar reference of kernels.h's quick_gelu_row: x / (1 + e^(-1.702 x)) in float32, rounded once.
void quick_gelu_row_scalar(void* x, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = bf16 ? bf16_to_f32(static_cast<uint16_t*>(x)[i]) : static_cast<float*>(x)[i];
    const float y = v / (1.f + std::exp(-1.702f * v));
    if (bf16) {
      static_cast<uint16_t*>(x)[i] = f32_to_bf16(y);
    } else {
      static_cast<float*>(x)[i] = y;
    }
  }
}

// 64 Ki values per task: 128 KB of bfloat16, a few microseconds of work against the pool's wake-up, and 45 tasks
// for a NeXT image's 5 x 577 x 1,024 activations, so 2 threads end within a task of each other.
constexpr int64_t kGeluTask = 1 << 16;

void vision_quick_gelu(void* x, int64_t n, bool bf16, int threads) {
  const KernelTable& kt = kernels();
  const auto row = kt.quick_gelu_row ? kt.quick_gelu_row : quick_gelu_row_scalar;
  const int64_t tasks = (n + kGeluTask - 1) / kGeluTask;
  char* base = static_cast<char*>(x);
  const int64_t elem = bf16 ? 2 : 4;
  auto run = [&](int task) {
    const int64_t i0 = task * kGeluTask, i1 = std::min(n, i0 + kGeluTask);
    row(base + i0 * elem, i1 - i0, bf16);
  };
  if (threads <= 1 || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) run(int(t));
  } else {
    parallel_for(threads, int(tasks), run);
  }
}

bool vision_attention_supported(int64_t D, bool bf16) {
  // Only a kernel that bounds its own scores (the AMX tiles) takes all T queries of an (image, head) in one
  // call, each K/V panel built once; the float32-FMA kernels' blocks lost to torch's flash SDPA when measured
  // through the decoder's prefill glue, so those tables keep the torch path.
  const AttendKernel a = kernels().attend_kernel(D, bf16);
  return a.many != nullptr && a.bounds_scores;
}

bool vision_attention(const void* qkv, int64_t N, int64_t T, int64_t H, int64_t D, bool bf16, void* out, int threads) {
  if (!vision_attention_supported(D, bf16)) return false;
  const AttendKernel attend = kernels().attend_kernel(D, bf16);
  const int64_t elem = bf16 ? 2 : 4, row = 3 * H * D;  // elements between one token's q (or k, v) and the next
  const float scale = 1.f / std::sqrt(float(D));
  const char* src = static_cast<const char*>(qkv);
  char* dst = static_cast<char*>(out);
  auto task = [&](int t) {  // image n, head h: (T, D) queries against (T, D) keys and values
    const int64_t n = t / H, h = t % H;
    // By thread: the pool's workers keep theirs between calls (T x D floats each, 148 KB at 577 x 64).
    thread_local std::vector<float> qf, of;
    thread_local std::vector<const float*> qs;
    thread_local std::vector<float*> os;
    thread_local std::vector<int64_t> lens;
    qf.resize(T * D), of.resize(T * D), qs.resize(T), os.resize(T), lens.assign(T, T);
    const char* image = src + n * T * row * elem;
    for (int64_t i = 0; i < T; ++i) {
      const char* q = image + (i * row + h * D) * elem;
      for (int64_t d = 0; d < D; ++d)
        qf[i * D + d] = bf16 ? bf16_to_f32(reinterpret_cast<const uint16_t*>(q)[d]) : reinterpret_cast<const float*>(q)[d];
      qs[i] = qf.data() + i * D, os[i] = of.data() + i * D;
    }
    attend.many(qs.data(), lens.data(), os.data(), int(T), image + (H + h) * D * elem, image + (2 * H + h) * D * elem,
                row * elem, scale, nullptr);
    for (int64_t i = 0; i < T; ++i) {
      char* o = dst + ((n * T + i) * H + h) * D * elem;
      for (int64_t d = 0; d < D; ++d) {
        if (bf16) {
          reinterpret_cast<uint16_t*>(o)[d] = f32_to_bf16(of[i * D + d]);
        } else {
          reinterpret_cast<float*>(o)[d] = of[i * D + d];
        }
      }
    }
  };
  const int tasks = int(N * H);
  if (threads <= 1 || tasks <= 1) {
    for (int t = 0; t < tasks; ++t) task(t);
  } else {
    parallel_for(threads, tasks, task);
  }
  return true;
}

}  // namespace llava_fast
