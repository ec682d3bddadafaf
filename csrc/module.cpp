// llava_fast._C: Python bindings of the native image preprocessing (preprocess.cpp) and build_info().
//
// Buffers cross as Python buffer-protocol objects (numpy arrays; a torch output tensor as
// `out.view(torch.int16 or int32).numpy()`), so the extension needs no libtorch and builds in seconds.
// Every argument is checked here, with the GIL held; the work then runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "decode.h"
#include "dequantize.h"
#include "gemm_q4.h"
#include "gemm_q8.h"
#include "gemv.h"
#include "isa/cpu_features.h"
#include "isa/kernels.h"
#include "preprocess.h"
#include "vision.h"

namespace py = pybind11;

namespace {

#ifndef LLAVA_FAST_CXX_FLAGS
#define LLAVA_FAST_CXX_FLAGS "unknown"
#endif
#ifndef LLAVA_FAST_BUILD_TYPE
#define LLAVA_FAST_BUILD_TYPE "unknown"
#endif

std::string shape_string(const py::buffer_info& info) {
  std::string s = "(";
  for (size_t i = 0; i < info.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(info.shape[i]);
  return s + (info.shape.size() == 1 ? ",)" : ")");
}

bool is_c_contiguous(const py::buffer_info& info) {
  py::ssize_t expected = info.itemsize;
  for (int d = int(info.ndim) - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expected) return false;
    expected *= info.shape[d];
  }
  return true;
}

// The Arrow C data interface structs (https://arrow.apache.org/docs/format/CDataInterface.html), a
// stable C ABI: Pillow (>= 11.2) exports an image's memory through them without a copy.
struct ArrowSchema {
  const char* format;
  const char* name;
  const char* metadata;
  int64_t flags;
  int64_t n_children;
  ArrowSchema** children;
  ArrowSchema* dictionary;
  void (*release)(ArrowSchema*);
  void* private_data;
};
struct ArrowArray {
  int64_t length;
  int64_t null_count;
  int64_t offset;
  int64_t n_buffers;
  int64_t n_children;
  const void** buffers;
  ArrowArray** children;
  ArrowArray* dictionary;
  void (*release)(ArrowArray*);
  void* private_data;
};

void check_size(int64_t h, int64_t w, int shortest_edge, const std::string& where) {
  const std::string shape = "(" + std::to_string(h) + ", " + std::to_string(w) + ")";
  if (h <= 0 || w <= 0) throw py::value_error(where + "zero-size image " + shape);
  if (h > INT_MAX / 4 || w > INT_MAX / 4 || h * w > (int64_t(1) << 40))
    throw py::value_error(where + "image too large " + shape);
  const int64_t long_side = int64_t(shortest_edge) * std::max(h, w) / std::min(h, w);
  if (shortest_edge > 0 && long_side > INT_MAX / 4)
    throw py::value_error(where + "aspect ratio too extreme: the resized long side would be " +
                          std::to_string(long_side));
}

// A PIL RGB image exported as (arrow_schema capsule, arrow_array capsule, height, width): Pillow's RGBX
// memory, used in place. The capsules stay referenced by the caller's list while we read.
llava_fast::ImageView arrow_view(const py::tuple& item, size_t index, int shortest_edge) {
  const std::string where = "image " + std::to_string(index) + ": ";
  const auto* schema = static_cast<const ArrowSchema*>(PyCapsule_GetPointer(item[0].ptr(), "arrow_schema"));
  const auto* array = static_cast<const ArrowArray*>(PyCapsule_GetPointer(item[1].ptr(), "arrow_array"));
  if (schema == nullptr || array == nullptr) {
    PyErr_Clear();
    throw py::value_error(where + "expected (arrow_schema, arrow_array, height, width) capsules from a PIL image");
  }
  const int64_t h = item[2].cast<int64_t>(), w = item[3].cast<int64_t>();
  check_size(h, w, shortest_edge, where);
  const bool rgbx = schema->format != nullptr && std::string(schema->format) == "+w:4" && schema->n_children == 1 &&
                    std::string(schema->children[0]->format) == "C";
  if (!rgbx || array->release == nullptr || array->n_children != 1 || array->length != h * w || array->offset != 0 ||
      array->null_count != 0) {
    throw py::value_error(where + "the Arrow export is not a contiguous (H*W, 4) uint8 image (format '" +
                          std::string(schema->format ? schema->format : "?") + "')");
  }
  const ArrowArray* bytes = array->children[0];
  if (bytes->n_buffers != 2 || bytes->offset != 0 || bytes->length != h * w * 4 || bytes->buffers[1] == nullptr)
    throw py::value_error(where + "the Arrow export's pixel buffer is not one contiguous block");
  return {static_cast<const uint8_t*>(bytes->buffers[1]), int(h), int(w), 4};
}

llava_fast::ImageView image_view(const py::buffer_info& info, size_t index, int shortest_edge) {
  const std::string where = "image " + std::to_string(index) + ": ";
  if (info.itemsize != 1 || (info.format != "B" && info.format != "=B" && info.format != "<B" && info.format != "|B"))
    throw py::value_error(where + "expected dtype uint8, got buffer format '" + info.format + "'");
  if (info.ndim != 3 || info.shape[2] != 3)
    throw py::value_error(where + "expected shape (H, W, 3) RGB, got " + shape_string(info));
  check_size(info.shape[0], info.shape[1], shortest_edge, where);
  if (!is_c_contiguous(info)) throw py::value_error(where + "array is not C-contiguous (use np.ascontiguousarray)");
  return {static_cast<const uint8_t*>(info.ptr), int(info.shape[0]), int(info.shape[1]), 3};
}

// Each image as a view: a PIL image's Arrow export or a uint8 (H, W, 3) buffer, whose buffer_info goes to `held`.
std::vector<llava_fast::ImageView> image_views(const py::list& images, int shortest_edge,
                                               std::vector<py::buffer_info>& held) {
  std::vector<llava_fast::ImageView> views;
  held.reserve(py::len(images));
  for (size_t i = 0; i < py::len(images); ++i) {
    py::handle item = images[i];
    if (py::isinstance<py::tuple>(item) && py::len(item) == 4) {
      views.push_back(arrow_view(py::reinterpret_borrow<py::tuple>(item), i, shortest_edge));
      continue;
    }
    if (!PyObject_CheckBuffer(item.ptr()))
      throw py::value_error("image " + std::to_string(i) + ": expected a uint8 (H, W, 3) array or a PIL image's "
                            "(arrow_schema, arrow_array, height, width), got " +
                            std::string(py::str(py::type::handle_of(item).attr("__name__"))));
    held.push_back(py::reinterpret_borrow<py::buffer>(item).request());
    views.push_back(image_view(held.back(), i, shortest_edge));
  }
  return views;
}

void preprocess_into(const py::list& images, const py::buffer& out, const py::buffer& lut, int shortest_edge,
                     py::object pad_fill, int pass_order, int threads) {
  py::buffer_info out_info = out.request(/*writable=*/true);
  py::buffer_info lut_info = lut.request();
  if (out_info.ndim != 4 || out_info.shape[1] != 3)
    throw py::value_error("out: expected shape (N, 3, H, W), got " + shape_string(out_info));
  if (out_info.itemsize != 2 && out_info.itemsize != 4)
    throw py::value_error("out: expected 2- or 4-byte elements, got " + std::to_string(out_info.itemsize));
  if (!is_c_contiguous(out_info)) throw py::value_error("out: must be C-contiguous");
  if (out_info.shape[0] != py::ssize_t(py::len(images)))
    throw py::value_error("out: batch dimension " + std::to_string(out_info.shape[0]) + " != " +
                          std::to_string(py::len(images)) + " images");
  if (out_info.shape[2] <= 0 || out_info.shape[3] <= 0) throw py::value_error("out: zero-size output window");
  if (lut_info.itemsize != out_info.itemsize || lut_info.ndim != 2 || lut_info.shape[0] != 3 ||
      lut_info.shape[1] != 256 || !is_c_contiguous(lut_info))
    throw py::value_error("lut: expected a contiguous (3, 256) table with out's element size");
  if (shortest_edge < 0) throw py::value_error("shortest_edge must be >= 0");
  if (pass_order != llava_fast::kPassOrderHorizontalFirst && pass_order != llava_fast::kPassOrderPillow13)
    throw py::value_error("pass_order must be 0 (horizontal first, Pillow <= 12) or 1 (Pillow >= 13)");

  llava_fast::PreprocessParams params{};
  params.out_height = int(out_info.shape[2]);
  params.out_width = int(out_info.shape[3]);
  params.shortest_edge = shortest_edge;
  params.pass_order = pass_order;
  params.lut = lut_info.ptr;
  params.lut_element_size = int(lut_info.itemsize);
  if (!pad_fill.is_none()) {
    auto fill = pad_fill.cast<std::vector<int>>();
    if (fill.size() != 3) throw py::value_error("pad_fill: expected 3 values");
    params.pad_to_square = true;
    for (int c = 0; c < 3; ++c) {
      if (fill[c] < 0 || fill[c] > 255) throw py::value_error("pad_fill: values must be in 0..255");
      params.fill[c] = uint8_t(fill[c]);
    }
  }

  std::vector<py::buffer_info> held;  // keeps every image buffer alive and unmoved while the GIL is released
  const std::vector<llava_fast::ImageView> views = image_views(images, shortest_edge, held);
  py::gil_scoped_release no_gil;
  llava_fast::preprocess_batch(views, out_info.ptr, params, threads < 1 ? 1 : threads);
}

// AnyRes and other tiled layouts: `placements` is a list of (image, resized_height, resized_width, top, left,
// window_height, window_width, tile_height, tile_width, out_offset) tuples (preprocess.h's Placement), each
// checked to fit in `out` (any C-contiguous buffer of 2- or 4-byte elements) before the GIL is released.
void preprocess_tiles_into(const py::list& images, const py::list& placements, const py::buffer& out,
                           const py::buffer& lut, int pass_order, int threads) {
  py::buffer_info out_info = out.request(/*writable=*/true);
  py::buffer_info lut_info = lut.request();
  if (out_info.itemsize != 2 && out_info.itemsize != 4)
    throw py::value_error("out: expected 2- or 4-byte elements, got " + std::to_string(out_info.itemsize));
  if (!is_c_contiguous(out_info)) throw py::value_error("out: must be C-contiguous");
  if (lut_info.itemsize != out_info.itemsize || lut_info.ndim != 2 || lut_info.shape[0] != 3 ||
      lut_info.shape[1] != 256 || !is_c_contiguous(lut_info))
    throw py::value_error("lut: expected a contiguous (3, 256) table with out's element size");
  if (pass_order != llava_fast::kPassOrderHorizontalFirst && pass_order != llava_fast::kPassOrderPillow13)
    throw py::value_error("pass_order must be 0 (horizontal first, Pillow <= 12) or 1 (Pillow >= 13)");

  std::vector<py::buffer_info> held;  // keeps every image buffer alive and unmoved while the GIL is released
  const std::vector<llava_fast::ImageView> views = image_views(images, 0, held);

  const int64_t out_elements = out_info.size;
  std::vector<llava_fast::Placement> laid;
  for (size_t i = 0; i < py::len(placements); ++i) {
    const auto v = placements[i].cast<std::vector<int64_t>>();
    const std::string where = "placement " + std::to_string(i) + ": ";
    if (v.size() != 10) throw py::value_error(where + "expected 10 integers");
    const int64_t image = v[0], rh = v[1], rw = v[2], top = v[3], left = v[4], wh = v[5], ww = v[6], th = v[7],
                  tw = v[8], offset = v[9];
    if (image < 0 || image >= int64_t(views.size())) throw py::value_error(where + "image index out of range");
    if (rh <= 0 || rw <= 0 || rh > INT_MAX / 4 || rw > INT_MAX / 4 || rh * rw > (int64_t(1) << 40))
      throw py::value_error(where + "resized size out of range");
    if (std::abs(top) > INT_MAX / 4 || std::abs(left) > INT_MAX / 4) throw py::value_error(where + "offset out of range");
    if (th <= 0 || tw <= 0 || wh <= 0 || ww <= 0 || wh > INT_MAX / 4 || ww > INT_MAX / 4 || wh % th || ww % tw)
      throw py::value_error(where + "the window must be a positive whole number of tiles");
    if (offset < 0 || offset > out_elements || 3 * wh * ww > out_elements - offset)
      throw py::value_error(where + "the window does not fit in out");
    laid.push_back({int(image), int(rh), int(rw), int(top), int(left), int(wh), int(ww), int(th), int(tw),
                    size_t(offset)});
  }
  llava_fast::PreprocessParams params{};
  params.pass_order = pass_order;
  params.lut = lut_info.ptr;
  params.lut_element_size = int(lut_info.itemsize);
  py::gil_scoped_release no_gil;
  llava_fast::preprocess_placements(views, laid, out_info.ptr, params, threads < 1 ? 1 : threads);
}

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler();
  info["cxx_standard"] = long(__cplusplus);
  info["build_type"] = LLAVA_FAST_BUILD_TYPE;
  info["flags"] = LLAVA_FAST_CXX_FLAGS;
  std::vector<std::string> baseline;  // instruction sets the whole build may assume (compiler flags)
#ifdef __SSE4_1__
  baseline.push_back("sse4.1");
#endif
#ifdef __AVX2__
  baseline.push_back("avx2");
#endif
#ifdef __ARM_NEON
  baseline.push_back("neon");
#endif
  info["baseline_simd"] = baseline;
  info["kernels"] = llava_fast::kernel_isa();  // the resize kernels in use: "avx2" (runtime dispatch) or "scalar"
  info["cpu_isa"] = llava_fast::kernels().variant;  // the GEMV / decode kernel table in use (csrc/isa/)
  info["threading"] = "std::thread, one per core asked for, GIL released";
  info["hardware_threads"] = std::thread::hardware_concurrency();
  info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                     std::to_string(PYBIND11_VERSION_PATCH);
  return info;
}

// Pointers cross as integers (tensor.data_ptr()): one call per linear layer in a decode step, so the
// binding stays a few hundred nanoseconds. llava_fast/cpu/gemv.py checks dtypes, shapes and contiguity first.
void gemv(uintptr_t x, int x_dtype, int64_t m, int64_t x_stride, uintptr_t w, int format, int64_t n, int64_t k,
          int64_t group, uintptr_t scales, uintptr_t mins, uintptr_t y, int64_t y_stride, int threads) {
  const llava_fast::GemvArgs args{reinterpret_cast<const void*>(x), x_dtype, m, x_stride,
                                  reinterpret_cast<const void*>(w), format, n, k, group,
                                  reinterpret_cast<const void*>(scales), reinterpret_cast<const void*>(mins),
                                  reinterpret_cast<void*>(y), y_stride};
  const std::string problem = llava_fast::gemv_check(args);
  if (!problem.empty()) throw py::value_error(problem);
  py::gil_scoped_release no_gil;
  llava_fast::gemv(args, threads < 1 ? 1 : threads);
}

// The int4 prefill GEMM (gemm_q4.cpp), same arguments as gemv; for tests and benchmarks.
void gemm_q4(uintptr_t x, int64_t m, int64_t x_stride, uintptr_t w, int64_t n, int64_t k, int64_t group,
             uintptr_t scales, uintptr_t mins, uintptr_t y, int64_t y_stride, int threads) {
  const llava_fast::GemvArgs args{reinterpret_cast<const void*>(x), llava_fast::kActF32, m, x_stride,
                                  reinterpret_cast<const void*>(w), llava_fast::kWeightQ4, n, k, group,
                                  reinterpret_cast<const void*>(scales), reinterpret_cast<const void*>(mins),
                                  reinterpret_cast<void*>(y), y_stride};
  const std::string problem = llava_fast::gemm_q4_check(args);
  if (!problem.empty()) throw py::value_error(problem);
  py::gil_scoped_release no_gil;
  llava_fast::gemm_q4(args, threads < 1 ? 1 : threads);
}

// The int8 prefill GEMM (gemm_q8.cpp), gemv's arguments for an int8 weight; for tests and benchmarks.
void gemm_q8(uintptr_t x, int64_t m, int64_t x_stride, uintptr_t w, int64_t n, int64_t k, uintptr_t scales,
             uintptr_t y, int64_t y_stride, int threads) {
  const llava_fast::GemvArgs args{reinterpret_cast<const void*>(x), llava_fast::kActF32, m, x_stride,
                                  reinterpret_cast<const void*>(w), llava_fast::kWeightQ8, n, k, 0,
                                  reinterpret_cast<const void*>(scales), nullptr, reinterpret_cast<void*>(y), y_stride};
  const std::string problem = llava_fast::gemm_q8_check(args);
  if (!problem.empty()) throw py::value_error(problem);
  py::gil_scoped_release no_gil;
  llava_fast::gemm_q8(args, threads < 1 ? 1 : threads);
}

const void* ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }

// A linear layer as Python describes it: (w, format, n, k, group, scales, mins, bias), pointers as integers.
llava_fast::DecodeLinear decode_linear(const py::tuple& t) {
  if (t.size() != 8) throw py::value_error("decode: a linear layer is (w, format, n, k, group, scales, mins, bias)");
  llava_fast::DecodeLinear l;
  l.w = ptr(t[0].cast<uintptr_t>());
  l.format = t[1].cast<int>();
  l.n = t[2].cast<int64_t>(), l.k = t[3].cast<int64_t>(), l.group = t[4].cast<int64_t>();
  l.scales = ptr(t[5].cast<uintptr_t>()), l.mins = ptr(t[6].cast<uintptr_t>()), l.bias = ptr(t[7].cast<uintptr_t>());
  return l;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llava-fast native code: image preprocessing (csrc/preprocess.cpp), CPU GEMV (csrc/gemv.cpp), the CPU decode step (csrc/decode.cpp).";
  m.def("preprocess_tiles_into", &preprocess_tiles_into, py::arg("images"), py::arg("placements"), py::arg("out"),
        py::arg("lut"), py::arg("pass_order"), py::arg("threads"),
        "Each image resized and placed in a tiled window of out (AnyRes); see Placement in csrc/preprocess.h.");
  m.def("preprocess_into", &preprocess_into, py::arg("images"), py::arg("out"), py::arg("lut"),
        py::arg("shortest_edge"), py::arg("pad_fill") = py::none(),
        py::arg("pass_order") = llava_fast::kPassOrderPillow13,
        py::arg("threads") = 1,
        "Pad (pad_fill = RGB colour or None), resize the shortest edge (0: no resize) with Pillow's bicubic, "
        "center-crop to out's (H, W) and write lut[c][level] into out (N, 3, H, W). images: C-contiguous "
        "uint8 (H, W, 3) arrays, or (*pil_image.__arrow_c_array__(), height, width) for a PIL RGB image "
        "(read in place); out and lut: buffers of the same 2- or 4-byte element size. pass_order: 0 "
        "= Pillow <= 12 (horizontal pass first), 1 = Pillow >= 13 (vertical first for tall shrinks).");
  m.def("resized_size", [](int h, int w, int edge) {
    int oh, ow;
    llava_fast::resized_size(h, w, edge, &oh, &ow);
    return py::make_tuple(oh, ow);
  });
  m.def("use_kernels", &llava_fast::use_kernels, py::arg("name"),
        "Switch the resize kernels: 'scalar' or 'best' (the default; AVX2 when the CPU has it). For tests.");
  m.def("gemv", &gemv, py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("x_stride"), py::arg("w"),
        py::arg("format"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("scales"), py::arg("mins"),
        py::arg("y"), py::arg("y_stride"), py::arg("threads"),
        "y (M, N) = x (M, K) @ W (N, K)^T for CPU decode, W in one of the formats of csrc/gemv.h; pointers "
        "as integers (tensor.data_ptr()). Use llava_fast.cpu.gemv, which checks the tensors.");
  m.def("gemm_q4", &gemm_q4, py::arg("x"), py::arg("m"), py::arg("x_stride"), py::arg("w"), py::arg("n"),
        py::arg("k"), py::arg("group"), py::arg("scales"), py::arg("mins"), py::arg("y"), py::arg("y_stride"),
        py::arg("threads"),
        "y (M, N) float32 = x (M, K) float32 @ W (N, K)^T, W int4 (gemv.h kWeightQ4): the prefill GEMM of "
        "csrc/gemm_q4.cpp. Pointers as integers; for tests and benchmarks.");
  m.def("gemm_q8", &gemm_q8, py::arg("x"), py::arg("m"), py::arg("x_stride"), py::arg("w"), py::arg("n"),
        py::arg("k"), py::arg("scales"), py::arg("y"), py::arg("y_stride"), py::arg("threads"),
        "y (M, N) float32 = x (M, K) float32 @ W (N, K)^T, W int8 (gemv.h kWeightQ8): the prefill GEMM of "
        "csrc/gemm_q8.cpp. Pointers as integers; for tests and benchmarks.");
  // gemv.h's weight formats and activation dtypes by name: llava_fast/cpu/gemv.py reads the numbers from here.
  py::dict weight_formats, activation_dtypes;
  weight_formats["float32"] = int(llava_fast::kWeightF32);
  weight_formats["bfloat16"] = int(llava_fast::kWeightBF16);
  weight_formats["int8"] = int(llava_fast::kWeightQ8);
  weight_formats["int4"] = int(llava_fast::kWeightQ4);
  activation_dtypes["float32"] = int(llava_fast::kActF32);
  activation_dtypes["bfloat16"] = int(llava_fast::kActBF16);
  m.attr("WEIGHT_FORMATS") = weight_formats;
  m.attr("ACTIVATION_DTYPES") = activation_dtypes;
  // The CPU kernel tables (csrc/isa/kernels.h). LLAVA_FAST_CPU_ISA names one; a name this CPU cannot run does not
  // fail the import (the image preprocessing needs no table) but every kernel call (gemv, gemm_q4, dequantize,
  // DecodeModel.check/step/forward) raises ValueError naming the missing feature, and cpu_isa_problem() says it.
  m.def("cpu_isa_problem", [] { return std::string(llava_fast::kernels_env_problem()); },
        "'' or what is wrong with LLAVA_FAST_CPU_ISA (an unknown table, or one this CPU cannot run: what it lacks).");
  m.def("cpu_isa", [] { return std::string(llava_fast::kernels().name); },
        "The family of the CPU kernel table in use: 'avx512', 'avx2', 'neon' or 'scalar'.");
  m.def("cpu_isa_variant", [] { return std::string(llava_fast::kernels().variant); },
        "The exact table in use, e.g. 'avx2_vnni' (AVX2 with AVX-VNNI) or 'avx512_core' (AVX-512 without VNNI/BF16).");
  m.def("cpu_isa_tables", [] {
    llava_fast::KernelChoice choices[16];
    const int n = llava_fast::kernel_choices(choices, 16);
    py::list out;
    for (int i = 0; i < n; ++i)
      out.append(py::dict(py::arg("name") = choices[i].name,
                          py::arg("family") = choices[i].table ? choices[i].table->name : "",
                          py::arg("usable") = choices[i].table != nullptr && !*choices[i].missing,
                          py::arg("missing") = choices[i].missing));
    return out;
  }, "Every kernel table of this build, best first: name, family, usable here, and what the CPU lacks if not.");
  m.def("use_cpu_isa", [](const std::string& name) {
    const std::string problem = llava_fast::use_kernels_named(name.c_str());
    if (!problem.empty()) throw py::value_error(problem);
  }, py::arg("name"),
        "Switch the CPU kernels: 'best' (the probe's choice, or LLAVA_FAST_CPU_ISA's), a family ('avx2': its best "
        "variant here) or a variant ('avx2_maddubs'). ValueError naming the missing feature. For tests and benchmarks.");
  m.def("gemv_use_kernels", [](const std::string& name) { return llava_fast::gemv_use_kernels(name.c_str()); },
        "Switch the CPU kernels as use_cpu_isa, returning False instead of raising. For tests.");
  m.def("dequantize", [](uintptr_t w, int format, int64_t n, int64_t k, int64_t group, uintptr_t scales,
                         uintptr_t mins, uintptr_t out, int out_dtype, int threads) {
    const llava_fast::GemvArgs a{nullptr, llava_fast::kActF32, 1, k, ptr(w), format, n, k, group, ptr(scales),
                                 ptr(mins), nullptr, n};
    const std::string problem = llava_fast::gemv_weight_check(a);
    if (!problem.empty()) throw py::value_error(problem);
    if (format != llava_fast::kWeightQ8 && format != llava_fast::kWeightQ4)
      throw py::value_error("dequantize: int8 or int4 weights only (float weights need no dequantization)");
    if (out_dtype != llava_fast::kActF32 && out_dtype != llava_fast::kActBF16)
      throw py::value_error("dequantize: out must be float32 or bfloat16");
    py::gil_scoped_release no_gil;
    llava_fast::dequantize(a, reinterpret_cast<void*>(out), out_dtype, threads < 1 ? 1 : threads);
  }, "The dense (N, K) weight of a packed GEMV weight into out (float32 or bfloat16); see csrc/dequantize.h.");
  // The CLIP tower's glue (vision.cpp); llava_fast/image/native_tower.py checks the tensors.
  m.def("vision_quick_gelu", [](uintptr_t x, int64_t n, int dtype, int threads) {
    if (n < 0) throw py::value_error("vision_quick_gelu: negative size " + std::to_string(n));
    if (dtype != llava_fast::kActF32 && dtype != llava_fast::kActBF16)
      throw py::value_error("vision_quick_gelu: float32 or bfloat16 values only");
    py::gil_scoped_release no_gil;
    llava_fast::vision_quick_gelu(reinterpret_cast<void*>(x), n, dtype == llava_fast::kActBF16, threads < 1 ? 1 : threads);
  }, "x * sigmoid(1.702 x) over n contiguous float32 or bfloat16 values in place; see csrc/vision.h.");
  // The native decode step (decode.cpp). llava_fast/cpu/native_decode.py builds the description from a model and
  // keeps its tensors alive; pointers cross as integers, as for gemv.
  py::class_<llava_fast::DecodeModel>(m, "DecodeModel")
      .def(py::init([](int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                       int64_t vocab, int64_t embed_rows, int64_t rope_positions, float eps, int dtype,
                       uintptr_t embed, uintptr_t final_norm, uintptr_t cos, uintptr_t sin, const py::tuple& lm_head) {
             auto* d = new llava_fast::DecodeModel();
             d->hidden = hidden, d->heads = heads, d->kv_heads = kv_heads, d->head_dim = head_dim;
             d->intermediate = intermediate, d->vocab = vocab, d->embed_rows = embed_rows;
             d->rope_positions = rope_positions, d->eps = eps, d->dtype = dtype;
             d->embed = ptr(embed), d->final_norm = ptr(final_norm);
             d->cos = static_cast<const float*>(ptr(cos)), d->sin = static_cast<const float*>(ptr(sin));
             d->lm_head = decode_linear(lm_head);
             return d;
           }))
      .def("add_layer", [](llava_fast::DecodeModel& d, uintptr_t input_norm, uintptr_t post_norm, const py::tuple& qkv,
                           const py::tuple& o, const py::tuple& gate_up, const py::tuple& down) {
        d.layers.push_back({ptr(input_norm), ptr(post_norm), decode_linear(qkv), decode_linear(o),
                            decode_linear(gate_up), decode_linear(down)});
      })
      .def_readwrite("sliding_window", &llava_fast::DecodeModel::sliding_window,
                     "> 0: each position attends to its last sliding_window positions (Mistral); 0: to all")
      .def("prompt_chunk_rows", [](const llava_fast::DecodeModel& d) { return llava_fast::decode_prompt_chunk_rows(d); },
           "Rows of a prompt that go through the layers at a time with the active kernel table (decode.h).")
      .def("check", [](const llava_fast::DecodeModel& d) {
        const std::string problem = llava_fast::decode_model_check(d);
        if (!problem.empty()) throw py::value_error(problem);
      })
      .def("step", [](const llava_fast::DecodeModel& d, uintptr_t tokens, uintptr_t lengths, int64_t rows, uintptr_t k,
                      uintptr_t v, int64_t layer_stride, int64_t row_stride, int64_t head_stride, int64_t pos_stride,
                      int64_t capacity, uintptr_t logits, int threads) {
        const llava_fast::DecodeCache cache{reinterpret_cast<void*>(k), reinterpret_cast<void*>(v), layer_stride,
                                            row_stride, head_stride, pos_stride, capacity, rows};
        std::string problem;
        {
          py::gil_scoped_release no_gil;
          problem = llava_fast::decode_step(d, reinterpret_cast<const int64_t*>(tokens),
                                            reinterpret_cast<int32_t*>(lengths), rows, cache,
                                            reinterpret_cast<float*>(logits), threads < 1 ? 1 : threads);
        }
        if (!problem.empty()) throw py::value_error(problem);
      }, "tokens (rows,) int64, lengths (rows,) int32 -> logits (rows, vocab) float32; see csrc/decode.h.")
      .def("forward", [](const llava_fast::DecodeModel& d, int64_t rows, uintptr_t tokens, uintptr_t embeds,
                         uintptr_t slots, uintptr_t positions, uintptr_t logit_rows, int64_t logit_count, uintptr_t k,
                         uintptr_t v, int64_t layer_stride, int64_t row_stride, int64_t head_stride, int64_t pos_stride,
                         int64_t capacity, int64_t cache_rows, uintptr_t logits, int threads, bool prompt) {
        const llava_fast::DecodeCache cache{reinterpret_cast<void*>(k), reinterpret_cast<void*>(v), layer_stride,
                                            row_stride, head_stride, pos_stride, capacity, cache_rows};
        llava_fast::DecodeRows in;
        in.rows = rows, in.tokens = reinterpret_cast<const int64_t*>(tokens), in.embeds = ptr(embeds);
        in.slots = reinterpret_cast<const int64_t*>(slots), in.positions = reinterpret_cast<const int32_t*>(positions);
        in.logit_rows = reinterpret_cast<const int64_t*>(logit_rows), in.logit_count = logit_count;
        in.prompt = prompt;
        std::string problem;
        {
          py::gil_scoped_release no_gil;
          problem = llava_fast::decode_rows(d, in, cache, reinterpret_cast<float*>(logits), threads < 1 ? 1 : threads);
        }
        if (!problem.empty()) throw py::value_error(problem);
      }, py::arg("rows"), py::arg("tokens"), py::arg("embeds"), py::arg("slots"), py::arg("positions"),
         py::arg("logit_rows"), py::arg("logit_count"), py::arg("k"), py::arg("v"), py::arg("layer_stride"),
         py::arg("row_stride"), py::arg("head_stride"), py::arg("pos_stride"), py::arg("capacity"),
         py::arg("cache_rows"), py::arg("logits"), py::arg("threads"), py::arg("prompt") = false,
         "Rows at (cache row, position) pairs (tokens or embeddings; 0 for a null pointer) -> logits of the "
         "wanted rows; see DecodeRows in csrc/decode.h (prompt: int4 projections through the prefill GEMM).");
  m.def("build_info", &build_info, "How this extension was compiled: compiler, flags, SIMD, threading.");
}
