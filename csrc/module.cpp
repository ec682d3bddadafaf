// llava_fast._C: Python bindings of the native image preprocessing (preprocess.cpp) and build_info().
//
// Buffers cross as Python buffer-protocol objects (numpy arrays; a torch output tensor as
// `out.view(torch.int16 or int32).numpy()`), so the extension needs no libtorch and builds in seconds.
// Every argument is checked here, with the GIL held; the work then runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <string>
#include <thread>
#include <vector>

#include "preprocess.h"

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

llava_fast::ImageView image_view(const py::buffer_info& info, size_t index, int shortest_edge) {
  const std::string where = "image " + std::to_string(index) + ": ";
  if (info.itemsize != 1 || (info.format != "B" && info.format != "=B" && info.format != "<B" && info.format != "|B"))
    throw py::value_error(where + "expected dtype uint8, got buffer format '" + info.format + "'");
  if (info.ndim != 3 || info.shape[2] != 3)
    throw py::value_error(where + "expected shape (H, W, 3) RGB, got " + shape_string(info));
  if (info.shape[0] <= 0 || info.shape[1] <= 0) throw py::value_error(where + "zero-size image " + shape_string(info));
  if (!is_c_contiguous(info)) throw py::value_error(where + "array is not C-contiguous (use np.ascontiguousarray)");
  if (info.shape[0] > INT_MAX / 3 || info.shape[1] > INT_MAX / 3)
    throw py::value_error(where + "image too large " + shape_string(info));
  const int64_t h = info.shape[0], w = info.shape[1];
  const int64_t long_side = shortest_edge * std::max(h, w) / std::min(h, w);
  if (shortest_edge > 0 && long_side > INT_MAX / 4)
    throw py::value_error(where + "aspect ratio too extreme: the resized long side would be " + std::to_string(long_side));
  return {static_cast<const uint8_t*>(info.ptr), int(h), int(w)};
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
  std::vector<llava_fast::ImageView> views;
  held.reserve(py::len(images));
  for (size_t i = 0; i < py::len(images); ++i) {
    py::handle item = images[i];
    if (!PyObject_CheckBuffer(item.ptr()))
      throw py::value_error("image " + std::to_string(i) + ": expected a uint8 (H, W, 3) array, got " +
                            std::string(py::str(py::type::handle_of(item).attr("__name__"))));
    held.push_back(py::reinterpret_borrow<py::buffer>(item).request());
    views.push_back(image_view(held.back(), i, shortest_edge));
  }
  py::gil_scoped_release no_gil;
  llava_fast::preprocess_batch(views, out_info.ptr, params, threads < 1 ? 1 : threads);
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
  std::vector<std::string> simd;
#ifdef __SSE4_1__
  simd.push_back("sse4.1");
#endif
#ifdef __AVX2__
  simd.push_back("avx2");
#endif
#ifdef __AVX512F__
  simd.push_back("avx512f");
#endif
#ifdef __ARM_NEON
  simd.push_back("neon");
#endif
  info["simd"] = simd;
  info["kernels"] = llava_fast::kernel_isa();  // runtime-dispatched: "avx2" when the CPU has it
  info["threading"] = "std::thread, one per core asked for, GIL released";
  info["hardware_threads"] = std::thread::hardware_concurrency();
  info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                     std::to_string(PYBIND11_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llava-fast native code: image preprocessing (see csrc/preprocess.cpp).";
  m.def("preprocess_into", &preprocess_into, py::arg("images"), py::arg("out"), py::arg("lut"),
        py::arg("shortest_edge"), py::arg("pad_fill") = py::none(), py::arg("pass_order") = llava_fast::kPassOrderPillow13,
        py::arg("threads") = 1,
        "Pad (pad_fill = RGB colour or None), resize the shortest edge (0: no resize) with Pillow's bicubic, "
        "center-crop to out's (H, W) and write lut[c][level] into out (N, 3, H, W). images: C-contiguous "
        "uint8 (H, W, 3) arrays; out and lut: buffers of the same 2- or 4-byte element size. pass_order: 0 "
        "= Pillow <= 12 (horizontal pass first), 1 = Pillow >= 13 (vertical first for tall shrinks).");
  m.def("resized_size", [](int h, int w, int edge) {
    int oh, ow;
    llava_fast::resized_size(h, w, edge, &oh, &ow);
    return py::make_tuple(oh, ow);
  });
  m.def("build_info", &build_info, "How this extension was compiled: compiler, flags, SIMD, threading.");
}
