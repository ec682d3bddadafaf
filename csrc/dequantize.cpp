// Dequantization of the int8 and int4 weight formats (gemv.h) into a dense matrix, in one threaded pass.
//
// Why: a prefill of T tokens on a quantized model is a GEMM, and oneDNN's blocked GEMM beats the GEMV kernels
// (1 multiply-add per weight per row) above ~8 rows. The torch expression of the same dequantization (unpack
// the nibbles, cast, scale, add the min: ~6 passes over an (N, K) float tensor) cost about as much as the
// GEMM itself on SmolLM2-135M at a 130-token prompt; this is one pass that reads the packed bytes once and
// writes each weight once. Output in bfloat16 lets the prefill GEMM run on AVX512_BF16 (2-2.5x float32's
// rate on the 2-core EPYC this was written on: 85-110 vs 160-250 GFLOP/s at 130 x 576 x 960..3072).
// Each weight is computed in float32 as gemv.py's `GemvLinear.dequantized` does, then rounded once.
//
// Here: the threading and the scalar reference; the tables' rows are in csrc/isa/ (bit for bit the same).
#include "dequantize.h"

#include "convert.h"
#include "isa/kernels.h"
#include "isa/reference.h"

namespace llava_fast {
namespace {

inline void put(void* out, int dtype, int64_t i, float v) {
  if (dtype == kActBF16) {
    static_cast<uint16_t*>(out)[i] = f32_to_bf16(v);
  } else {
    static_cast<float*>(out)[i] = v;
  }
}

}  // namespace

void dequantize_rows_scalar(const GemvArgs& a, void* out, int dtype, int64_t n0, int64_t n1) {
  const int64_t K = a.k;
  for (int64_t n = n0; n < n1; ++n) {
    switch (a.format) {
      case kWeightQ8: {  // offset-binary: W = (u - 128) * scale[n]
        const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * K;
        const float s = static_cast<const float*>(a.scales)[n];
        for (int64_t k = 0; k < K; ++k) put(out, dtype, n * K + k, float(int(w[k]) - 128) * s);
        break;
      }
      case kWeightQ4: {  // W = q * scale[n, g] + min[n, g]; byte j of a 32-block: weights j (low), j + 16 (high)
        const uint8_t* w = static_cast<const uint8_t*>(a.w) + n * (K / 2);
        const int64_t G = K / a.group;
        const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + n * G;
        const uint16_t* mn = static_cast<const uint16_t*>(a.mins) + n * G;
        for (int64_t b = 0; b < K; b += 32) {
          const float s = f16_to_f32(sc[b / a.group]), m = f16_to_f32(mn[b / a.group]);
          const uint8_t* blk = w + b / 2;
          for (int j = 0; j < 16; ++j) {
            put(out, dtype, n * K + b + j, float(blk[j] & 15) * s + m);
            put(out, dtype, n * K + b + 16 + j, float(blk[j] >> 4) * s + m);
          }
        }
        break;
      }
    }
  }
}

void dequantize(const GemvArgs& a, void* out, int out_dtype, int threads) {
  const auto rows = kernels().dequantize_rows;
  const int chunks = int(a.n < int64_t(threads) * 8 ? a.n : int64_t(threads) * 8);
  parallel_for(threads, chunks < 1 ? 1 : chunks, [&](int c) {
    rows(a, out, out_dtype, a.n * c / chunks, a.n * (c + 1) / chunks);
  });
}

}  // namespace llava_fast
