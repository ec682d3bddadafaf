// Native LLaVA image preprocessing: pad-to-square, Pillow-exact bicubic resize, center crop, rescale and
// normalise, for a batch of images across threads.
//
// The resize reproduces Pillow's Image.resize(size, BICUBIC) for 8-bit RGB bit for bit:
//   - separable, horizontal pass first into a uint8 intermediate, then vertical;
//   - output pixel x samples input around center = (x + 0.5) * scale, scale = in / out; on a downscale the
//     filter is stretched by scale (support 2 * scale), which is Pillow's antialiasing;
//   - Keys cubic with a = -0.5, weights normalised to sum 1 in double, then rounded (half away from zero)
//     to fixed point with 22 fractional bits; accumulation in int32 starting at 0.5 (2^21), result
//     >> 22 and clamped to 0..255. 22 bits: 255 * (sum of |weights| <= ~1.3) * 2^22 < 2^31.
//   - the coefficient arithmetic is kept in the same order as Pillow's and built with -ffp-contract=off
//     (an FMA would change the last bit of a weight and, rarely, a rounded pixel).
//
// Two things make it faster than Pillow + numpy, besides threads and no Python between steps:
//   - only the pixels of the center crop are computed: each output pixel of Pillow's two passes depends
//     on its own taps only, so computing the crop window's columns (and the rows its taps read) gives the
//     same values. 640x480 -> 448x336 -> crop 336x336 skips a quarter of the work, a 1x1000 strip
//     (resized to 336x336000) skips 99.9%.
//   - rescale + normalise + dtype cast is one table lookup: a uint8 level has 256 possible outputs per
//     channel, which the caller computes with the reference's own arithmetic (float64 rescale, float32
//     (x - mean) / std, torch's cast), so the native values equal the Python path's exactly.
//
// Work is split into (image, block of output columns) items pulled by std::threads from an atomic counter,
// so a batch of one large image still uses every core. Per item: horizontal pass over the rows the block's
// vertical taps read, into a (rows, block, 3) uint8 buffer (480 x 112 x 3 = 160 KiB for a 640x480 photo,
// L2-sized), then the vertical pass and the table lookup straight into the NCHW output.
#include "preprocess.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace llava_fast {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);
constexpr double kOne = double(1 << kPrecisionBits);
constexpr int kTargetBlockColumns = 128;

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

  const int32_t* weights_of(int output) const { return &weights[size_t(output - begin) * taps]; }
  int first_of(int output) const { return first[output - begin]; }
  int count_of(int output) const { return count[output - begin]; }
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

// The source as the resize sees it: the image itself, or the image centred on a square of `fill`.
class PaddedSource {
 public:
  PaddedSource(const ImageView& image, const PreprocessParams& params) : image_(image) {
    height_ = image.height;
    width_ = image.width;
    if (params.pad_to_square && image.height != image.width) {
      height_ = width_ = std::max(image.height, image.width);
      top_ = (height_ - image.height) / 2;
      left_ = (width_ - image.width) / 2;
      fill_row_.resize(size_t(width_) * 3);
      for (int x = 0; x < width_; ++x) std::memcpy(&fill_row_[size_t(x) * 3], params.fill, 3);
      if (image.width != width_) scratch_row_ = fill_row_;  // a portrait image: fill left and right
    }
  }
  int height() const { return height_; }
  int width() const { return width_; }

  // Row y of the (padded) source, width() pixels of RGB. Valid until the next call.
  const uint8_t* row(int y) {
    const int image_y = y - top_;
    if (image_y < 0 || image_y >= image_.height) return fill_row_.data();
    const uint8_t* source = image_.data + size_t(image_y) * image_.width * 3;
    if (scratch_row_.empty()) return source;
    std::memcpy(&scratch_row_[size_t(left_) * 3], source, size_t(image_.width) * 3);
    return scratch_row_.data();
  }

 private:
  const ImageView& image_;
  int height_, width_, top_ = 0, left_ = 0;
  std::vector<uint8_t> fill_row_, scratch_row_;
};

struct WorkItem {
  int image;
  int column_begin;  // in output-window coordinates
  int column_end;
};

template <typename T>
void fill_window_columns(T* planes, const T* lut, const PreprocessParams& p, int column_begin, int column_end) {
  const size_t plane = size_t(p.out_height) * p.out_width;
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < p.out_height; ++y)
      std::fill(planes + c * plane + size_t(y) * p.out_width + column_begin,
                planes + c * plane + size_t(y) * p.out_width + column_end, lut[c * 256]);
}

// ------------------------------------------------------------------------------------------------------
// Kernels: where the time goes (about 85% for a 640x480 photo). Each has a portable scalar version and an
// AVX2 version (intrinsics compiled for that target only, picked at run time when the CPU has it, so one
// build runs on any x86-64). Both do the same int32 arithmetic and give the same bytes.
// ------------------------------------------------------------------------------------------------------

// Horizontal pass of one row for outputs [x_begin, x_end): `row` holds RGB pixels of source columns
// from row_x0 on, followed by kRowSlack readable spare bytes. Writes RGBX bytes (X unspecified) to `dst`.
void horizontal_row_scalar(const uint8_t* row, int row_x0, const FilterBank& bank, int x_begin, int x_end,
                           uint8_t* dst) {
  for (int x = x_begin; x < x_end; ++x, dst += 4) {
    const int32_t* k = bank.weights_of(x);
    const uint8_t* px = row + size_t(bank.first_of(x) - row_x0) * 3;
    int32_t r = kHalf, g = kHalf, b = kHalf;
    for (int t = 0, n = bank.count_of(x); t < n; ++t, px += 3) {
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

// One output row of a vertical pass: out[j] = clip8(1/2 + sum_t rows[t][j] * k[t]) for j in [begin, n).
// Bytes are channel-agnostic here, so this serves RGB and RGBX rows alike.
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

constexpr size_t kRowSlack = 4;  // the AVX2 horizontal kernel loads 4 bytes for a 3-byte pixel

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LLAVA_FAST_AVX2 1

// One pixel's 4 lanes (R, G, B, and the next pixel's R, ignored) per 128-bit register: per tap a 4-byte
// load, widen, multiply by the broadcast weight, add. Saturating packs do clip8's clamp.
__attribute__((target("avx2"))) void horizontal_row_avx2(const uint8_t* row, int row_x0, const FilterBank& bank,
                                                         int x_begin, int x_end, uint8_t* dst) {
  const __m128i half = _mm_set1_epi32(kHalf);
  for (int x = x_begin; x < x_end; ++x, dst += 4) {
    const int32_t* k = bank.weights_of(x);
    const uint8_t* px = row + size_t(bank.first_of(x) - row_x0) * 3;
    __m128i acc = half;
    for (int t = 0, n = bank.count_of(x); t < n; ++t, px += 3) {
      int32_t word;
      std::memcpy(&word, px, 4);
      const __m128i lanes = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
      acc = _mm_add_epi32(acc, _mm_mullo_epi32(lanes, _mm_set1_epi32(k[t])));
    }
    const __m128i level = _mm_srai_epi32(acc, kPrecisionBits);
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(level, level), _mm_setzero_si128());
    const int32_t packed = _mm_cvtsi128_si32(bytes);
    std::memcpy(dst, &packed, 4);
  }
}

// 32 bytes per step in four 8-lane accumulators.
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
    // packs work within 128-bit halves; the permute puts the 64-bit groups back in order.
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
  HorizontalKernel horizontal;
  VerticalKernel vertical;
  const char* name;
};

const Kernels& kernels() {
  static const Kernels chosen = [] {
#ifdef LLAVA_FAST_AVX2
    if (__builtin_cpu_supports("avx2")) return Kernels{horizontal_row_avx2, vertical_row_avx2, "avx2"};
#endif
    return Kernels{horizontal_row_scalar, vertical_row_scalar, "scalar"};
  }();
  return chosen;
}

// Pillow (since 13.0) runs the vertical pass first when the height shrinks by more than twice as many
// pixels as the width; before, it always ran horizontal first. The two orders round the uint8
// intermediate differently (up to ~15 levels on random pixels), so we follow whichever the caller's
// Pillow does (llava_fast/image.py probes it once). A padded (square) source never goes vertical first.
bool vertical_pass_first(int pass_order, int in_h, int in_w, int out_h, int out_w) {
  return pass_order == kPassOrderPillow13 && in_h > out_h && in_h - out_h > 2 * (in_w - out_w);
}

template <typename T>
void run_item(const ImageView& image, const WorkItem& item, const PreprocessParams& p, T* out, const T* lut) {
  const size_t plane = size_t(p.out_height) * p.out_width;
  T* planes = out + size_t(item.image) * 3 * plane;
  PaddedSource source(image, p);
  int resized_h = source.height(), resized_w = source.width();
  if (p.shortest_edge > 0) resized_size(source.height(), source.width(), p.shortest_edge, &resized_h, &resized_w);

  // The window in resized coordinates: top/left are floor((resized - out) / 2), negative when the window
  // is larger than the image (then the uncovered part is zero, transformers' pad-then-crop).
  const auto floor_half = [](int v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); };
  const int top = floor_half(resized_h - p.out_height);
  const int left = floor_half(resized_w - p.out_width);
  const int y_begin = std::max(top, 0), y_end = std::min(top + p.out_height, resized_h);
  const int x_begin = std::max(left + item.column_begin, 0);
  const int x_end = std::min(left + item.column_end, resized_w);
  const bool window_covered = y_begin == top && y_end == top + p.out_height && x_begin == left + item.column_begin &&
                              x_end == left + item.column_end;
  if (!window_covered) fill_window_columns(planes, lut, p, item.column_begin, item.column_end);
  if (y_begin >= y_end || x_begin >= x_end) return;

  const FilterBank vertical = bicubic_bank(source.height(), resized_h, y_begin, y_end);
  const FilterBank horizontal = bicubic_bank(source.width(), resized_w, x_begin, x_end);
  const int columns = x_end - x_begin;
  const int col_begin = horizontal.first_of(x_begin);  // source columns the horizontal taps read
  const int col_end = horizontal.first_of(x_end - 1) + horizontal.count_of(x_end - 1);
  std::vector<uint8_t> segment(size_t(col_end - col_begin) * 3 + kRowSlack);  // a source row segment
  std::vector<uint8_t> levels(size_t(columns) * 4);  // one finished window row, RGBX
  std::vector<const uint8_t*> tap_rows(vertical.taps);
  const Kernels& kernel = kernels();
  const int out_x0 = x_begin - left;                  // first output column this item writes
  auto emit_row = [&](int y) {                        // table lookup of `levels` into the three planes
    const size_t out_row = size_t(y - top) * p.out_width + out_x0;
    for (int c = 0; c < 3; ++c) {
      T* dst = planes + c * plane + out_row;
      const T* table = lut + c * 256;
      for (int x = 0; x < columns; ++x) dst[x] = table[levels[size_t(x) * 4 + c]];
    }
  };

  if (!vertical_pass_first(p.pass_order, source.height(), source.width(), resized_h, resized_w)) {
    // Horizontal pass over the rows the vertical taps read -> (rows, columns) RGBX, then vertical.
    const int row_begin = vertical.first_of(y_begin);
    const int row_end = vertical.first_of(y_end - 1) + vertical.count_of(y_end - 1);
    const size_t stride = size_t(columns) * 4;
    std::vector<uint8_t> between(size_t(row_end - row_begin) * stride);
    for (int y = row_begin; y < row_end; ++y) {
      std::memcpy(segment.data(), source.row(y) + size_t(col_begin) * 3, segment.size() - kRowSlack);
      kernel.horizontal(segment.data(), col_begin, horizontal, x_begin, x_end, &between[size_t(y - row_begin) * stride]);
    }
    for (int y = y_begin; y < y_end; ++y) {
      const int n = vertical.count_of(y);
      for (int t = 0; t < n; ++t) tap_rows[t] = &between[size_t(vertical.first_of(y) + t - row_begin) * stride];
      kernel.vertical(tap_rows.data(), vertical.weights_of(y), n, stride, levels.data());
      emit_row(y);
    }
  } else {
    // Vertical pass over the needed source columns, one window row at a time, then its horizontal pass.
    // Source rows are the image's own here (not padded), so the row pointers stay valid together.
    for (int y = y_begin; y < y_end; ++y) {
      const int n = vertical.count_of(y);
      for (int t = 0; t < n; ++t) tap_rows[t] = source.row(vertical.first_of(y) + t) + size_t(col_begin) * 3;
      kernel.vertical(tap_rows.data(), vertical.weights_of(y), n, segment.size() - kRowSlack, segment.data());
      kernel.horizontal(segment.data(), col_begin, horizontal, x_begin, x_end, levels.data());
      emit_row(y);
    }
  }
}

template <typename T>
void run_batch(const std::vector<ImageView>& images, T* out, const PreprocessParams& p, int threads) {
  const T* lut = static_cast<const T*>(p.lut);
  const int blocks = (p.out_width + kTargetBlockColumns - 1) / kTargetBlockColumns;
  const int block_columns = (p.out_width + blocks - 1) / blocks;
  std::vector<WorkItem> items;
  for (int i = 0; i < int(images.size()); ++i)
    for (int c = 0; c < p.out_width; c += block_columns) items.push_back({i, c, std::min(c + block_columns, p.out_width)});

  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_lock;
  auto worker = [&] {
    try {
      for (size_t i = next++; i < items.size(); i = next++) run_item(images[items[i].image], items[i], p, out, lut);
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

void preprocess_batch(const std::vector<ImageView>& images, void* out, const PreprocessParams& params,
                      int threads) {
  if (params.lut_element_size == 4)
    run_batch(images, static_cast<uint32_t*>(out), params, threads);
  else
    run_batch(images, static_cast<uint16_t*>(out), params, threads);
}

}  // namespace llava_fast
