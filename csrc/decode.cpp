// The CPU decode step of a LLaMA decoder in one native call (formats and contract: decode.h).
//
// Why: at batch 1 the torch path runs ~25 small ops per layer, each a Python call and an ATen dispatch of a
// few microseconds, around four GEMVs. On SmolLM2-135M (30 layers, hidden 576) on the 2-core EPYC this was
// written on, a float32 step took 60 ms, of which the GEMVs' weight reads were 28 ms: the rest was
// dispatch, allocation and ops on 576 numbers. llama.cpp runs the whole step natively at 24 ms. Here the
// same step is one call: the GEMVs are gemv.cpp's kernels on its thread pool, the glue between them runs
// on the caller's thread over a few KB of L1-resident floats, and attention splits its (row, head) pairs
// over the same pool once the context makes it worth it.
//
// Numerics follow the torch path (llava_fast/generate.py decode_step, ops.py references), which the tests
// compare against: activations live here as float32, and in a bfloat16 model every value the torch path
// stores as bfloat16 (residual sums, norm outputs, GEMV outputs, RoPE products, attention output, SwiGLU,
// logits) is rounded to bfloat16 at the same point, so the two agree to bfloat16 rounding, not bit for bit
// (summation orders differ). Attention: softmax(q k^T / sqrt(D)) v over positions 0..length (the new token
// included; with a sliding window W, the last W of them) in float32, as PyTorch's CPU SDPA accumulates.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "convert.h"
#include "gemm_q4.h"
#include "gemm_q8.h"
#include "gemv.h"
#include "isa/kernels.h"
#include "isa/reference.h"

namespace llava_fast {
namespace {

// Rows through the layers at a time: the server's decode batches (<= 64 rows) in one pass; a long prompt in
// chunks of up to 128 rows whose GEMM inputs stay in L2 (128 x 1536 floats = 768 KB at SmolLM2's down_proj;
// Zen 4: 1 MB per core). Every chunk re-reads the weights (and the int4 GEMM repacks them). SmolLM2, 256
// tokens, best of 5 per run, 5 interleaved runs, 128 vs 64 rows: int4-32 1409 vs 1270 tok/s, float32 601 vs
// 576; tiny 274 tokens (3 chunks of 92, not 5 of 55: 210 instead of 350 MB of float32 layer weights) 62.0 ->
// 56.6 ms, 1,024 tokens 247 -> 241 (native prefill, medians of 20 / 12 interleaved pairs, 2 cores).
constexpr int64_t kChunk = 128;

// A float32 model's prompt on a table with a float32 prompt GEMM (gemv_f32_prepare: its cost does not grow
// with the rows, csrc/isa/avx512.cpp and avx2.cpp) goes in chunks of up to 512 rows, so the weights are read 4x
// less often.
// tiny-next, 2,945 positions, native prefill, medians of 4 interleaved rounds, the GEMV tiles in 128-row chunks
// against the GEMM in chunks of 128 / 256 / 512 / 1,024: 1.12x / 1.23x / 1.26x / 1.21x faster, the same logits.
// Attention is unchanged: its calls take ~1 MB of scores' worth of rows whatever the chunk.
constexpr int64_t kGemmChunk = 512;

}  // namespace

// A bfloat16 model's prompt, every linear bfloat16, goes in chunks of the table's gemv_bf16_prompt_rows (the AMX
// GEMM: 512). tiny-next, 2,945 positions, native prefill, 7 interleaved rounds on a busy host, fastest of each:
// 128-row chunks 227 ms, 384 198 ms, 512 187 ms, and 184 ms with attention in one call per chunk and KV head
// (forward_chunk); the same tokens.
int64_t decode_prompt_chunk_rows(const DecodeModel& m) {
  const KernelTable& kt = kernels();
  const bool f32 = m.dtype == kComputeF32 && kt.gemv_f32_prepare;
  const bool bf16 = m.dtype == kComputeBF16 && kt.gemv_bf16_prompt_rows > 0;
  if (!f32 && !bf16) return kChunk;
  for (const DecodeLayer& L : m.layers)
    for (const DecodeLinear* l : {&L.qkv, &L.o, &L.gate_up, &L.down})
      if (l->format != (f32 ? kWeightF32 : kWeightBF16)) return kChunk;
  return f32 ? kGemmChunk : kt.gemv_bf16_prompt_rows;
}

namespace {

// A model's stored values: float32 or bfloat16 arrays read and written as float.
struct Stored {
  bool bf16;
  float get(const void* p, int64_t i) const {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  void put(void* p, int64_t i, float v) const {  // v already rounded to the dtype
    if (bf16) {
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    } else {
      static_cast<float*>(p)[i] = v;
    }
  }
  float round(float v) const { return bf16 ? round_to_bf16(v) : v; }
};

}  // namespace

// ------------------------------------------------------------------------------------------------------
// The scalar references of the table's decode kernels (csrc/isa/kernels.h); the vector tables round the same
// way (bfloat16 round-to-nearest-even, NaN kept) but sum in their own order and use their own exp.
// ------------------------------------------------------------------------------------------------------

float attn_dot_scalar(const float* q, const void* k, bool bf16, int64_t D) {
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d)
    acc += q[d] * (bf16 ? bf16_to_f32(static_cast<const uint16_t*>(k)[d]) : static_cast<const float*>(k)[d]);
  return acc;
}

void attn_axpy_scalar(float* out, float p, const void* v, bool bf16, int64_t D) {
  for (int64_t d = 0; d < D; ++d)
    out[d] += p * (bf16 ? bf16_to_f32(static_cast<const uint16_t*>(v)[d]) : static_cast<const float*>(v)[d]);
}

AttendKernel attend_kernel_none(int64_t, bool) { return {nullptr, 1}; }

// One row of add_rms_norm (below): h += x (x null: not), out = weight * (h / rms(h)), as ops.rms_norm_reference.
void add_rms_norm_row_scalar(const float* x, float* h, const void* weight, float eps, int64_t C, float* out, bool bf16) {
  const Stored st{bf16};
  if (x) {
    for (int64_t i = 0; i < C; ++i) h[i] = st.round(h[i] + x[i]);
  }
  double sq = 0.0;  // float32 in torch; double here costs nothing at C ~ 1e3 and only reduces error
  for (int64_t i = 0; i < C; ++i) sq += double(h[i]) * h[i];
  const float inv = 1.f / std::sqrt(float(sq / double(C)) + eps);
  for (int64_t i = 0; i < C; ++i) out[i] = st.round(st.get(weight, i) * st.round(h[i] * inv));
}

// Rotate-half RoPE of `count` heads of D at one position, in place (ops.apply_rope).
void rope_scalar(float* x, int64_t count, int64_t D, const float* cos_row, const float* sin_row, bool bf16) {
  const Stored st{bf16};
  const int64_t half = D / 2;
  for (int64_t h = 0; h < count; ++h) {
    float* xh = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float c = st.round(cos_row[i]), s = st.round(sin_row[i]);
      const float x1 = xh[i], x2 = xh[i + half];
      xh[i] = st.round(st.round(x1 * c) - st.round(x2 * s));
      xh[i + half] = st.round(st.round(x2 * c) + st.round(x1 * s));
    }
  }
}

// n values (already rounded to the dtype) into a K/V cache position.
void store_row_scalar(void* dst, const float* src, int64_t n, bool bf16) {
  const Stored st{bf16};
  for (int64_t i = 0; i < n; ++i) st.put(dst, i, src[i]);
}

// SwiGLU of one row: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + e^-g) as torch's F.silu; out may be gate.
void swiglu_row_scalar(const float* gate, const float* up, float* out, int64_t I, bool bf16) {
  const Stored st{bf16};
  for (int64_t i = 0; i < I; ++i) {
    const float g = gate[i];
    out[i] = st.round(st.round(g / (1.f + std::exp(-g))) * up[i]);
  }
}

namespace {

// ------------------------------------------------------------------------------------------------------
// The step's pieces, each over `rows` rows of float32 activations
// ------------------------------------------------------------------------------------------------------

// y (rows, n) = x (rows, k) @ W^T (+ bias), rounded to the compute dtype.
// Prompt rows of an int4 or int8 projection go through the prefill GEMMs (gemm_q4.cpp, gemm_q8.cpp: outer
// products, 2x (int4) and ~8x (int8) the GEMV tiles' multiply-adds per float instruction); everything else
// through the GEMV.
void linear(const DecodeLinear& l, const float* x, int64_t rows, float* y, const Stored& st, int threads,
            bool prompt = false) {
  GemvArgs a{x, kActF32, rows, l.k, l.w, l.format, l.n, l.k, l.group, l.scales, l.mins, y, l.n};
  if (prompt && l.format == kWeightQ4) {
    gemm_q4(a, threads);
  } else if (prompt && l.format == kWeightQ8) {
    gemm_q8(a, threads);
  } else {
    // A bfloat16 model's outputs rounded by gemv's threads (the AMX kernel as it stores them): this pass on the
    // calling thread alone took a third as long as the AMX GEMM in a tiny-next prefill.
    a.round_y_bf16 = st.bf16 && !l.bias;
    gemv(a, threads);
    if (a.round_y_bf16) return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * l.n;
    if (l.bias) {
      for (int64_t i = 0; i < l.n; ++i) yr[i] = st.round(yr[i] + st.get(l.bias, i));
    } else if (st.bf16) {
      for (int64_t i = 0; i < l.n; ++i) yr[i] = round_to_bf16(yr[i]);
    }
  }
}

// f(r0, r1) over rows [0, rows) in contiguous ranges, on the pool when `threads` > 1: the row-wise glue between a
// prompt chunk's GEMMs (norms, RoPE and the K/V stores, SwiGLU). On the calling thread alone, with the other
// threads spinning, it was ~1/5 of a tiny-next bfloat16 prefill's wall time (perf, 2 threads, 123-row chunks).
// Each row's arithmetic is the same wherever it runs: the same bits.
void for_rows(int threads, int64_t rows, const std::function<void(int64_t, int64_t)>& f) {
  const int parts = int(std::min<int64_t>(int64_t(threads) * 4, (rows + 7) / 8));
  if (threads <= 1 || parts <= 1) return f(0, rows);
  parallel_for(threads, parts, [&](int i) { f(rows * i / parts, rows * (i + 1) / parts); });
}

// residual += x (skipped when x is null: the first layer's stream is the embedding itself), then
// out = weight * (residual / rms(residual)), row by row.
void add_rms_norm(const float* x, float* residual, const void* weight, float eps, int64_t rows, int64_t C,
                  float* out, const Stored& st, int threads = 1) {
  const auto row = kernels().add_rms_norm_row;
  for_rows(threads, rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      row(x ? x + r * C : nullptr, residual + r * C, weight, eps, C, out + r * C, st.bf16);
  });
}


}  // namespace

const char* decode_model_check(const DecodeModel& m) {
  if (m.hidden < 1 || m.heads < 1 || m.kv_heads < 1 || m.head_dim < 2 || m.intermediate < 1 || m.vocab < 1)
    return "decode: empty dimension";
  if (m.head_dim % 2) return "decode: RoPE needs an even head_dim";
  if (m.heads % m.kv_heads) return "decode: heads must be a multiple of kv_heads";
  if (m.sliding_window < 0) return "decode: sliding_window must be 0 (none) or positive";
  if (m.dtype != kComputeF32 && m.dtype != kComputeBF16) return "decode: compute dtype must be float32 or bfloat16";
  if (!m.embed || !m.final_norm || !m.cos || !m.sin || m.layers.empty()) return "decode: missing tensor";
  const int64_t qkv = (m.heads + 2 * m.kv_heads) * m.head_dim, C = m.hidden;
  auto shape_ok = [](const DecodeLinear& l, int64_t n, int64_t k) { return l.w && l.n == n && l.k == k; };
  for (const DecodeLayer& L : m.layers) {
    if (!L.input_norm || !L.post_norm) return "decode: missing norm weight";
    if (!shape_ok(L.qkv, qkv, C) || !shape_ok(L.o, C, m.heads * m.head_dim) ||
        !shape_ok(L.gate_up, 2 * m.intermediate, C) || !shape_ok(L.down, C, m.intermediate))
      return "decode: a layer's linear shapes do not match the model's dimensions";
    for (const DecodeLinear* l : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
      const GemvArgs a{nullptr, kActF32, 1, l->k, l->w, l->format, l->n, l->k, l->group, l->scales, l->mins,
                       nullptr, l->n};
      const char* problem = gemv_weight_check(a);
      if (*problem) return problem;
    }
  }
  if (!shape_ok(m.lm_head, m.vocab, C)) return "decode: lm_head shape does not match the model";
  return "";
}

namespace {

// The layers, final norm and lm_head for rows [r0, r0 + rows) of `in` (rows <= prompt_chunk_rows).
void forward_chunk(const DecodeModel& m, const DecodeRows& in, int64_t r0, int64_t rows, const DecodeCache& cache,
                   float* logits, int64_t& next_logit, int threads) {
  const int64_t C = m.hidden, H = m.heads, Hkv = m.kv_heads, D = m.head_dim, I = m.intermediate;
  const int64_t group = H / Hkv, qkv_n = (H + 2 * Hkv) * D;
  const Stored st{m.dtype == kComputeBF16};
  thread_local std::vector<float> residual, normed, qkv, attn, out, gate_up, act;
  residual.resize(rows * C), normed.resize(rows * C), out.resize(rows * C);
  qkv.resize(rows * qkv_n), attn.resize(rows * H * D), gate_up.resize(rows * 2 * I), act.resize(rows * I);
  thread_local std::vector<int32_t> position_buf;
  thread_local std::vector<int64_t> slot_buf;
  position_buf.assign(in.positions + r0, in.positions + r0 + rows);
  slot_buf.resize(rows);
  for (int64_t r = 0; r < rows; ++r) slot_buf[r] = in.slots ? in.slots[r0 + r] : r0 + r;
  // By address: the pool's workers have their own (empty) thread_locals.
  const int32_t* positions = position_buf.data();
  const int64_t* slots = slot_buf.data();
  bool compacted = false;  // the last layer kept the wanted rows only, at the front (below)

  const KernelTable& kt = kernels();
  const int64_t kv_elem = st.bf16 ? 2 : 4;
  // The row-wise glue on the pool for a prompt chunk's rows; a decode step's few rows stay on the calling thread
  // (a wake-up, ~1-2 us, is more than a 16-row norm at C = 576).
  const int glue_threads = rows >= 32 ? threads : 1;
  float* residual_rows = residual.data();
  for_rows(glue_threads, rows, [&](int64_t ra, int64_t rb) {
    for (int64_t r = ra; r < rb; ++r)
      for (int64_t i = 0; i < C; ++i)
        residual_rows[r * C + i] =
            in.tokens ? st.get(m.embed, in.tokens[r0 + r] * C + i) : st.get(in.embeds, (r0 + r) * C + i);
  });

  const float scale = 1.f / std::sqrt(float(D));
  // The first key position a row at position p sees: 0, or p - W + 1 with a sliding window of W.
  const int64_t window = m.sliding_window;
  auto first_key = [window](int64_t p) { return window > 0 && p >= window ? p - window + 1 : int64_t(0); };
  int64_t attended = 0;  // multiply-adds of q . k over the chunk, per head dim
  for (int64_t r = 0; r < rows; ++r) attended += positions[r] + 1 - first_key(positions[r]);
  // Split attention over the pool only when it outweighs a wake-up (~1-2 us): ~64k multiply-adds per layer.
  const int attn_threads = H * attended * D >= (1 << 16) ? threads : 1;

  for (size_t li = 0; li < m.layers.size(); ++li) {
    const DecodeLayer& L = m.layers[li];
    add_rms_norm(li ? out.data() : nullptr, residual.data(), L.input_norm, m.eps, rows, C, normed.data(), st,
                 glue_threads);
    linear(L.qkv, normed.data(), rows, qkv.data(), st, threads, in.prompt);

    char* k_layer = static_cast<char*>(cache.k) + int64_t(li) * cache.layer_stride * kv_elem;
    char* v_layer = static_cast<char*>(cache.v) + int64_t(li) * cache.layer_stride * kv_elem;
    float* qkv_all = qkv.data();  // by address, for the pool's workers
    for_rows(glue_threads, rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // RoPE, then K/V into the cache at the row's position
        const int64_t pos = positions[r];
        float* q = qkv_all + r * qkv_n;
        kt.rope(q, H + Hkv, D, m.cos + pos * (D / 2), m.sin + pos * (D / 2), st.bf16);  // q heads, then k heads
        for (int64_t g = 0; g < Hkv; ++g) {
          const int64_t at = (slots[r] * cache.row_stride + g * cache.head_stride + pos * cache.pos_stride) * kv_elem;
          kt.store_row(k_layer + at, q + (H + g) * D, D, st.bf16);
          kt.store_row(v_layer + at, q + (H + Hkv + g) * D, D, st.bf16);
        }
      }
    });
    if (li + 1 == m.layers.size() && in.logit_rows) {
      // The last layer's K/V are written; past this point a row's values feed only its own logits. So only the
      // wanted rows (a prompt's last token) go on through attention, o_proj and the MLP, moved to the front: the
      // same arithmetic per row (the tiles' sums do not depend on the other rows), 1/6 of a 6-layer prefill's
      // attention and 1/7 of its GEMMs fewer (tiny-next, 2,945 positions).
      int64_t kept = 0;
      for (int64_t r = 0; r < rows; ++r) {
        if (next_logit + kept >= in.logit_count || in.logit_rows[next_logit + kept] != r0 + r) continue;
        if (kept != r) {
          std::memcpy(qkv.data() + kept * qkv_n, qkv.data() + r * qkv_n, qkv_n * sizeof(float));
          std::memcpy(residual.data() + kept * C, residual.data() + r * C, C * sizeof(float));
          position_buf[kept] = position_buf[r], slot_buf[kept] = slot_buf[r];
        }
        ++kept;
      }
      if (!kept) return;  // no logits wanted from this chunk: its K/V were all it had to give
      rows = kept, compacted = true;
    }
    // The workers see their own (empty) thread_local buffers: hand them this thread's by address.
    const float* qkv_rows = qkv.data();
    float* attn_rows = attn.data();
    const AttendKernel attend = kt.attend_kernel(D, st.bf16);
    if (attend.many) {  // runs of rows sharing a cache row and first key, times the query heads of a KV head
      // Rows per call: the chunk's rows where the kernel bounds its own scores (AttendKernel::bounds_scores: it
      // builds the K/V tiles once per call, so once per chunk and KV head, whatever the chunk's size); else as many as keep the scores (rows x
      // group x keys floats) within ~1 MB of L2 (2,945 keys, 4 heads per KV head: 21 rows), at least 4
      // (attend_block's blocks), at most the chunk. A row past the start of a sliding window has its own first
      // key and goes alone, as in the block path below.
      int64_t keys_max = 1;
      for (int64_t r = 0; r < rows; ++r) keys_max = std::max<int64_t>(keys_max, positions[r] + 1);
      const int64_t per_call = attend.bounds_scores
                                   ? rows
                                   : std::max<int64_t>(4, std::min<int64_t>(kChunk, (int64_t(1) << 18) / (group * keys_max)));
      thread_local std::vector<int64_t> run_start;
      run_start.clear();
      for (int64_t r = 0; r < rows;) {
        int64_t n = 1;
        while (n < per_call && r + n < rows && slots[r + n] == slots[r] && positions[r + n] == positions[r] + n &&
               first_key(positions[r + n]) == first_key(positions[r]) && first_key(positions[r]) == 0)
          ++n;
        run_start.push_back(r);
        r += n;
      }
      run_start.push_back(rows);
      const int64_t* starts = run_start.data();
      const int64_t runs = int64_t(run_start.size()) - 1;
      parallel_for(attn_threads, int(runs * Hkv), [&](int task) {
        const int64_t b = task / Hkv, g = task % Hkv, r = starts[b], nr = starts[b + 1] - r;
        const int64_t lo = first_key(positions[r]);
        const int n = int(nr * group);
        thread_local std::vector<const float*> qs;
        thread_local std::vector<float*> os;
        thread_local std::vector<int64_t> lens;
        thread_local std::vector<float> scratch;
        qs.resize(n), os.resize(n), lens.resize(n);
        int64_t Tmax = 0;
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t j = 0; j < group; ++j) {
            const int64_t h = g * group + j, at = i * group + j;
            qs[at] = qkv_rows + (r + i) * qkv_n + h * D;
            os[at] = attn_rows + ((r + i) * H + h) * D;
            lens[at] = positions[r + i] + 1 - lo;
            Tmax = std::max(Tmax, lens[at]);
          }
        if (!attend.bounds_scores) scratch.resize(n * (Tmax + 1));  // a kernel that bounds its scores keeps its own
        const int64_t base = slots[r] * cache.row_stride + g * cache.head_stride + lo * cache.pos_stride;
        attend.many(qs.data(), lens.data(), os.data(), n, k_layer + base * kv_elem, v_layer + base * kv_elem,
                    cache.pos_stride * kv_elem, scale, scratch.data());
        if (st.bf16)
          for (int i = 0; i < n; ++i)
            for (int64_t d = 0; d < D; ++d) os[i][d] = round_to_bf16(os[i][d]);
      });
    } else if (attend.fn) {  // blocks of consecutive positions of one cache row (a prompt's rows), else single rows
      // The block kernel's rows share their first key (its causal mask trims only their ends), so a row past
      // the start of a sliding window, whose first key is its own, goes alone, its keys from that first key.
      thread_local std::vector<int64_t> block_start;
      block_start.clear();
      for (int64_t r = 0; r < rows;) {
        int64_t n = 1;
        while (n < attend.rows && r + n < rows && slots[r + n] == slots[r] && positions[r + n] == positions[r] + n &&
               first_key(positions[r + n]) == 0)
          ++n;
        block_start.push_back(r);
        r += n;
      }
      block_start.push_back(rows);
      const int64_t* starts = block_start.data();
      const int64_t blocks = int64_t(block_start.size()) - 1;
      parallel_for(attn_threads, int(blocks * H), [&](int task) {
        const int64_t b = task / H, h = task % H, g = h / group, r = starts[b];
        const int nb = int(starts[b + 1] - r);
        const int64_t lo = first_key(positions[r]), T0 = positions[r] + 1 - lo;
        const int64_t base = slots[r] * cache.row_stride + g * cache.head_stride + lo * cache.pos_stride;
        thread_local std::vector<float> scores;
        scores.resize(nb * (T0 + nb - 1));
        float* o = attn_rows + (r * H + h) * D;
        attend.fn(qkv_rows + r * qkv_n + h * D, qkv_n, nb, k_layer + base * kv_elem, v_layer + base * kv_elem,
               cache.pos_stride * kv_elem, T0, scale, scores.data(), o, H * D);
        if (st.bf16)
          for (int i = 0; i < nb; ++i)
            for (int64_t d = 0; d < D; ++d) o[i * H * D + d] = round_to_bf16(o[i * H * D + d]);
      });
    } else parallel_for(attn_threads, int(rows * H), [&](int task) {
      const int64_t r = task / H, h = task % H, g = h / group, lo = first_key(positions[r]);
      const int64_t T = positions[r] + 1 - lo;  // keys lo..position
      const float* q = qkv_rows + r * qkv_n + h * D;
      const int64_t base = slots[r] * cache.row_stride + g * cache.head_stride + lo * cache.pos_stride;
      thread_local std::vector<float> scores;
      scores.resize(T);
      float top = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        const void* key = k_layer + (base + t * cache.pos_stride) * kv_elem;
        scores[t] = kt.attn_dot(q, key, st.bf16, D) * scale;
        top = std::max(top, scores[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < T; ++t) total += (scores[t] = std::exp(scores[t] - top));
      float* o = attn_rows + (r * H + h) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const void* vt = v_layer + (base + t * cache.pos_stride) * kv_elem;
        kt.attn_axpy(o, scores[t], vt, st.bf16, D);
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] = st.round(o[d] * inv);
    });
    linear(L.o, attn.data(), rows, out.data(), st, threads, in.prompt);

    add_rms_norm(out.data(), residual.data(), L.post_norm, m.eps, rows, C, normed.data(), st, glue_threads);
    linear(L.gate_up, normed.data(), rows, gate_up.data(), st, threads, in.prompt);
    const float* gate_up_rows = gate_up.data();
    float* act_rows = act.data();
    for_rows(glue_threads, rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // SwiGLU: silu(gate) * up, rows of I for the down GEMM
        const float* gu = gate_up_rows + r * 2 * I;
        kt.swiglu_row(gu, gu + I, act_rows + r * I, I, st.bf16);
      }
    });
    linear(L.down, act.data(), rows, out.data(), st, threads, in.prompt);
  }
  // The final norm and lm_head on the wanted rows only (a prompt's last token), gathered to the front.
  int64_t wanted = compacted ? rows : 0;
  for (int64_t r = 0; r < rows && !compacted; ++r) {
    if (in.logit_rows) {
      if (next_logit + wanted >= in.logit_count || in.logit_rows[next_logit + wanted] != r0 + r) continue;
    }
    if (wanted != r) {
      std::memcpy(out.data() + wanted * C, out.data() + r * C, C * sizeof(float));
      std::memcpy(residual.data() + wanted * C, residual.data() + r * C, C * sizeof(float));
    }
    ++wanted;
  }
  if (!wanted) return;
  add_rms_norm(out.data(), residual.data(), m.final_norm, m.eps, wanted, C, normed.data(), st);
  linear(m.lm_head, normed.data(), wanted, logits + next_logit * m.vocab, st, threads);
  next_logit += wanted;
}

}  // namespace

const char* decode_rows(const DecodeModel& m, const DecodeRows& in, const DecodeCache& cache, float* logits,
                        int threads) {
  if (in.rows < 1 || !in.positions || (!in.tokens && !in.embeds)) return "decode: no rows";
  for (int64_t r = 0; r < in.rows; ++r) {  // checked before anything is written
    if (in.tokens && (in.tokens[r] < 0 || in.tokens[r] >= m.embed_rows))
      return "decode: token id out of the embedding's range";
    const int64_t slot = in.slots ? in.slots[r] : r;
    if (slot < 0 || slot >= cache.rows) return "decode: cache row out of range";
    if (in.positions[r] < 0 || in.positions[r] >= cache.capacity) return "decode: the KV cache is full";
    if (in.positions[r] >= m.rope_positions) return "decode: position beyond the RoPE table";
  }
  for (int64_t j = 0; in.logit_rows && j < in.logit_count; ++j)
    if (in.logit_rows[j] < 0 || in.logit_rows[j] >= in.rows || (j && in.logit_rows[j] <= in.logit_rows[j - 1]))
      return "decode: logit rows must be ascending row indices";
  // Equal chunks: each chunk reads every weight once, so 130 rows as 64 + 64 + 2 would read SmolLM2's 425 MB of
  // float32 layers for 2 rows (~15 ms at this host's ~28 GB/s); 44 + 43 + 43 does not.
  const int64_t chunk_rows = in.prompt ? decode_prompt_chunk_rows(m) : kChunk;
  const int64_t chunks = (in.rows + chunk_rows - 1) / chunk_rows, per_chunk = (in.rows + chunks - 1) / chunks;
  int64_t next_logit = 0;
  for (int64_t r0 = 0; r0 < in.rows; r0 += per_chunk)
    forward_chunk(m, in, r0, std::min(per_chunk, in.rows - r0), cache, logits, next_logit, threads);
  return "";
}

const char* decode_step(const DecodeModel& m, const int64_t* tokens, int32_t* lengths, int64_t rows,
                        const DecodeCache& cache, float* logits, int threads) {
  DecodeRows in;
  in.rows = rows, in.tokens = tokens, in.positions = lengths;
  const char* problem = decode_rows(m, in, cache, logits, threads);
  if (*problem) return problem;
  for (int64_t r = 0; r < rows; ++r) lengths[r] += 1;
  return "";
}

}  // namespace llava_fast
