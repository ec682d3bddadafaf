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
// int4 GEMM panel (SDOT by lane: 4 weight rows x 4 k against one x row's 4 x_q) and dequantization: bit for bit
// the scalar reference. The decode glue and attention run the scalar loops.
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

// ---- int4 prefill GEMM panel (gemm_q4.cpp; layout: kernels.h): bit for bit the scalar panel ----------------

void pack_panel(const GemvArgs& a, int64_t n0, uint8_t* w, float* scales, float* mins) {
  const int64_t K = a.k, B = K / 32, G = K / a.group, half = K / 2, rows = std::min<int64_t>(kQ4Panel, a.n - n0);
  const uint8_t* src = static_cast<const uint8_t*>(a.w) + n0 * half;
  const uint8x16_t low4 = vdupq_n_u8(15);
  for (int64_t b = 0; b < B; ++b) {
    uint8_t* out = w + b * 8 * 128;
    for (int64_t r = 0; r < kQ4Panel; ++r) {
      // Row r's 16 bytes: 32-bit word j holds k = 4j .. 4j + 3 (low nibbles) and 16 + 4j .. (high nibbles).
      const uint8x16_t blk = r < rows ? vld1q_u8(src + r * half + b * 16) : vdupq_n_u8(0);
      const uint32x4_t lo = vreinterpretq_u32_u8(vandq_u8(blk, low4)), hi = vreinterpretq_u32_u8(vshrq_n_u8(blk, 4));
      uint32_t* o = reinterpret_cast<uint32_t*>(out + r * 4);  // 4-byte aligned: the panel buffer is 8-byte aligned
      vst1q_lane_u32(o + 0 * 32, lo, 0), vst1q_lane_u32(o + 1 * 32, lo, 1);
      vst1q_lane_u32(o + 2 * 32, lo, 2), vst1q_lane_u32(o + 3 * 32, lo, 3);
      vst1q_lane_u32(o + 4 * 32, hi, 0), vst1q_lane_u32(o + 5 * 32, hi, 1);
      vst1q_lane_u32(o + 6 * 32, hi, 2), vst1q_lane_u32(o + 7 * 32, hi, 3);
    }
  }
  const __fp16* sc = reinterpret_cast<const __fp16*>(static_cast<const uint16_t*>(a.scales) + n0 * G);
  const __fp16* mn = reinterpret_cast<const __fp16*>(static_cast<const uint16_t*>(a.mins) + n0 * G);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < kQ4Panel; ++r) {  // FCVT half -> single: exact, as f16_to_f32
      scales[g * kQ4Panel + r] = r < rows ? float(sc[r * G + g]) : 0.f;
      mins[g * kQ4Panel + r] = r < rows ? float(mn[r * G + g]) : 0.f;
    }
}

// MR x rows against outputs n0 + 16h .. n0 + 16h + 15 (four vectors of 4): per block 4 x MR integer sums of 8
// SDOTs, each taking its 4 x_q from one lane of a 16-byte load (the panel's weights 0..15 are valid s8).
template <int MR>
void panel_tile(const uint8_t* w, const float* scales, const float* mins, const QuantizedRows& x, int64_t m0, int h,
                int64_t n_valid, float* y, int64_t y_stride) {
  const int64_t B = x.B, G = x.G, per_group = x.group / 32, kp = x.kp;
  float32x4_t acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < B; ++b) {
    const float* sg = scales + (b / per_group) * kQ4Panel + 16 * h;
    const uint8_t* wb = w + b * 8 * 128 + 64 * h;
    int32x4_t d[MR][4];
    int8x16_t xlo[MR], xhi[MR];
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < 4; ++v) d[i][v] = vdupq_n_s32(0);
      xlo[i] = vld1q_s8(&x.xq[(m0 + i) * kp + b * 32]), xhi[i] = vld1q_s8(&x.xq[(m0 + i) * kp + b * 32 + 16]);
    }
#define LLAVA_FAST_PANEL_STEP(S, XV, LANE)                                                            \
    {                                                                                                   \
      int8x16_t wv[4];                                                                                  \
      for (int v = 0; v < 4; ++v) wv[v] = vreinterpretq_s8_u8(vld1q_u8(wb + (S) * 128 + 16 * v));      \
      for (int i = 0; i < MR; ++i)                                                                      \
        for (int v = 0; v < 4; ++v) d[i][v] = vdotq_laneq_s32(d[i][v], wv[v], XV[i], LANE);             \
    }
    LLAVA_FAST_PANEL_STEP(0, xlo, 0) LLAVA_FAST_PANEL_STEP(1, xlo, 1)
    LLAVA_FAST_PANEL_STEP(2, xlo, 2) LLAVA_FAST_PANEL_STEP(3, xlo, 3)
    LLAVA_FAST_PANEL_STEP(4, xhi, 0) LLAVA_FAST_PANEL_STEP(5, xhi, 1)
    LLAVA_FAST_PANEL_STEP(6, xhi, 2) LLAVA_FAST_PANEL_STEP(7, xhi, 3)
#undef LLAVA_FAST_PANEL_STEP
    for (int i = 0; i < MR; ++i) {
      const float xs = x.xs[(m0 + i) * B + b];
      for (int v = 0; v < 4; ++v)  // fma(d, scale * x_s, acc): the scalar panel's two roundings
        acc[i][v] = vfmaq_f32(acc[i][v], vcvtq_f32_s32(d[i][v]), vmulq_n_f32(vld1q_f32(sg + 4 * v), xs));
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int i = 0; i < MR; ++i) {
      const float xm = x.xmin[(m0 + i) * G + g];
      for (int v = 0; v < 4; ++v) acc[i][v] = vfmaq_n_f32(acc[i][v], vld1q_f32(mins + g * kQ4Panel + 16 * h + 4 * v), xm);
    }
  for (int i = 0; i < MR; ++i) {
    float* yr = y + (m0 + i) * y_stride + 16 * h;
    if (n_valid >= 16 * h + 16) {
      for (int v = 0; v < 4; ++v) vst1q_f32(yr + 4 * v, acc[i][v]);
    } else {
      float t[16];
      for (int v = 0; v < 4; ++v) vst1q_f32(t + 4 * v, acc[i][v]);
      std::memcpy(yr, t, (n_valid - 16 * h) * 4);
    }
  }
}

void gemm_q4_panel(const GemvArgs& a, const QuantizedRows& x, int64_t n0, float* y, int64_t y_stride, uint8_t* panel) {
  const int64_t G = a.k / a.group, M = a.m, n_valid = std::min<int64_t>(kQ4Panel, a.n - n0);
  uint8_t* w = panel;
  float* scales = reinterpret_cast<float*>(panel + (a.k / 32) * 8 * 128);
  float* mins = scales + G * kQ4Panel;
  pack_panel(a, n0, w, scales, mins);
  float* yp = y + n0;
  for (int h = 0; h < 2 && 16 * h < n_valid; ++h) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) panel_tile<2>(w, scales, mins, x, m, h, n_valid, yp, y_stride);
    if (m < M) panel_tile<1>(w, scales, mins, x, m, h, n_valid, yp, y_stride);
  }
}

// ---- dequantization (dequantize.cpp; bit for bit its scalar loop) --------------------------------------------

// 4 float32 -> bfloat16 bits, round to nearest even, NaN kept quiet: f32_to_bf16's integer arithmetic.
inline uint16x4_t to_bf16(float32x4_t v) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(vdupq_n_u32(0x7fff), vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)))), 16);
  const uint32x4_t nan = vmvnq_u32(vceqq_f32(v, v));
  return vmovn_u32(vbslq_u32(nan, vorrq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x40)), r));
}

inline void put4(void* out, int dtype, int64_t i, float32x4_t v) {
  if (dtype == kActBF16) {
    vst1_u16(static_cast<uint16_t*>(out) + i, to_bf16(v));
  } else {
    vst1q_f32(static_cast<float*>(out) + i, v);
  }
}

void dequantize_rows(const GemvArgs& a, void* out, int dtype, int64_t n0, int64_t n1) {
  const int64_t K = a.k;
  if (a.format == kWeightQ8) {
    if (K % 8) return dequantize_rows_scalar(a, out, dtype, n0, n1);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
      const float s = static_cast<const float*>(a.scales)[n];
      for (int64_t k = 0; k < K; k += 8) {  // (u - 128) * s, exact integer part, one rounding: the scalar loop's
        const int16x8_t q = vreinterpretq_s16_u16(vsubq_u16(vmovl_u8(vld1_u8(w + k)), vdupq_n_u16(128)));
        put4(out, dtype, n * K + k, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q))), s));
        put4(out, dtype, n * K + k + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(q))), s));
      }
    }
    return;
  }
  const int64_t G = K / a.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
    const __fp16* sc = reinterpret_cast<const __fp16*>(static_cast<const uint16_t*>(a.scales) + n * G);
    const __fp16* mn = reinterpret_cast<const __fp16*>(static_cast<const uint16_t*>(a.mins) + n * G);
    for (int64_t b = 0; b < K; b += 32) {
      const float s = float(sc[b / a.group]), m = float(mn[b / a.group]);
      const uint8x16_t blk = vld1q_u8(w + b / 2);
      const uint8x16_t nib[2] = {vandq_u8(blk, vdupq_n_u8(15)), vshrq_n_u8(blk, 4)};  // weights j, j + 16
      for (int hi = 0; hi < 2; ++hi) {
        const uint16x8_t q01 = vmovl_u8(vget_low_u8(nib[hi])), q23 = vmovl_u8(vget_high_u8(nib[hi]));
        const uint32x4_t q[4] = {vmovl_u16(vget_low_u16(q01)), vmovl_u16(vget_high_u16(q01)),
                                 vmovl_u16(vget_low_u16(q23)), vmovl_u16(vget_high_u16(q23))};
        for (int v = 0; v < 4; ++v)  // q * s + m as a multiply and an add (not fused): the scalar loop's roundings
          put4(out, dtype, n * K + b + 16 * hi + 4 * v, vaddq_f32(vmulq_n_f32(vcvtq_f32_u32(q[v]), s), vdupq_n_f32(m)));
      }
    }
  }
}

}  // namespace

const KernelTable* neon_kernels() {
  static const KernelTable table{
      "neon", "neon_dotprod",
      gemv_f32, gemv_bf16, gemv_q8, gemv_q4, nullptr, nullptr,
      quantize_row_q8,
      gemm_q4_panel, dequantize_rows,
      // The decode glue and attention: the scalar loops for now.
      add_rms_norm_row_scalar, rope_scalar, store_row_scalar, swiglu_row_scalar,
      attn_dot_scalar, attn_axpy_scalar, attend_kernel_none,
      nullptr, nullptr, gemm_q8_panel_scalar};  // the int8 GEMM: the scalar panel (the plan prefills int8 through torch here)
  return &table;
}

}  // namespace llava_fast
