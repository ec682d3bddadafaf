// The LLaMA decode step on the CPU in one native call: embedding gather, then per decoder layer RMSNorm, the
// fused q/k/v GEMV, RoPE, the K/V cache write, grouped-query attention over the cache, o_proj, RMSNorm, the
// fused gate/up GEMV, SwiGLU and down_proj, then the final norm and lm_head. See decode.cpp for why; its
// reference is llava_fast/generate.py's decode_step (the torch path), which the tests compare it against.
#pragma once

#include <cstdint>
#include <vector>

namespace llava_fast {

enum ComputeDtype : int { kComputeF32 = 0, kComputeBF16 = 1 };

// One linear layer: y = x @ W^T (+ bias), W in a format of gemv.h.
struct DecodeLinear {
  const void* w = nullptr;
  int format = 0;
  int64_t n = 0, k = 0, group = 0;
  const void* scales = nullptr;
  const void* mins = nullptr;
  const void* bias = nullptr;  // (n,) in the compute dtype, or null
};

struct DecodeLayer {
  const void* input_norm;  // (hidden,) compute dtype
  const void* post_norm;   // (hidden,) compute dtype
  DecodeLinear qkv;        // n = (heads + 2 * kv_heads) * head_dim: q, k, v stacked
  DecodeLinear o;          // n = hidden
  DecodeLinear gate_up;    // n = 2 * intermediate: gate, up stacked
  DecodeLinear down;       // n = hidden
};

struct DecodeModel {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, vocab = 0;
  int64_t embed_rows = 0;      // rows of the embedding table (token ids must be below it)
  int64_t rope_positions = 0;  // rows of the cos/sin tables
  float eps = 1e-6f;
  int64_t sliding_window = 0;  // > 0: a row at position p attends to positions (p - window, p] only (Mistral)
  int dtype = kComputeF32;     // of the embedding, norms, biases, the KV cache and the rounding of activations
  const void* embed = nullptr;       // (embed_rows, hidden)
  const void* final_norm = nullptr;  // (hidden,)
  const float* cos = nullptr;        // (rope_positions, head_dim / 2) float32
  const float* sin = nullptr;
  DecodeLinear lm_head;              // n = vocab
  std::vector<DecodeLayer> layers;
};

// The KV cache as generate.KVCache holds it: k/v (layers, rows, kv_heads, capacity, head_dim) in the compute
// dtype, any strides (a view of some rows is fine); strides in elements.
struct DecodeCache {
  void* k = nullptr;
  void* v = nullptr;
  int64_t layer_stride = 0, row_stride = 0, head_stride = 0, pos_stride = 0;
  int64_t capacity = 0;
  int64_t rows = 0;  // cache rows in this view
};

// What one call computes: `rows` tokens, each at its own (cache row, position), attending to positions
// 0..position of its cache row (with a sliding window, the last sliding_window of them). Every row's K/V of a layer is written before any row of that layer attends, so
// rows of one cache row at consecutive positions are a causal prefill (a chunk of a prompt), and rows of
// different cache rows are a batched decode step; a call may mix both.
struct DecodeRows {
  int64_t rows = 0;
  const int64_t* tokens = nullptr;  // (rows,) token ids, or null when embeds are given
  const void* embeds = nullptr;     // (rows, hidden) input embeddings in the compute dtype (image tokens spliced)
  const int64_t* slots = nullptr;   // (rows,) cache row of each row; null: row r is cache row r
  const int32_t* positions = nullptr;  // (rows,)
  const int64_t* logit_rows = nullptr;  // ascending rows whose logits are wanted; null: all rows
  int64_t logit_count = 0;
  // Rows of prompts (NativeDecodeStep.prefill): int4 and int8 projections run gemm_q4.cpp's / gemm_q8.cpp's
  // GEMMs, whose bits do not depend on the row count but are not the GEMV's; a decode step (false) keeps the GEMV
  // for every row.
  bool prompt = false;
};

// Empty when the model description is usable, else what is wrong.
const char* decode_model_check(const DecodeModel& m);

// Rows a prompt of this model goes through the layers at a time, in the active kernel table: 128, a float32
// prompt on the AVX-512 tables 512, a bfloat16 one the table's gemv_bf16_prompt_rows (the AMX table: 512).
int64_t decode_prompt_chunk_rows(const DecodeModel& m);

// logits (logit_count or rows, vocab) float32 of the wanted rows; writes every row's K/V at its position.
// A decode step's rows go through the layers up to 128 at a time, a prompt's up to decode_prompt_chunk_rows (a
// prompt's later chunks attend to the K/V its earlier ones wrote).
// Returns "" or what is wrong (then nothing was written).
const char* decode_rows(const DecodeModel& m, const DecodeRows& in, const DecodeCache& cache, float* logits,
                        int threads);

// The decode step: tokens (rows,) int64 of cache rows 0..rows-1 at positions lengths (rows,) int32 -> logits
// (rows, vocab) float32; lengths advance by one. Returns "" or what is wrong (then nothing was written).
const char* decode_step(const DecodeModel& m, const int64_t* tokens, int32_t* lengths, int64_t rows,
                        const DecodeCache& cache, float* logits, int threads);

}  // namespace llava_fast
