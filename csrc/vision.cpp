// The CLIP vision tower's glue on the CPU (contract: vision.h).
//
// Why: in a LLaVA-NeXT bfloat16 time to first token (tiny-next, 5 tiles x 577 tokens, 2 cores, Sapphire Rapids)
// the tower was ~47 of ~215 ms, and of it quick_gelu 18%: the activation as three elementwise torch passes
// (1.702 x, sigmoid, times x), each reading and writing the (tiles x 577, 1024) block and two of them allocating
// it, where one pass in place does the same work from registers: the tower 47 -> 41 ms (medians of 7, 4
// interleaved rounds, 2 threads).
// (The tower's attention on the decoder's AMX kernel, reading q/k/v in place from the fused projection's rows,
// measured no faster than torch's flash SDPA in the tower: 4.2-5.8 against 4.2-4.5 ms per layer; not kept.)
//
// Numerics: quick_gelu is computed in float32 and rounded once to the storage dtype, where the torch reference
// rounds 1.702 x, the sigmoid and the product each to bfloat16. Tests compare it with the float32 reference
// within twice torch's own bfloat16 error.
#include "vision.h"

#include <algorithm>
#include <cmath>

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

}  // namespace llava_fast
