"""The native preprocessing path (llava_fast._C, built from csrc/): the Python path's arithmetic in C++ across
threads, bit for bit (the bicubic filter, Pillow's pass order, the rescale-and-normalise table).

In: an `ImageProcessor` (clip.py) and a list of images. Out: the (N, 3, H, W) pixels, written into a
preallocated tensor where one is given. `preprocess_tiles` is the general form AnyRes (anyres.py) uses: each
image resized and placed in a window written as tiles (csrc/preprocess.h's Placement)."""

from __future__ import annotations

import math
import mmap
import os
import warnings

import numpy as np
import PIL.Image
import torch

from llava_fast.errors import ImageError
from llava_fast.image.geometry import BICUBIC, resized_size
from llava_fast.image.loading import _check_nonempty, load_image, rgb_array

_native_state: dict = {}  # filled on first use: module (or None), reason, pass_order
_OUTPUT_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def extension_missing_reason() -> str | None:
    """Why the extension itself cannot run (not built, or not matching the installed Pillow), or None."""
    _native_module()
    return _native_state.get("reason")


def _native_module():
    """The extension and the resize pass order that matches the installed Pillow, found once."""
    if "module" not in _native_state:
        try:
            from llava_fast import _C
        except ImportError as err:
            _native_state.update(module=None, reason=f"the native extension llava_fast._C is not built ({err})")
            return None
        pass_order = _probe_pass_order(_C)
        if pass_order is None:
            _native_state.update(
                module=None,
                reason=f"llava_fast._C does not reproduce the installed Pillow {PIL.__version__}'s bicubic resize",
            )
        else:
            _native_state.update(module=_C, reason=None, pass_order=pass_order)
    return _native_state["module"]


def _probe_pass_order(native) -> int | None:
    """Which order of Pillow's two resize passes the installed Pillow uses (0: horizontal first, as up to
    Pillow 12; 1: vertical first when the height shrinks by over twice as many pixels as the width, as
    from 13), or None if neither reproduces it. The first two probes are tall shrinks where the orders
    give different bytes, the third shrinks just outside the rule; about 1 ms, once per process."""
    rng = np.random.default_rng(2024)
    probes = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((86, 15, 3), (150, 41, 3), (97, 60, 3))]
    edge = 7
    expected = []
    for probe in probes:
        height, width = resized_size(probe.shape[0], probe.shape[1], edge)
        expected.append(np.asarray(PIL.Image.fromarray(probe).resize((width, height), resample=BICUBIC)))
    levels = np.tile(np.arange(256, dtype=np.int32), (3, 1))
    for pass_order in (1, 0):
        matches = True
        for probe, want in zip(probes, expected):
            got = np.empty((1, 3) + want.shape[:2], dtype=np.int32)
            native.preprocess_into([probe], got, levels, edge, None, pass_order, 1)
            matches &= np.array_equal(got[0].transpose(1, 2, 0), want)
        if matches:
            return pass_order
    return None


def unsupported_reason(processor) -> str | None:
    """Why the native path cannot run these settings here, or None if it can."""
    if processor.backend == "auto" and os.environ.get("LLAVA_FAST_NATIVE", "1") == "0":
        return "LLAVA_FAST_NATIVE=0"
    if processor.do_resize and processor.resample != BICUBIC:
        return f"resample={processor.resample} (the native path implements bicubic, 3, only)"
    if _native_module() is None:
        return _native_state["reason"]
    return None


def native_input(image):
    """Any supported image -> what llava_fast._C reads: a PIL RGB image's own memory through the Arrow C
    data interface (Pillow >= 11.2; no copy, where np.asarray(image) costs 0.5 ms for 640x480 in the
    calling thread), else a C-contiguous (H, W, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        return rgb_array(image)
    if isinstance(image, PIL.Image.Image) and image.mode == "RGB" and "transparency" not in image.info:
        _check_nonempty(image.width, image.height, "PIL image")
        try:  # raises for images Pillow keeps in several memory blocks (over 16 MiB)
            return (*image.__arrow_c_array__(), image.height, image.width)
        except (AttributeError, ValueError):
            return np.asarray(image)
    return np.asarray(load_image(image))


def input_size(item) -> tuple[int, int]:
    return (item[2], item[3]) if isinstance(item, tuple) else item.shape[:2]


def empty_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, backed by 2 MiB pages when large: the first write to a fresh 43 MB batch
    (32 x 3 x 336 x 336 float32) page-faults 10,000 4 KiB pages, 10 ms on the 2-core VM, a third of the
    native batch time; transparent huge pages (where the kernel allows them on request) halve that."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < (8 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # the tensor keeps `memory` alive


def check_out(out: torch.Tensor, shape, dtype: torch.dtype) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)}")


def preprocess(processor, images, dtype: torch.dtype, out, device) -> torch.Tensor:
    native = _native_module()
    arrays = [native_input(image) for image in images]
    sizes = []
    for array in arrays:
        height, width = input_size(array)
        if processor.image_aspect_ratio == "pad":
            height = width = max(height, width)
        if processor.do_resize:
            height, width = resized_size(height, width, processor.shortest_edge)
        sizes.append((height, width))
    if processor.do_center_crop:
        out_height, out_width = processor.crop_size
    elif len(set(sizes)) == 1:
        out_height, out_width = sizes[0]
    else:
        raise ImageError(f"without center crop the images resize to different sizes {sorted(set(sizes))}; "
                         "they cannot form one batch")
    shape = (len(arrays), 3, out_height, out_width)
    pixels, table, compute_dtype = _output_and_table(processor, shape, dtype, out, device)
    bits = _OUTPUT_BITS[compute_dtype]
    try:
        native.preprocess_into(
            arrays,
            pixels.view(bits).numpy(),
            table.view(bits).numpy(),
            processor.shortest_edge if processor.do_resize else 0,
            processor.pad_colour if processor.image_aspect_ratio == "pad" else None,
            _native_state["pass_order"],
            torch.get_num_threads(),
        )
    except ValueError as err:  # arrays are checked above, so this means a bug or an exotic buffer
        raise ImageError(f"native preprocessing rejected the input: {err}") from err
    return pixels if compute_dtype == dtype else pixels.to(dtype)


def preprocess_tiles(processor, arrays, placements, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """arrays: native_input() of each image; placements: (image, resized_height, resized_width, top, left,
    window_height, window_width, tile_height, tile_width, out_offset) tuples, offsets in elements of the
    `shape` output, bicubic resizes (no pad-to-square); `processor` gives the rescale and normalisation."""
    pixels, table, compute_dtype = _output_and_table(processor, shape, dtype, None, device)
    bits = _OUTPUT_BITS[compute_dtype]
    try:
        _native_module().preprocess_tiles_into(arrays, placements, pixels.view(bits).numpy(), table.view(bits).numpy(),
                                               _native_state["pass_order"], torch.get_num_threads())
    except ValueError as err:  # the geometry is computed by the caller, so this means a bug or an exotic buffer
        raise ImageError(f"native preprocessing rejected the input: {err}") from err
    return pixels if compute_dtype == dtype else pixels.to(dtype)


def _output_and_table(processor, shape, dtype: torch.dtype, out, device):
    """The tensor to write (out itself where it can be) and the (3, 256) table of every uint8 level's output
    value, both in the dtype the extension writes (float32, float16 or bfloat16; others are cast after)."""
    compute_dtype = dtype if dtype in _OUTPUT_BITS else torch.float32
    writes_into_out = (
        out is not None and out.device.type == "cpu" and out.dtype == compute_dtype and out.is_contiguous()
    )
    if writes_into_out:
        check_out(out, shape, dtype)
        pixels = out
    elif device is not None and torch.device(device).type == "cuda":
        pixels = torch.empty(shape, dtype=compute_dtype, pin_memory=True)  # so the copy can overlap
    else:
        pixels = empty_cpu(shape, compute_dtype)
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 256)  # (3, 256): every uint8 level per channel
    table = processor.rescale_and_normalize(levels).to(compute_dtype).contiguous()
    return pixels, table, compute_dtype


_warned: set = set()


def warn_once(message: str) -> None:
    """A UserWarning the first time this message comes up in the process (not on import)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
