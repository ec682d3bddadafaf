// The NEON table (kernels.h): ARMv8.2-A Advanced SIMD with the dot-product extension (SDOT: 16 s8 x s8
// multiply-adds into 4 int32 lanes per instruction) and half-precision conversions; compiled with
// -march=armv8.2-a+dotprod+fp16 and nothing else is. Runs on Apple M1 and later (Linux or macOS), AWS Graviton 2
// and later, Ampere Altra, Cortex-A76 and later; dispatch.cpp uses it only where HWCAP / sysctl report
// asimddp. (i8mm's SMMLA would help the prefill GEMM's 2 x 2 row blocks; not used yet.)
//
// GEMV (gemv.cpp: the algorithm and the scalar reference), every output on its own, order fixed by K:
//   float32   4 accumulators of 4 lanes along K (16 per step), one fixed reduction;
//   bfloat16  the weight widened by a shift (SHLL #16), times x rounded to bfloat16 and widened once per call
//             (exact products, as the other tables');
//   int8      per 32-block: u XOR 0x80 is the signed weight, two SDOT against x_q (exact int32 sums), converted
//             and multiplied by x_s into the accumulator (FMLA);
//   int4      per 32-block: AND / USHR give the low (weights 0..15) and high (16..31) nibbles in K order, two SDOT
//             against x_q, scaled by fp16 scale x x_s; the mins' sum_g min_g * xmin_g after the reduction.
// Speed: not measured (this project's CI runs it under qemu-user, correct but not timed).
#include <arm_neon.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"
#include "reference.h"

namespace llava_fast {
namespace {

inline float reduce4(float32x4_t a0, float32x4_t a1, float32x4_t a2, float32x4_t a3) {
  return vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
}

void gemv_f32(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = static_cast<const float*>(a.w) + n * K;
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = p.xf + m * K;
      float32x4_t acc[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int i = 0; i < 4; ++i) acc[i] = vfmaq_f32(acc[i], vld1q_f32(w + k + 4 * i), vld1q_f32(x + k + 4 * i));
      if (k < K) {  // the tail as one more step with zeros past K
        float wt[16] = {}, xt[16] = {};
        std::memcpy(wt, w + k, (K - k) * 4), std::memcpy(xt, x + k, (K - k) * 4);
        for (int i = 0; i < 4; ++i) acc[i] = vfmaq_f32(acc[i], vld1q_f32(wt + 4 * i), vld1q_f32(xt + 4 * i));
      }
      gemv_store(p, m, n, reduce4(acc[0], acc[1], acc[2], acc[3]));
    }
  }
}

void gemv_bf16(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = p.xbf + m * K;
      float32x4_t acc[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
      auto step = [&](const uint16_t* wp, const float* xp) {
        const uint16x8_t h0 = vld1q_u16(wp), h1 = vld1q_u16(wp + 8);
        acc[0] = vfmaq_f32(acc[0], vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h0), 16)), vld1q_f32(xp));
        acc[1] = vfmaq_f32(acc[1], vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h0), 16)), vld1q_f32(xp + 4));
        acc[2] = vfmaq_f32(acc[2], vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h1), 16)), vld1q_f32(xp + 8));
        acc[3] = vfmaq_f32(acc[3], vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h1), 16)), vld1q_f32(xp + 12));
      };
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) step(w + k, x + k);
      if (k < K) {
        uint16_t wt[16] = {};
        float xt[16] = {};
        std::memcpy(wt, w + k, (K - k) * 2), std::memcpy(xt, x + k, (K - k) * 4);
        step(wt, xt);
      }
      gemv_store(p, m, n, reduce4(acc[0], acc[1], acc[2], acc[3]));
    }
  }
}

void gemv_q8(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, B = p.blocks;
  const uint8x16_t flip = vdupq_n_u8(0x80);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
    for (int64_t m = 0; m < a.m; ++m) {
      const int8_t* xq = p.xq + m * p.kp;  // zeros past K
      const float* xs = p.xs + m * B;
      float32x4_t acc[2] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
      for (int64_t b = 0; b < B; ++b) {
        uint8x16_t u0, u1;
        if (K - b * 32 >= 32) {
          u0 = vld1q_u8(w + b * 32), u1 = vld1q_u8(w + b * 32 + 16);
        } else {  // the tail: 0x80 (weight 0) past K
          uint8_t t[32];
          std::memset(t, 0x80, 32);
          std::memcpy(t, w + b * 32, K - b * 32);
          u0 = vld1q_u8(t), u1 = vld1q_u8(t + 16);
        }
        int32x4_t d = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(veorq_u8(u0, flip)), vld1q_s8(xq + b * 32));
        d = vdotq_s32(d, vreinterpretq_s8_u8(veorq_u8(u1, flip)), vld1q_s8(xq + b * 32 + 16));
        acc[b & 1] = vfmaq_n_f32(acc[b & 1], vcvtq_f32_s32(d), xs[b]);
      }
      gemv_store(p, m, n, vaddvq_f32(vaddq_f32(acc[0], acc[1])) * static_cast<const float*>(a.scales)[n]);
    }
  }
}

void gemv_q4(const GemvRows& p, int64_t n0, int64_t n1) {
  const GemvArgs& a = *p.a;
  const int64_t K = a.k, B = p.blocks, G = K / a.group, per_group = a.group / 32;
  const uint8x16_t low4 = vdupq_n_u8(15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
    const __fp16* sc = reinterpret_cast<const __fp16*>(static_cast<const uint16_t*>(a.scales) + n * G);
    const __fp16* mn = reinterpret_cast<const __fp16*>(static_cast<const uint16_t*>(a.mins) + n * G);
    for (int64_t m = 0; m < a.m; ++m) {
      const int8_t* xq = p.xq + m * p.kp;
      const float* xs = p.xs + m * B;
      float32x4_t acc[2] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
      for (int64_t b = 0; b < B; ++b) {
        const uint8x16_t v = vld1q_u8(w + b * 16);
        int32x4_t d = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(v, low4)), vld1q_s8(xq + b * 32));
        d = vdotq_s32(d, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vld1q_s8(xq + b * 32 + 16));
        const float s = float(sc[b / per_group]) * xs[b];
        acc[b & 1] = vfmaq_n_f32(acc[b & 1], vcvtq_f32_s32(d), s);
      }
      float sum = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
      const float* xmin = p.xmin + m * G;
      for (int64_t g = 0; g < G; ++g) sum += float(mn[g]) * xmin[g];
      gemv_store(p, m, n, sum);
    }
  }
}

// The scalar reference's bytes: an exact max, one IEEE division per element, FCVTNS rounds ties to even.
void quantize_row_q8(const float* x, int64_t K, int8_t* xq, float* xs) {
  for (int64_t b = 0, k0 = 0; k0 < K; ++b, k0 += 32) {
    const int64_t left = std::min<int64_t>(32, K - k0);
    float t[32] = {};
    std::memcpy(t, x + k0, left * 4);
    float32x4_t v[8], mx = vdupq_n_f32(0.f);
    for (int i = 0; i < 8; ++i) mx = vmaxq_f32(mx, vabsq_f32(v[i] = vld1q_f32(t + 4 * i)));
    const float d = vmaxvq_f32(mx) / 127.f;
    xs[b] = d;
    if (!(d > 0.f)) continue;
    const float32x4_t dv = vdupq_n_f32(d);
    int8_t q[32];
    for (int i = 0; i < 8; i += 2) {
      const int16x8_t h = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vdivq_f32(v[i], dv))),
                                       vqmovn_s32(vcvtnq_s32_f32(vdivq_f32(v[i + 1], dv))));
      vst1_s8(q + 4 * i, vqmovn_s16(h));
    }
    std::memcpy(xq + k0, q, left);
  }
}

}  // namespace

const KernelTable* neon_kernels() {
  static const KernelTable table{
      "neon", "neon_dotprod",
      gemv_f32, gemv_bf16, gemv_q8, gemv_q4, nullptr, nullptr,
      quantize_row_q8,
      // The prefill GEMM panel, dequantization and the decode glue: the scalar loops for now.
      gemm_q4_panel_scalar, dequantize_rows_scalar,
      add_rms_norm_row_scalar, rope_scalar, store_row_scalar, swiglu_row_scalar,
      attn_dot_scalar, attn_axpy_scalar, attend_kernel_none};
  return &table;
}

}  // namespace llava_fast
