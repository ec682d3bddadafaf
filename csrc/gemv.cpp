// Few-row GEMV for CPU decode: y (M, N) = x (M, K) @ W (N, K)^T with W in float32, bfloat16, int8 (a scale
// per row) or int4 (a float16 scale and min per group of input channels). Formats: gemv.h.
//
// Why: at batch 1 a decode step reads every weight once and does 2 FLOPs per weight, so it is bound by
// memory reads (~22 GB/s measured on the 2-core EPYC this was written on). PyTorch 2.13's CPU kernels reach
// a fraction of that at M = 1 (576 x 1536, 2 threads, a busy host: float32 F.linear ~12 GB/s, bfloat16
// F.linear ~1.2 GB/s, aten._weight_int8pack_mm ~0.1-1.6 GB/s, torchao's int4 CPU kernel ~0.7 GB/s), so the
// int8 and int4 models ran slower than float32. These kernels stream each weight once with AVX-512:
//   float32  16 weights per FMA; above M = 1 a tile of 4 weight rows x 6 x rows (24 FMAs per 10 loads);
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
// count), so a row's result does not depend on what else is in the batch. A scalar version of every kernel (same integer arithmetic for int8 and
// int4) runs where AVX-512 + AVX512_BF16 + AVX512_VNNI is missing (and in tests, as a check).
#include "gemv.h"


#include "convert.h"
#include "simd.h"

#include <immintrin.h>

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


// One call's inputs as the kernels read them. The int8 and int4 formats take x quantized to int8 (x_q) in
// blocks of 32 along K with one float scale per block (x_s = max|x in block| / 127, x_q = round(x / x_s)), as
// llama.cpp's Q8_0 x Q8 / Q4_1 x Q8_1 dot products do: the weight-times-activation products are then integer
// (VPDPBUSD: 64 u8 x s8 multiply-adds per instruction) and each block's integer sum is scaled once. Done once
// per call for all N rows (~1 us at K = 1536); llava_fast/cpu/gemv.py `quantize_activations` is its torch twin.
struct Prepared {
  const GemvArgs* a;
  const float* xf;       // (M, K) float32, row stride K (float32 and scalar kernels)
  const uint16_t* xb;    // (M, K) bf16 bits, row stride K (bf16 format only)
  float* yf;             // (M, N) float32 results (row stride N) when y is bf16; else null
  // Q8 / Q4: x quantized. B = ceil(K / 32) blocks; kp: padded row length of xq (a multiple of 128), zeros past K.
  int64_t blocks, kp;
  const int8_t* xq;      // (M, kp) x_q in K order
  const float* xs;       // (M, B) x_s per block
  // Q8, AVX-512: per 64-byte chunk c of a row, 16 int32 lanes (lane l covers k = 64c + 4l .. 64c + 4l + 3):
  const int32_t* corr8;  // (M, kp / 64, 16) -128 * (sum of the lane's 4 x_q): the offset-binary correction
  const float* xs8;      // (M, kp / 64, 16) x_s of the lane's block (2c + l / 8)
  // Q4, AVX-512: per 128-weight chunk c (four 32-blocks, 64 packed bytes):
  const int8_t* xq4;     // (M, kp / 128, 128) x_q in nibble order: [0, 64) the k the low nibbles hold
                         //   (block i's weights 0..15 at 16i), [64, 128) the high nibbles' (weights 16..31)
  const float* xs4;      // (M, kp / 128, 16) x_s of lane l's block (4c + l / 4)
  const float* xmin;     // (M, K / group) sum over the group's blocks of x_s * sum(x_q): what a group's min
                         //   multiplies (sum_k min * x_s x_q)
};

inline void store(const Prepared& p, int64_t m, int64_t n, float v) {
  if (p.yf) {
    p.yf[m * p.a->n + n] = v;
  } else {
    static_cast<float*>(p.a->y)[m * p.a->y_stride + n] = v;
  }
}

// ------------------------------------------------------------------------------------------------------
// Scalar kernels (any CPU; the reference the AVX-512 ones are checked against in tests). Same arithmetic:
// float products for F32/BF16; for Q8/Q4 an exact integer sum per 32-block, scaled per block.
// ------------------------------------------------------------------------------------------------------

void rows_scalar(const Prepared& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.m; ++m) {
      float acc = 0.f;
      switch (a.format) {
        case kWeightF32: {
          const float* w = static_cast<const float*>(a.w) + n * K;
          const float* x = p.xf + m * K;
          for (int64_t k = 0; k < K; ++k) acc += w[k] * x[k];
          break;
        }
        case kWeightBF16: {
          const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
          const uint16_t* xb = p.xb + m * K;
          for (int64_t k = 0; k < K; ++k) acc += bf16_to_f32(w[k]) * bf16_to_f32(xb[k]);
          break;
        }
        case kWeightQ8: {  // offset-binary: the weight is u - 128
          const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
          const int8_t* xq = p.xq + m * p.kp;
          for (int64_t b = 0; b < p.blocks; ++b) {
            int32_t d = 0;
            for (int64_t k = b * 32; k < std::min(K, b * 32 + 32); ++k) d += (int32_t(w[k]) - 128) * xq[k];
            acc += p.xs[m * p.blocks + b] * float(d);
          }
          acc *= static_cast<const float*>(a.scales)[n];
          break;
        }
        case kWeightQ4: {
          const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
          const int64_t G = K / a.group;
          const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
          const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
          const int8_t* xq = p.xq + m * p.kp;
          for (int64_t b = 0; b < p.blocks; ++b) {
            const uint8_t* blk = w + b * 16;
            int32_t d = 0;
            for (int j = 0; j < 16; ++j) d += int32_t(blk[j] & 15) * xq[b * 32 + j] + int32_t(blk[j] >> 4) * xq[b * 32 + 16 + j];
            acc += (f16_to_f32(sc[b * 32 / a.group]) * p.xs[m * p.blocks + b]) * float(d);
          }
          for (int64_t g = 0; g < G; ++g) acc += f16_to_f32(mn[g]) * p.xmin[m * G + g];
          break;
        }
      }
      store(p, m, n, acc);
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// AVX-512 kernels: one weight row at a time, reused by all M activation rows from L1 (a row is <= 6 KB
// here), so W is read from memory once per call whatever M is (see the top of the file for the callers' M). Rows are contiguous, so a thread's rows are one sequential stream; the first
// version took 4 rows at a time, i.e. 4 interleaved streams of K * 4 bytes (36 cache lines at K = 576),
// too short for the hardware prefetcher to ramp up on each: 11-13 GB/s where the machine reads ~20 GB/s.
// Each kernel also prefetches ahead of where it reads (into the next rows).
// ------------------------------------------------------------------------------------------------------

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512dq,avx512vnni,fma,f16c")))

AVX512 inline __mmask16 tail16(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }
AVX512 inline __mmask64 tail64(int64_t left) { return left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1; }

// bfloat16 rows (1,152 bytes at K = 576) and float32 ones at M = 1 prefetch into L2, 8 KB ahead. bfloat16,
// measured on a standalone stream of 226 MB (2 threads, medians of 6 interleaved rounds): 24 GB/s with an L1
// prefetch 1 KB ahead (2 KB: 23), 26 with none, 27-28 into L2 4 KB ahead, 29-33 into L2 8 KB ahead;
// the L1 hint had made it the slowest stream of the four formats (~76% of the roofline; SmolLM2 decode 0.98x
// -> 1.13-1.18x llama.cpp's F16). float32 at M = 1: equal on that stream, SmolLM2 decode 40.9-44.8 -> 42.8-46.2
// tok/s (two interleaved pairs).
constexpr int kPrefetchL2 = 8192;
AVX512 inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchL2, _MM_HINT_T1); }

AVX512 inline __m512bh ld(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

AVX512 float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t K) {  // K even (checked)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    prefetch_l2(w + k), prefetch_l2(w + k + 32), prefetch_l2(w + k + 64), prefetch_l2(w + k + 96);
    a0 = _mm512_dpbf16_ps(a0, ld(w + k), ld(x + k));
    a1 = _mm512_dpbf16_ps(a1, ld(w + k + 32), ld(x + k + 32));
    a2 = _mm512_dpbf16_ps(a2, ld(w + k + 64), ld(x + k + 64));
    a3 = _mm512_dpbf16_ps(a3, ld(w + k + 96), ld(x + k + 96));
  }
  for (; k < K; k += 32) {  // pairs never straddle the tail: K is even
    const int64_t left = K - k;
    const __mmask32 mk = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1);
    prefetch_l2(w + k);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k), (__m512bh)_mm512_maskz_loadu_epi16(mk, x + k));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// int8/int4 blocks of R rows: while a block is read (R streams, one line of each per step), the next block
// is prefetched linearly, one line per line read. Measured on the int8 lm_head (49152 x 576, one thread, CPU
// time): 17 GB/s, where prefetching 1 KB ahead of each row's own position gave 8.5 GB/s (those
// lines were still to be read by the other rows: prefetched twice, the next block's first lines never).
AVX512 inline void prefetch_next_block(const uint8_t* next_block, int64_t line) {
  _mm_prefetch(reinterpret_cast<const char*>(next_block + line * 64), _MM_HINT_T0);
}

// Which lines of the next weight block a tile prefetches: the block (NT rows, contiguous) is split over the M / 4
// tiles that compute on the current one, `per_step` lines per k step, so its reads overlap the whole block's
// compute. (Issuing the whole next block during the first tile stalled on the core's outstanding misses: those
// prefetches were the hottest instructions, and a 16-row tiny step took 16 ms.)
struct NextBlock {
  const char* base;  // the next block's first byte; null: nothing to prefetch (M = 1 prefetches in its stream)
  int64_t first, end;  // lines [first, end) of it are this tile's
  int per_step;
};

// float32: a tile of NT weight rows x MT activation rows, one accumulator per (row, activation) pair, k in
// order 16 at a time (masked tail), each sum reduced by reduce4's tree. The order of every sum is therefore
// the same whatever the tile, M or thread count: a request's logits do not depend on what else is in the batch
// (the server's rows equal generate() alone, bit for bit). At M = 1 one chain per row still outruns memory
// (one FMA per 64 bytes, 4 cycles' latency: ~48 GB/s per core at 3 GHz); above it a 4 x 6 tile does 24 FMAs
// per 10 loads in 24 + 4 + 1 of the 32 vector registers. History (2 threads, weights from memory): one dot
// product per pair (1 FMA per 2 loads, a reduction per 32 FMAs) -> a 4 x 4 tile took tiny's lm_head 32064 x
// 512 at M = 16 from 51 to 100 GFLOP/s; 4 x 4 -> 4 x 6 with the full k steps unmasked took the prefill shapes
// at M = 55-64 (tiny's 1024/512/2752 x 512, 512 x 1376; SmolLM2's 960/576/3072 x 576, 576 x 1536) from
// 142-157 to 164-192 GFLOP/s (geometric means, interleaved rounds; 6 x 4, 5 x 5 and 8 x 3 measured 147-181).
constexpr int kTileRows = 4, kTileCols = 6;  // NT, and MT of the full tiles

// One k step of a tile: 16 k of every (row, activation) pair. mk is a constant 0xffff except in the tail, so
// the full steps load without masks.
template <int NT, int MT>
AVX512 inline void tile_step_f32(const float* w, const float* x, int64_t K, int64_t k, __mmask16 mk, __m512* acc) {
  __m512 wv[NT];
  #pragma GCC unroll 8
  for (int r = 0; r < NT; ++r) wv[r] = _mm512_maskz_loadu_ps(mk, w + r * K + k);
  #pragma GCC unroll 8
  for (int c = 0; c < MT; ++c) {
    const __m512 xv = _mm512_maskz_loadu_ps(mk, x + c * K + k);
    #pragma GCC unroll 8
    for (int r = 0; r < NT; ++r) acc[r * MT + c] = _mm512_fmadd_ps(wv[r], xv, acc[r * MT + c]);
  }
}

template <int NT, int MT>
AVX512 void tile_f32(const Prepared& p, int64_t n, int64_t m, const NextBlock& next) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  const float* w = static_cast<const float*>(a.w) + n * K;
  const float* x = p.xf + m * K;
  __m512 acc[NT * MT];
  #pragma GCC unroll 32
  for (int i = 0; i < NT * MT; ++i) acc[i] = _mm512_setzero_ps();
  int64_t line = next.first;
  auto prefetch = [&] {
    for (int i = 0; i < next.per_step && line < next.end; ++i, ++line) _mm_prefetch(next.base + line * 64, _MM_HINT_T0);
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next.base) {
      prefetch();
    } else if (MT == 1 && NT == 1) {
      prefetch_l2(w + k);  // M = 1: kPrefetchL2 bytes ahead in the row stream
    }
    tile_step_f32<NT, MT>(w, x, K, k, __mmask16(0xffff), acc);
  }
  if (k < K) {
    if (next.base) prefetch();
    tile_step_f32<NT, MT>(w, x, K, k, tail16(K - k), acc);
  }
  #pragma GCC unroll 8  // constant indices keep acc in registers (else GCC spills them all every step)
  for (int i = 0; i < NT * MT; i += 4) {  // 4 sums per shuffle tree; a short group repeats its last vector
    const int last = NT * MT - 1;
    alignas(16) float out[4];
    _mm_store_ps(out, reduce4(acc[i], acc[std::min(i + 1, last)], acc[std::min(i + 2, last)], acc[std::min(i + 3, last)]));
    for (int j = 0; j < 4 && i + j <= last; ++j) store(p, m + (i + j) % MT, n + (i + j) / MT, out[j]);
  }
}

// All M activation rows x weight rows n .. n + NT, in tiles of MT = kTileCols rows (and MT - 1: see below).
template <int NT>
AVX512 void tiles_f32(const Prepared& p, int64_t n, int64_t n1) {
  constexpr int MB = kTileCols;
  const int64_t M = p.a->m, K = p.a->k;
  // M = q * MB + r: (MB - r) tiles of MB - 1 rows and the rest of MB (55 = 5 x 5 + 5 x 6), not a tile of r
  // rows (a 4 x 1 tile does 4 FMAs per 5 loads).
  int64_t smaller = (MB - M % MB) % MB;
  if (smaller * (MB - 1) > M) smaller = 0;
  const int64_t tiles = smaller + (M - smaller * (MB - 1) + MB - 1) / MB, steps = (K + 15) / 16;
  const int64_t next_rows = std::min<int64_t>(NT, n1 - n - NT);  // the block after this one, in this range
  NextBlock next{nullptr, 0, 0, 0};
  if (M > 1 && next_rows > 0) {
    next.base = reinterpret_cast<const char*>(static_cast<const float*>(p.a->w) + (n + NT) * K);
    next.end = (next_rows * K * 4 + 63) / 64;
    next.per_step = int((next.end + tiles * steps - 1) / (tiles * steps));
  }
  auto advance = [&](int64_t t) {
    NextBlock b = next;
    b.first = std::min(next.end, t * steps * next.per_step);
    return b;
  };
  int64_t m = 0, t = 0;
  for (; t < smaller; ++t, m += MB - 1) tile_f32<NT, MB - 1>(p, n, m, advance(t));
  for (; m + MB <= M; m += MB, ++t) tile_f32<NT, MB>(p, n, m, advance(t));
  static_assert(MB == 6, "the tail's cases below");
  switch (M - m) {
    case 5: tile_f32<NT, 5>(p, n, m, advance(t)); break;
    case 4: tile_f32<NT, 4>(p, n, m, advance(t)); break;
    case 3: tile_f32<NT, 3>(p, n, m, advance(t)); break;
    case 2: tile_f32<NT, 2>(p, n, m, advance(t)); break;
    case 1: tile_f32<NT, 1>(p, n, m, advance(t)); break;
  }
}

// R <= 4 sums through reduce4's tree, a short group repeating its last vector as tile_f32 does: a row summed
// alone (a range's last N % 4 rows) gets the bits it gets in a block of 4, and the ranges' ends move with the
// thread count (_mm512_reduce_add_ps's order differs: 1 vs 2 threads changed an int8 lm_head's logits).
template <int R>
AVX512 inline void finish(const Prepared& p, int64_t m, int64_t n, const __m512* acc, const float* row_scale) {
  static_assert(R >= 1 && R <= 4, "finish: 1 to 4 rows");
  alignas(16) float out[4];
  _mm_store_ps(out, reduce4(acc[0], acc[std::min(1, R - 1)], acc[std::min(2, R - 1)], acc[std::min(3, R - 1)]));
  for (int r = 0; r < R; ++r) store(p, m, n + r, row_scale ? row_scale[r] * out[r] : out[r]);
}

// int8, offset-binary u = w + 128: VPDPBUSD(corr, u, x_q) = sum w * x_q per lane exactly (corr = -128 sum x_q),
// then one convert and one FMA per 64 weights with the lanes' block scales; the row scale multiplies at the
// end. R rows at a time share the loads of x_q, corr and the scales and one reduction (int8 rows are short:
// K bytes, and R consecutive rows are one contiguous stretch of memory, prefetched ahead).
template <int R>
AVX512 void rows_q8(const Prepared& p, int64_t n) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, chunks = (K + 63) / 64;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
  for (int64_t m = 0; m < a.m; ++m) {
    const int8_t* xq = p.xq + m * p.kp;
    const int32_t* corr = p.corr8 + m * (p.kp / 64) * 16;
    const float* xs = p.xs8 + m * (p.kp / 64) * 16;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = c * 64;
      const __mmask64 mk = tail64(K - k);
      const __m512i xv = _mm512_loadu_si512(xq + k), cv = _mm512_loadu_si512(corr + c * 16);
      const __m512 sv = _mm512_loadu_ps(xs + c * 16);
      for (int r = 0; r < R; ++r) {
        if (m == 0) prefetch_next_block(w + R * K, c * R + r);
        const __m512i u = _mm512_maskz_loadu_epi8(mk, w + r * K + k);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cv, u, xv)), sv, acc[r]);
      }
    }
    finish<R>(p, m, n, acc, static_cast<const float*>(a.scales) + n);
  }
}

// int4: 64 packed bytes = 128 weights = four 32-blocks. Low nibbles (AND) and high nibbles (shift, AND) are the
// unsigned operands of two VPDPBUSD against x_q in nibble order; lane l then holds block (l / 4)'s partial sum,
// scaled by that block's weight scale (its group's, expanded to lanes by VPERMPS) times x_s. The mins add
// sum_g min_g * xmin_g, 16 groups per FMA.
//
// A tile of R weight rows x MT <= 4 activation rows: each chunk's nibbles and block scales are unpacked once
// for the MT rows (one row at a time unpacked them again for every activation row: 7 of 12 instructions per
// 128 weights per row; SmolLM2's shapes at M = 64, 2 threads: ~124 GFLOP/s, this tile 131-166). It serves the
// multi-row decode steps (server batches); an int4 prefill runs gemm_q4.cpp's outer-product GEMM (2x the
// multiply-adds per instruction), an int8 one stays on oneDNN's bfloat16 GEMM over a dequantized copy
// (native_decode.py `prefills`). Every output's arithmetic is the same whatever MT: the same bits at any M.
template <int R, int MT>
AVX512 void tile_q4(const Prepared& p, int64_t n, int64_t m0, __m512i scale_lanes, int groups_per_chunk,
                    int group_shift) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, G = K / a.group, half = K / 2, chunks = (half + 63) / 64;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * half;
  const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
  const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[R][MT];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int j = 0; j < MT; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t byte = c * 64, g0 = (c * 128) >> group_shift;
    const __mmask64 mk = tail64(half - byte);
    const __mmask8 ms = __mmask8((1u << std::min<int64_t>(groups_per_chunk, G - g0)) - 1);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (m0 == 0) prefetch_next_block(w + R * half, c * R + r);
      const __m512i v = _mm512_maskz_loadu_epi8(mk, w + r * half + byte);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m128 s4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(ms, sc + r * G + g0));
      const __m512 ws = _mm512_permutexvar_ps(scale_lanes, _mm512_castps128_ps512(s4));
      #pragma GCC unroll 4
      for (int j = 0; j < MT; ++j) {
        const int8_t* xq = p.xq4 + (m0 + j) * p.kp + c * 128;
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
        d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xq + 64));
        const __m512 s = _mm512_mul_ps(ws, _mm512_loadu_ps(p.xs4 + (m0 + j) * (p.kp / 128) * 16 + c * 16));
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r][j]);
      }
    }
  }
  #pragma GCC unroll 4
  for (int j = 0; j < MT; ++j) {
    const float* xmin = p.xmin + (m0 + j) * G;
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 mk = tail16(G - g);
      const __m512 xm = _mm512_maskz_loadu_ps(mk, xmin + g);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, mn + r * G + g)), xm, acc[r][j]);
    }
    __m512 out[R];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) out[r] = acc[r][j];
    finish<R>(p, m0 + j, n, out, nullptr);
  }
}

template <int R>
AVX512 void tiles_q4(const Prepared& p, int64_t n, __m512i scale_lanes, int groups_per_chunk, int group_shift) {
  const int64_t M = p.a->m;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_q4<R, 4>(p, n, m, scale_lanes, groups_per_chunk, group_shift);
  switch (M - m) {
    case 3: tile_q4<R, 3>(p, n, m, scale_lanes, groups_per_chunk, group_shift); break;
    case 2: tile_q4<R, 2>(p, n, m, scale_lanes, groups_per_chunk, group_shift); break;
    case 1: tile_q4<R, 1>(p, n, m, scale_lanes, groups_per_chunk, group_shift); break;
  }
}

AVX512 void rows_avx512(const Prepared& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, M = a.m;
  switch (a.format) {
    case kWeightF32: {
      int64_t n = n0;
      if (M > 1)  // one row at a time at M = 1: one sequential stream for the prefetcher (see above)
        for (; n + kTileRows <= n1; n += kTileRows) tiles_f32<kTileRows>(p, n, n1);
      for (; n < n1; ++n) tiles_f32<1>(p, n, n1);
      break;
    }
    case kWeightBF16:
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m)
          store(p, m, n, dot_bf16(static_cast<const uint16_t*>(a.w) + n * K, p.xb + m * K, K));
      break;
    case kWeightQ8: {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) rows_q8<4>(p, n);
      for (; n < n1; ++n) rows_q8<1>(p, n);
      break;
    }
    default: {
      // Lane l of a chunk belongs to block l / 4, of group (l / 4) * 32 / group counted from the chunk's first.
      alignas(64) int32_t lanes[16];
      for (int l = 0; l < 16; ++l) lanes[l] = int32_t((l / 4) * 32 / a.group);
      const __m512i scale_lanes = _mm512_load_si512(lanes);
      const int groups_per_chunk = int(std::max<int64_t>(1, 128 / a.group));
      const int group_shift = __builtin_ctzll(uint64_t(a.group));  // a power of two (checked)
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) tiles_q4<4>(p, n, scale_lanes, groups_per_chunk, group_shift);
      for (; n < n1; ++n) tiles_q4<1>(p, n, scale_lanes, groups_per_chunk, group_shift);
    }
  }
}

// AVX512_BF16 CPUs (Cooper Lake, Sapphire Rapids and later, Zen 4 and later) all have AVX512_VNNI too.
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}

using RowsFn = void (*)(const Prepared&, int64_t, int64_t);
std::atomic<RowsFn> g_rows{cpu_has_avx512() ? rows_avx512 : rows_scalar};

// The activation quantization of one row with AVX-512: the same IEEE operations as the scalar loop (an exact
// max, one division per element, round half to even), so the same bytes; ~10x faster (9 us -> <1 us at
// K = 1536, i.e. ~0.5 ms of a SmolLM2 int4 decode step's 4 ms). xq must be zeroed past K.
AVX512 inline __mmask16 mask16(int64_t left) { return left <= 0 ? __mmask16(0) : tail16(left); }

AVX512 void quantize_row_avx512(const float* x, int64_t K, int8_t* xq, float* xs) {
  for (int64_t b = 0, k0 = 0; k0 < K; ++b, k0 += 32) {
    const __mmask16 m0 = mask16(K - k0), m1 = mask16(K - k0 - 16);
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + k0), v1 = _mm512_maskz_loadu_ps(m1, x + k0 + 16);
    const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.f;
    xs[b] = d;
    if (!(d > 0.f)) continue;
    const __m512 dv = _mm512_set1_ps(d);
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v0, dv), kNearest));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v1, dv), kNearest));
    _mm_mask_storeu_epi8(xq + k0, m0, _mm512_cvtsepi32_epi8(q0));
    _mm_mask_storeu_epi8(xq + k0 + 16, m1, _mm512_cvtsepi32_epi8(q1));
  }
}

void quantize_row_scalar(const float* x, int64_t K, int8_t* xq, float* xs) {
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

// corr[l] = -128 * (sum of the 4 x_q of lane l) for one 64-byte chunk: VPDPBUSD against ones.
AVX512 void corr_chunk_avx512(const int8_t* xq, int32_t* corr) {
  const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(xq));
  _mm512_storeu_si512(corr, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s, 7)));
}

// x quantized per 32-block (see Prepared) into the buffers of every layout the kernels read.
struct QuantizedX {
  std::vector<int8_t> xq, xq4;
  std::vector<float> xs, xs8, xs4, xmin;
  std::vector<int32_t> corr8;

  void build(Prepared& p) {
    const GemvArgs& a = *p.a;
    const int64_t M = a.m, K = a.k, B = (K + 31) / 32, kp = (K + 127) / 128 * 128;
    p.blocks = B, p.kp = kp;
    xq.assign(M * kp, 0);
    xs.assign(M * B, 0.f);
    const bool avx512 = g_rows.load() == rows_avx512;
    for (int64_t m = 0; m < M; ++m) quantize_activations_q8(p.xf + m * K, K, &xq[m * kp], &xs[m * B]);
    p.xq = xq.data(), p.xs = xs.data();
    if (a.format == kWeightQ8) {
      const int64_t chunks = kp / 64;
      corr8.assign(M * chunks * 16, 0);
      xs8.assign(M * chunks * 16, 0.f);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < chunks; ++c) {
          if (avx512) corr_chunk_avx512(&xq[m * kp + c * 64], &corr8[(m * chunks + c) * 16]);
          for (int l = 0; l < 16; ++l) {
            const int64_t k = c * 64 + l * 4, b = k / 32, i = (m * chunks + c) * 16 + l;
            const int8_t* q = &xq[m * kp + k];
            if (!avx512) corr8[i] = -128 * (int32_t(q[0]) + q[1] + q[2] + q[3]);
            xs8[i] = b < B ? xs[m * B + b] : 0.f;
          }
        }
      p.corr8 = corr8.data(), p.xs8 = xs8.data();
    } else {
      const int64_t chunks = kp / 128, G = K / a.group;
      xq4.assign(M * kp, 0);
      xs4.assign(M * chunks * 16, 0.f);
      xmin.assign(M * G, 0.f);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = 0; c < chunks; ++c) {
          for (int i = 0; i < 4; ++i) {
            std::memcpy(&xq4[m * kp + c * 128 + 16 * i], &xq[m * kp + c * 128 + 32 * i], 16);
            std::memcpy(&xq4[m * kp + c * 128 + 64 + 16 * i], &xq[m * kp + c * 128 + 32 * i + 16], 16);
          }
          for (int l = 0; l < 16; ++l) {
            const int64_t b = c * 4 + l / 4;
            xs4[(m * chunks + c) * 16 + l] = b < B ? xs[m * B + b] : 0.f;
          }
        }
        activation_group_sums(&xq[m * kp], &xs[m * B], K, a.group, &xmin[m * G]);
      }
      p.xq4 = xq4.data(), p.xs4 = xs4.data(), p.xmin = xmin.data();
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
      _mm_pause();
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
  thread_local QuantizedX xq_buf;
  Prepared p{};
  p.a = &a;
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
  if (a.format == kWeightQ8 || a.format == kWeightQ4) xq_buf.build(p);
  if (a.x_dtype == kActBF16) {
    y_buf.resize(M * a.n);
    p.yf = y_buf.data();
  }
  // Contiguous row ranges, 4 per thread (few enough that claiming one costs nothing next to it; several, so a
  // thread whose core is taken by other work leaves its share to the others), each at least 16 rows.
  const RowsFn rows = g_rows.load();
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(int64_t(threads) * 4, a.n / 16)));
  pool().run(threads, parts, [&](int i) {
    const int64_t n0 = a.n * i / parts, n1 = a.n * (i + 1) / parts;
    rows(p, n0, n1);
    if (p.yf) {  // bfloat16 output: each thread rounds its own range
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n)
          static_cast<uint16_t*>(a.y)[m * a.y_stride + n] = f32_to_bf16(p.yf[m * a.n + n]);
    }
  });
}

void parallel_for(int threads, int chunks, const std::function<void(int)>& task) { pool().run(threads, chunks, task); }

void quantize_activations_q8(const float* x, int64_t K, int8_t* xq, float* xs) {
  if (g_rows.load() == rows_avx512) {
    quantize_row_avx512(x, K, xq, xs);
  } else {
    quantize_row_scalar(x, K, xq, xs);
  }
}

void activation_group_sums(const int8_t* xq, const float* xs, int64_t K, int64_t group, float* xmin) {
  for (int64_t b = 0; b < K / 32; ++b) {
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += xq[b * 32 + j];
    xmin[b * 32 / group] += xs[b] * float(s);
  }
}

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
