// Native LLaVA image preprocessing: pad-to-square, Pillow-exact bicubic resize, center crop, rescale and
// normalise, for a batch of images across threads.
//
// The resize reproduces Pillow's Image.resize(size, BICUBIC) for 8-bit RGB bit for bit:
//   - separable: one pass along each axis with a uint8 intermediate. Pillow <= 12 always runs the
//     horizontal pass first; Pillow 13 runs the vertical one first when the height shrinks by more than
//     twice as many pixels as the width. The order changes the rounding (up to ~15 levels on noise), so
//     the caller says which Pillow to follow (llava_fast/image/ probes the installed one).
//   - output pixel x samples input around center = (x + 0.5) * scale, scale = in / out; on a downscale the
//     filter is stretched by scale (support 2 * scale), which is Pillow's antialiasing;
//   - Keys cubic with a = -0.5, weights normalised to sum 1 in double, then rounded (half away from zero)
//     to fixed point with 22 fractional bits; accumulation in int32 starting at 0.5 (2^21), result
//     >> 22 and clamped to 0..255. 22 bits: 255 * (sum of |weights| <= ~1.3) * 2^22 < 2^31.
//   - the coefficient arithmetic is kept in the same order as Pillow's and built with -ffp-contract=off
//     (an FMA would change the last bit of a weight and, rarely, a rounded pixel).
//
// What makes it faster than CLIPImageProcessor (Pillow resize + numpy), besides threads:
//   - only the pixels of the center crop are computed: each output pixel of the two passes depends on its
//     own taps only, so computing the crop window's columns (and the rows its taps read) gives the same
//     values. 640x480 -> 448x336 -> crop 336x336 skips a quarter of the work; a 1x1000 strip (resized to
//     336x336000) skips 99.9%.
//   - rescale + normalise + dtype cast is one table lookup: a uint8 level has 256 possible outputs per
//     channel, which the caller computes with the reference's own arithmetic (float64 rescale, float32
//     (x - mean) / std, torch's cast), so native values equal the Python path's exactly. No float64 image.
//   - AVX2 kernels (runtime dispatch; see "Kernels" below).
//
// Each image's output is a Placement (preprocess.h): the resized image at an offset in a window written as
// tiles, which covers CLIP's center crop (one tile, the crop window) and AnyRes's padded canvas (336-px tiles)
// with one code path. Work is split into (placement, block of <= 128 window columns within one tile) items pulled by std::threads from an atomic
// counter, so one large image also uses every core. Per item: horizontal pass over the rows the block's
// vertical taps read into a (rows, block) RGBX buffer (480 x 112 x 4 = 210 KiB for a 640x480 photo,
// L2-sized), then the vertical pass and the table lookup straight into the NCHW output.
#include "preprocess.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(LLAVA_FAST_NO_AVX2)
#define LLAVA_FAST_AVX2 1
#include <immintrin.h>
#endif

namespace llava_fast {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);
constexpr double kOne = double(1 << kPrecisionBits);
constexpr int kTargetBlockColumns = 128;
constexpr int kLowBits = 11;  // AVX2 horizontal kernel: weight = high * 2^11 + low, both halves int16

double keys_cubic(double x) {  // Pillow's BICUBIC kernel, a = -0.5, support 2
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;  // arithmetic shift: floor, as Pillow's lookup table indexes
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// The taps of outputs [begin, end) of a 1-D resize in_size -> out_size.
struct FilterBank {
  int begin = 0;
  int taps = 0;                  // stride between outputs in `weights` (Pillow's ksize)
  std::vector<int> first;        // first input index of each output
  std::vector<int> count;        // number of inputs each output reads
  std::vector<int32_t> weights;  // (outputs, taps), fixed point with kPrecisionBits fractional bits
  // For the AVX2 horizontal kernel: outputs in pairs (begin + 2q, begin + 2q + 1) and taps in pairs
  // (2p, 2p + 1). For each (q, p), 16 int32 words laid out as the kernel's two registers want them:
  // the low halves {x, x, x, x, x+1, x+1, x+1, x+1}, then the high halves likewise; each word holds the
  // int16 halves of taps 2p and 2p + 1. Zero past an output's count. Spelled out in memory so the
  // kernel loads them instead of permuting (permutes competed with the pixel shuffles for one port).
  int pair_stride = 0;  // tap pairs per output pair
  std::vector<int32_t> paired;

  const int32_t* weights_of(int output) const { return &weights[size_t(output - begin) * taps]; }
  int first_of(int output) const { return first[output - begin]; }
  int count_of(int output) const { return count[output - begin]; }
  const int32_t* paired_of(int output) const { return &paired[size_t(output - begin) / 2 * pair_stride * 16]; }

  void build_paired() {
    const int outputs = int(first.size());
    pair_stride = (taps + 1) / 2;
    paired.assign(size_t((outputs + 1) / 2) * pair_stride * 16, 0);
    auto half_word = [](int32_t w0, int32_t w1, bool high) {
      const int32_t a = high ? w0 >> kLowBits : w0 & ((1 << kLowBits) - 1);
      const int32_t b = high ? w1 >> kLowBits : w1 & ((1 << kLowBits) - 1);
      return int32_t(uint32_t(uint16_t(a)) | (uint32_t(uint16_t(b)) << 16));
    };
    for (int i = 0; i < outputs; ++i) {
      const int32_t* w = &weights[size_t(i) * taps];
      int32_t* out = &paired[size_t(i / 2) * pair_stride * 16];
      for (int p = 0; p < pair_stride; ++p) {
        const int32_t w0 = 2 * p < count[i] ? w[2 * p] : 0;
        const int32_t w1 = 2 * p + 1 < count[i] ? w[2 * p + 1] : 0;
        for (int lane = 0; lane < 4; ++lane) {
          out[p * 16 + (i & 1) * 4 + lane] = half_word(w0, w1, false);
          out[p * 16 + 8 + (i & 1) * 4 + lane] = half_word(w0, w1, true);
        }
      }
    }
  }
};

FilterBank bicubic_bank(int in_size, int out_size, int begin, int end) {
  FilterBank bank;
  bank.begin = begin;
  const int outputs = end - begin;
  bank.first.resize(outputs);
  bank.count.resize(outputs);
  if (in_size == out_size) {  // Pillow skips this pass; a one-tap identity gives the same bytes
    bank.taps = 1;
    bank.weights.assign(outputs, 1 << kPrecisionBits);
    for (int i = 0; i < outputs; ++i) {
      bank.first[i] = begin + i;
      bank.count[i] = 1;
    }
    return bank;
  }
  const double scale = double(in_size) / double(out_size);
  const double filter_scale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filter_scale;
  const double inverse_filter_scale = 1.0 / filter_scale;
  bank.taps = int(std::ceil(support)) * 2 + 1;
  bank.weights.assign(size_t(outputs) * bank.taps, 0);
  std::vector<double> w(bank.taps);
  for (int i = 0; i < outputs; ++i) {
    const double center = (begin + i + 0.5) * scale;
    int lo = int(center - support + 0.5);
    if (lo < 0) lo = 0;
    int hi = int(center + support + 0.5);
    if (hi > in_size) hi = in_size;
    const int n = hi - lo;
    double total = 0.0;
    for (int t = 0; t < n; ++t) {
      w[t] = keys_cubic((t + lo - center + 0.5) * inverse_filter_scale);
      total += w[t];
    }
    int32_t* fixed = &bank.weights[size_t(i) * bank.taps];
    for (int t = 0; t < n; ++t) {
      const double normalised = total != 0.0 ? w[t] / total : w[t];
      fixed[t] = normalised < 0 ? int32_t(-0.5 + normalised * kOne) : int32_t(0.5 + normalised * kOne);
    }
    bank.first[i] = lo;
    bank.count[i] = n;
  }
  return bank;
}

// ------------------------------------------------------------------------------------------------------
// Kernels: where the time goes. Each has a portable scalar version and an AVX2 version (intrinsics
// compiled for that target only and picked at run time when the CPU has it, so one build runs on any
// x86-64). Both compute Pillow's int32 sums exactly, so they give the same bytes.
// ------------------------------------------------------------------------------------------------------

// Horizontal pass of one row for outputs [x_begin, x_end): `row` points at source column row_x0 of
// pixels of P bytes (RGB, or RGBX as Pillow stores RGB), with row_slack(bank) readable bytes after the
// last pixel a tap reads (their values do not matter). Writes RGBX bytes (X unspecified) to `dst`.
template <int P>
void horizontal_row_scalar(const uint8_t* row, int row_x0, const FilterBank& bank, int x_begin, int x_end,
                           uint8_t* dst) {
  for (int x = x_begin; x < x_end; ++x, dst += 4) {
    const int32_t* k = bank.weights_of(x);
    const uint8_t* px = row + size_t(bank.first_of(x) - row_x0) * P;
    int32_t r = kHalf, g = kHalf, b = kHalf;
    for (int t = 0, n = bank.count_of(x); t < n; ++t, px += P) {
      r += px[0] * k[t];
      g += px[1] * k[t];
      b += px[2] * k[t];
    }
    dst[0] = clip8(r);
    dst[1] = clip8(g);
    dst[2] = clip8(b);
    dst[3] = 0;
  }
}

// out[j] = clip8(1/2 + sum_t rows[t][j] * k[t]) for j in [begin, n): one row of a vertical pass. Bytes
// are channel-agnostic here, so this serves RGB and RGBX rows alike.
void vertical_span_scalar(const uint8_t* const* rows, const int32_t* k, int taps, size_t begin, size_t n,
                          uint8_t* out) {
  constexpr size_t kChunk = 64;  // accumulators for 64 bytes stay in registers across the taps
  for (size_t j0 = begin; j0 < n; j0 += kChunk) {
    const size_t m = std::min(kChunk, n - j0);
    int32_t acc[kChunk];
    for (size_t j = 0; j < m; ++j) acc[j] = kHalf;
    for (int t = 0; t < taps; ++t) {
      const uint8_t* src = rows[t] + j0;
      const int32_t w = k[t];
      for (size_t j = 0; j < m; ++j) acc[j] += src[j] * w;
    }
    for (size_t j = 0; j < m; ++j) out[j0 + j] = clip8(acc[j]);
  }
}

void vertical_row_scalar(const uint8_t* const* rows, const int32_t* k, int taps, size_t n, uint8_t* out) {
  vertical_span_scalar(rows, k, taps, 0, n, out);
}

#ifdef LLAVA_FAST_AVX2
// Two output pixels per 256-bit register, two taps per instruction: for each tap pair, the bytes at each
// pixel's source position are shuffled into int16 pairs (R0 R1 | G0 G1 | B0 B1 | 0 0) and multiplied with
// pmaddwd by the (low, high) int16 halves of the two weights; sum = low + (high << 11). pmaddwd needs 16-bit
// weights and Pillow's have 23 bits, hence the split; the int32 sums are Pillow's exactly (they never
// overflow; the shift may wrap transiently, which two's-complement addition undoes). 2.2x faster than one
// pixel per 4-lane pmulld (0.55 vs 1.2 ns per output pixel and tap on the 2-core Xeon).
template <int P>
__attribute__((target("avx2"))) void horizontal_row_avx2(const uint8_t* row, int row_x0, const FilterBank& bank,
                                                         int x_begin, int x_end, uint8_t* dst) {
  // byte i of the pixel at tap 2p + j sits at j * P + i
  const __m256i to_pairs = _mm256_setr_epi8(0, -1, P, -1, 1, -1, P + 1, -1, 2, -1, P + 2, -1, -1, -1, -1, -1,  //
                                            0, -1, P, -1, 1, -1, P + 1, -1, 2, -1, P + 2, -1, -1, -1, -1, -1);
  const __m256i half = _mm256_set1_epi32(kHalf);
  int x = x_begin;
  for (; x + 1 < x_end; x += 2, dst += 8) {
    const uint8_t* px0 = row + size_t(bank.first_of(x) - row_x0) * P;
    const uint8_t* px1 = row + size_t(bank.first_of(x + 1) - row_x0) * P;
    const __m256i* w = reinterpret_cast<const __m256i*>(bank.paired_of(x));
    const int pairs = (std::max(bank.count_of(x), bank.count_of(x + 1)) + 1) / 2;
    __m256i low = _mm256_setzero_si256(), high = _mm256_setzero_si256();
    for (int p = 0; p < pairs; ++p, px0 += 2 * P, px1 += 2 * P, w += 2) {
      const __m256i bytes = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(px0))),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(px1)), 1);
      const __m256i pixels = _mm256_shuffle_epi8(bytes, to_pairs);
      low = _mm256_add_epi32(low, _mm256_madd_epi16(pixels, _mm256_loadu_si256(w)));
      high = _mm256_add_epi32(high, _mm256_madd_epi16(pixels, _mm256_loadu_si256(w + 1)));
    }
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(half, low), _mm256_slli_epi32(high, kLowBits));
    const __m256i level = _mm256_srai_epi32(sum, kPrecisionBits);
    const __m128i words16 = _mm_packs_epi32(_mm256_castsi256_si128(level), _mm256_extracti128_si256(level, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(words16, words16));
  }
  if (x < x_end) horizontal_row_scalar<P>(row, row_x0, bank, x, x_end, dst);
}

// 32 bytes per step in four 8-lane accumulators: widen, pmulld by the broadcast weight, add.
__attribute__((target("avx2"))) void vertical_row_avx2(const uint8_t* const* rows, const int32_t* k, int taps,
                                                       size_t n, uint8_t* out) {
  const __m256i half = _mm256_set1_epi32(kHalf);
  size_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m256i a0 = half, a1 = half, a2 = half, a3 = half;
    for (int t = 0; t < taps; ++t) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[t] + j));
      const __m128i low = _mm256_castsi256_si128(bytes), high = _mm256_extracti128_si256(bytes, 1);
      const __m256i w = _mm256_set1_epi32(k[t]);
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(low), w));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)), w));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(high), w));
      a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)), w));
    }
    // Saturating packs do clip8's clamp; they work within 128-bit halves, the permutes restore the order.
    const __m256i words01 = _mm256_permute4x64_epi64(
        _mm256_packs_epi32(_mm256_srai_epi32(a0, kPrecisionBits), _mm256_srai_epi32(a1, kPrecisionBits)), 0xD8);
    const __m256i words23 = _mm256_permute4x64_epi64(
        _mm256_packs_epi32(_mm256_srai_epi32(a2, kPrecisionBits), _mm256_srai_epi32(a3, kPrecisionBits)), 0xD8);
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(words01, words23), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), bytes);
  }
  vertical_span_scalar(rows, k, taps, j, n, out);
}
#endif

using HorizontalKernel = void (*)(const uint8_t*, int, const FilterBank&, int, int, uint8_t*);
using VerticalKernel = void (*)(const uint8_t* const*, const int32_t*, int, size_t, uint8_t*);
struct Kernels {
  HorizontalKernel horizontal_rgb;   // 3-byte pixels (numpy arrays)
  HorizontalKernel horizontal_rgbx;  // 4-byte pixels (Pillow's own RGB memory)
  VerticalKernel vertical;
  bool paired_weights;  // the horizontal kernels read FilterBank::paired
  const char* name;
};

const Kernels kScalarKernels{horizontal_row_scalar<3>, horizontal_row_scalar<4>, vertical_row_scalar, false, "scalar"};
#ifdef LLAVA_FAST_AVX2
const Kernels kAvx2Kernels{horizontal_row_avx2<3>, horizontal_row_avx2<4>, vertical_row_avx2, true, "avx2"};
#endif

const Kernels* best_kernels() {
#ifdef LLAVA_FAST_AVX2
  if (__builtin_cpu_supports("avx2")) return &kAvx2Kernels;
#endif
  return &kScalarKernels;
}

std::atomic<const Kernels*> active_kernels{nullptr};

const Kernels& kernels() {
  const Kernels* chosen = active_kernels.load(std::memory_order_relaxed);
  if (chosen == nullptr) {
    chosen = best_kernels();
    active_kernels.store(chosen, std::memory_order_relaxed);
  }
  return *chosen;
}

// Bytes a horizontal kernel may read past the last pixel a tap of the bank uses: the AVX2 kernel loads
// 16 bytes per tap pair and runs the longer tap count of two neighbouring outputs for both.
size_t row_slack(const FilterBank& bank) { return size_t(bank.taps) * 4 + 32; }

// ------------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------------

// Per-thread buffers reused across work items: a batch allocates them once per thread, not once per item
// (fresh pages from malloc cost a kernel zeroing each time, 7% of the run time before).
struct Scratch {
  std::vector<uint8_t> between, segment, levels, fill_row, padded_row;
  std::vector<const uint8_t*> tap_rows;
};

template <typename V>
void grow(V& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
}

// The source as the resize sees it: the image itself, or the image centred on a square of `fill`. Pixels
// keep the image's layout (3 or 4 bytes).
class Source {
 public:
  Source(const ImageView& image, const PreprocessParams& params, size_t slack, Scratch& scratch)
      : image_(image), pixel_(image.pixel_bytes), slack_(slack), scratch_(scratch) {
    height_ = image.height;
    width_ = image.width;
    if (params.pad_to_square && image.height != image.width) {
      height_ = width_ = std::max(image.height, image.width);
      top_ = (height_ - image.height) / 2;
      left_ = (width_ - image.width) / 2;
      const size_t bytes = size_t(width_) * pixel_;
      grow(scratch.fill_row, bytes + slack);
      for (int x = 0; x < width_; ++x) std::memcpy(&scratch.fill_row[size_t(x) * pixel_], params.fill, 3);
      if (image.width != width_) {  // a portrait image: rows get fill on the left and right
        grow(scratch.padded_row, bytes + slack);
        std::memcpy(scratch.padded_row.data(), scratch.fill_row.data(), bytes);
      }
    }
  }
  int height() const { return height_; }
  int width() const { return width_; }

  // Row y of the image itself (no padding), for the vertical-first pass: the pointers stay valid together.
  const uint8_t* image_row(int y) const { return image_.data + size_t(y) * image_.width * pixel_; }

  // Pixels from column col_begin of row y of the (padded) source, with the kernel's slack readable after
  // col_end. Valid until the next call.
  const uint8_t* row(int y, int col_begin, int col_end) {
    const int image_y = y - top_;
    if (image_y < 0 || image_y >= image_.height) return scratch_.fill_row.data() + size_t(col_begin) * pixel_;
    const uint8_t* source = image_row(image_y);
    if (width_ != image_.width) {
      std::memcpy(&scratch_.padded_row[size_t(left_) * pixel_], source, size_t(image_.width) * pixel_);
      return scratch_.padded_row.data() + size_t(col_begin) * pixel_;
    }
    const uint8_t* image_end = image_.data + size_t(image_.height) * image_.width * pixel_;
    if (size_t(image_end - (source + size_t(col_end) * pixel_)) >= slack_) return source + size_t(col_begin) * pixel_;
    const size_t bytes = size_t(col_end - col_begin) * pixel_;  // the last rows: copy, so reads stay in bounds
    grow(scratch_.segment, bytes + slack_);
    std::memcpy(scratch_.segment.data(), source + size_t(col_begin) * pixel_, bytes);
    return scratch_.segment.data();
  }

 private:
  const ImageView& image_;
  int pixel_;
  size_t slack_;
  Scratch& scratch_;
  int height_, width_, top_ = 0, left_ = 0;
};

struct WorkItem {
  int placement;
  int column_begin;  // in window coordinates, within one tile column
  int column_end;
};

// Element (c, wy, wx) of a placement's window in its tiled output layout.
template <typename T>
T* window_pixel(T* out, const Placement& p, int c, int wy, int wx) {
  const size_t tile_plane = size_t(p.tile_height) * p.tile_width;
  const size_t tile = size_t(wy / p.tile_height) * (p.window_width / p.tile_width) + wx / p.tile_width;
  return out + p.out_offset + (tile * 3 + c) * tile_plane + size_t(wy % p.tile_height) * p.tile_width +
         wx % p.tile_width;
}

template <typename T>
void fill_window_columns(T* out, const T* lut, const Placement& p, int column_begin, int column_end) {
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < p.window_height; ++y) {
      T* row = window_pixel(out, p, c, y, column_begin);
      std::fill(row, row + (column_end - column_begin), lut[c * 256]);
    }
}

// Pillow 13's rule for running the vertical pass first (see the top of this file). A padded (square)
// source never qualifies.
bool vertical_pass_first(int pass_order, int in_h, int in_w, int out_h, int out_w) {
  return pass_order == kPassOrderPillow13 && in_h > out_h && in_h - out_h > 2 * (in_w - out_w);
}

template <typename T>
void run_item(const ImageView& image, const Placement& placement, const WorkItem& item, const PreprocessParams& p,
              T* out, const T* lut, Scratch& scratch) {
  const Kernels& kernel = kernels();
  const HorizontalKernel horizontal_kernel = image.pixel_bytes == 4 ? kernel.horizontal_rgbx : kernel.horizontal_rgb;
  int source_h = image.height, source_w = image.width;
  if (p.pad_to_square) source_h = source_w = std::max(image.height, image.width);
  const int resized_h = placement.resized_height, resized_w = placement.resized_width;

  // The window in resized coordinates starts at (-top, -left); the part of it the resized image does not
  // cover is level 0 (transformers' pad-then-crop, AnyRes's black padding).
  const int top = -placement.top, left = -placement.left;
  const int y_begin = std::max(top, 0), y_end = std::min(top + placement.window_height, resized_h);
  const int x_begin = std::max(left + item.column_begin, 0);
  const int x_end = std::min(left + item.column_end, resized_w);
  const bool window_covered = y_begin == top && y_end == top + placement.window_height &&
                              x_begin == left + item.column_begin && x_end == left + item.column_end;
  if (!window_covered) fill_window_columns(out, lut, placement, item.column_begin, item.column_end);
  if (y_begin >= y_end || x_begin >= x_end) return;

  const FilterBank vertical = bicubic_bank(source_h, resized_h, y_begin, y_end);
  FilterBank horizontal = bicubic_bank(source_w, resized_w, x_begin, x_end);
  if (kernel.paired_weights) horizontal.build_paired();
  Source source(image, p, row_slack(horizontal), scratch);
  const int columns = x_end - x_begin;
  const int col_begin = horizontal.first_of(x_begin);  // source columns the horizontal taps read
  const int col_end = horizontal.first_of(x_end - 1) + horizontal.count_of(x_end - 1);
  grow(scratch.levels, size_t(columns) * 4);  // one finished window row, RGBX
  grow(scratch.tap_rows, size_t(vertical.taps));
  uint8_t* levels = scratch.levels.data();
  const uint8_t** tap_rows = scratch.tap_rows.data();
  const int out_x0 = x_begin - left;  // first window column this item writes
  auto emit_row = [&](int y) {        // table lookup of `levels` into the three planes
    for (int c = 0; c < 3; ++c) {
      T* dst = window_pixel(out, placement, c, y - top, out_x0);
      const T* table = lut + c * 256;
      for (int x = 0; x < columns; ++x) dst[x] = table[levels[size_t(x) * 4 + c]];
    }
  };

  if (!vertical_pass_first(p.pass_order, source_h, source_w, resized_h, resized_w)) {
    // Horizontal pass over the rows the vertical taps read -> (rows, columns) RGBX, then vertical.
    const int row_begin = vertical.first_of(y_begin);
    const int row_end = vertical.first_of(y_end - 1) + vertical.count_of(y_end - 1);
    const size_t stride = size_t(columns) * 4;
    grow(scratch.between, size_t(row_end - row_begin) * stride);
    uint8_t* between = scratch.between.data();
    for (int y = row_begin; y < row_end; ++y)
      horizontal_kernel(source.row(y, col_begin, col_end), col_begin, horizontal, x_begin, x_end,
                        between + size_t(y - row_begin) * stride);
    for (int y = y_begin; y < y_end; ++y) {
      const int n = vertical.count_of(y);
      for (int t = 0; t < n; ++t) tap_rows[t] = between + size_t(vertical.first_of(y) + t - row_begin) * stride;
      kernel.vertical(tap_rows, vertical.weights_of(y), n, stride, levels);
      emit_row(y);
    }
  } else {
    // Vertical pass over the needed source columns, one window row at a time, then its horizontal pass.
    const size_t span = size_t(col_end - col_begin) * image.pixel_bytes;  // keeps the source's pixel layout
    grow(scratch.between, span + row_slack(horizontal));
    uint8_t* between = scratch.between.data();
    for (int y = y_begin; y < y_end; ++y) {
      const int n = vertical.count_of(y);
      for (int t = 0; t < n; ++t)
        tap_rows[t] = source.image_row(vertical.first_of(y) + t) + size_t(col_begin) * image.pixel_bytes;
      kernel.vertical(tap_rows, vertical.weights_of(y), n, span, between);
      horizontal_kernel(between, col_begin, horizontal, x_begin, x_end, levels);
      emit_row(y);
    }
  }
}

template <typename T>
void run_placements(const std::vector<ImageView>& images, const std::vector<Placement>& placements, T* out,
                    const PreprocessParams& p, int threads) {
  const T* lut = static_cast<const T*>(p.lut);
  std::vector<WorkItem> items;  // blocks of <= kTargetBlockColumns columns, none across a tile's edge
  for (int i = 0; i < int(placements.size()); ++i) {
    const int tile_w = placements[i].tile_width;
    const int blocks = (tile_w + kTargetBlockColumns - 1) / kTargetBlockColumns;
    const int block_columns = (tile_w + blocks - 1) / blocks;
    for (int tile_x = 0; tile_x < placements[i].window_width; tile_x += tile_w)
      for (int c = 0; c < tile_w; c += block_columns)
        items.push_back({i, tile_x + c, tile_x + std::min(c + block_columns, tile_w)});
  }

  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_lock;
  auto worker = [&] {
    try {
      Scratch scratch;
      for (size_t i = next++; i < items.size(); i = next++) {
        const Placement& placement = placements[items[i].placement];
        run_item(images[placement.image], placement, items[i], p, out, lut, scratch);
      }
    } catch (...) {  // bad_alloc on a huge image: hand it to the caller instead of std::terminate
      std::lock_guard<std::mutex> guard(failure_lock);
      if (!failure) failure = std::current_exception();
      next = items.size();
    }
  };
  threads = std::max(1, std::min<int>(threads, int(items.size())));
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

void resized_size(int height, int width, int shortest_edge, int* out_height, int* out_width) {
  // Python computes int(edge * long / short): an exact integer product, one correctly rounded division,
  // truncation. Products stay below 2^53, so double gives the same bits.
  if (width <= height) {
    *out_width = shortest_edge;
    *out_height = int(double(int64_t(shortest_edge) * height) / double(width));
  } else {
    *out_height = shortest_edge;
    *out_width = int(double(int64_t(shortest_edge) * width) / double(height));
  }
}

const char* kernel_isa() { return kernels().name; }

bool use_kernels(const std::string& name) {
  if (name == "scalar") {
    active_kernels.store(&kScalarKernels);
    return true;
  }
  if (name == "best") {
    active_kernels.store(best_kernels());
    return true;
  }
  return false;
}

void preprocess_placements(const std::vector<ImageView>& images, const std::vector<Placement>& placements, void* out,
                           const PreprocessParams& params, int threads) {
  if (params.lut_element_size == 4)
    run_placements(images, placements, static_cast<uint32_t*>(out), params, threads);
  else
    run_placements(images, placements, static_cast<uint16_t*>(out), params, threads);
}

void preprocess_batch(const std::vector<ImageView>& images, void* out, const PreprocessParams& params,
                      int threads) {
  // Each image: (padded,) resized by its shortest edge, the (out_height, out_width) window centred on it at
  // floor((resized - out) / 2), which is negative when the window is larger (transformers pads by the ceil).
  const auto floor_half = [](int v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); };
  std::vector<Placement> placements;
  for (int i = 0; i < int(images.size()); ++i) {
    int source_h = images[i].height, source_w = images[i].width;
    if (params.pad_to_square) source_h = source_w = std::max(source_h, source_w);
    int resized_h = source_h, resized_w = source_w;
    if (params.shortest_edge > 0) resized_size(source_h, source_w, params.shortest_edge, &resized_h, &resized_w);
    placements.push_back({i, resized_h, resized_w, -floor_half(resized_h - params.out_height),
                          -floor_half(resized_w - params.out_width), params.out_height, params.out_width,
                          params.out_height, params.out_width, size_t(i) * 3 * params.out_height * params.out_width});
  }
  preprocess_placements(images, placements, out, params, threads);
}

}  // namespace llava_fast
