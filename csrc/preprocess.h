// LLaVA image preprocessing in C++: a batch of decoded (H, W, 3) uint8 images -> (N, 3, OH, OW) pixels, or tiles.
// See preprocess.cpp for the arithmetic; llava_fast/image/ holds the Python reference it must match.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llava_fast {

struct ImageView {  // a C-contiguous (height, width, pixel_bytes) uint8 image owned by the caller
  const uint8_t* data;
  int height;
  int width;
  int pixel_bytes;  // 3: RGB (numpy); 4: RGBX, the 4th byte ignored (Pillow's own memory for RGB images)
};

// Order of Pillow's two resize passes: always horizontal first (Pillow <= 12), or vertical first when the
// height shrinks by more than twice as many pixels as the width (Pillow >= 13).
constexpr int kPassOrderHorizontalFirst = 0;
constexpr int kPassOrderPillow13 = 1;

struct PreprocessParams {
  int out_height;          // the output window: a center crop of the resized image, zeros (lut[c][0])
  int out_width;           //   where the window is larger than the image, as transformers pads
  int shortest_edge;       // resize so the shorter side is this many pixels; 0 leaves the size alone
  bool pad_to_square;      // LLaVA-1.5's expand2square before resizing
  uint8_t fill[3];         //   with this colour
  int pass_order;          // kPassOrderHorizontalFirst or kPassOrderPillow13
  const void* lut;         // (3, 256) output values for each channel and uint8 level, already rescaled,
  int lut_element_size;    //   normalised and cast to the output dtype (2 or 4 bytes) by the caller
};

// Where one image's resized copy goes: the image (padded to a square first when params.pad_to_square) is
// resized to (resized_height, resized_width); its pixel (0, 0) lands at (top, left) of a (window_height,
// window_width) window (negative: cropped off; window pixels it does not cover get level 0, lut[c][0]); the
// window is cut into tiles of (tile_height, tile_width), written row-major from element out_offset of the
// output, each tile as (3, tile_height, tile_width) planes. One tile the size of the window is the plain
// (3, H, W) layout; LLaVA-NeXT's AnyRes writes its padded canvas as 336 x 336 tiles (llava_fast/image/anyres.py).
struct Placement {
  int image;  // index into the images
  int resized_height;
  int resized_width;
  int top;
  int left;
  int window_height;  // multiples of the tile's
  int window_width;
  int tile_height;
  int tile_width;
  size_t out_offset;  // in elements
};

// (height, width) after the shortest-edge resize, truncating the long side as transformers does.
void resized_size(int height, int width, int shortest_edge, int* out_height, int* out_width);

// "avx2" or "scalar": the kernels in use (the best this CPU runs, unless use_kernels said otherwise).
const char* kernel_isa();

// Switch kernels: "scalar" or "best" (for tests; both must give the same bytes). False for other names.
bool use_kernels(const std::string& name);

// Writes images[i] into out + i * 3 * out_height * out_width elements (NCHW). Runs on `threads` threads;
// touches no Python state, so the caller can release the GIL around it.
void preprocess_batch(const std::vector<ImageView>& images, void* out, const PreprocessParams& params,
                      int threads);

// Writes each placement's window (see Placement; the caller has checked that every one fits in `out`).
// Uses params' pad_to_square, fill, pass_order and lut; not its out size or shortest_edge.
void preprocess_placements(const std::vector<ImageView>& images, const std::vector<Placement>& placements, void* out,
                           const PreprocessParams& params, int threads);

}  // namespace llava_fast
