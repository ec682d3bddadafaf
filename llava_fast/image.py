"""LLaVA's image preprocessing: decoded image -> (N, 3, S, S) normalised pixels for the CLIP vision tower.

The steps are those of transformers' CLIPImageProcessor (the PIL backend, `CLIPImageProcessorPil` in
transformers 5.x, where the default `CLIPImageProcessor` resizes with torchvision's antialiased bicubic,
which is not bit-identical to PIL's; without torchvision it falls back to the PIL one), with LLaVA-1.5's
optional pad-to-square in front:

    load_image      any supported input -> PIL RGB (alpha composited onto white, as transformers does)
    pad to square   image_aspect_ratio="pad": centre it on a square canvas of the mean colour
    resize          shortest edge -> `shortest_edge`, long edge int(edge * long / short), PIL bicubic
    center crop     (H - h) // 2 from the top, (W - w) // 2 from the left; zeros where the image is smaller
    rescale         uint8 * rescale_factor in float64, rounded to float32
    normalise       (x - mean) / std in float32

This file is the reference path and the oracle of the native one (`llava_fast._C`, built from csrc/), which
does the same arithmetic in C++ across threads; `ImageProcessor(backend=...)` picks between them.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from llava_fast.config import read_json
from llava_fast.errors import CheckpointError, ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

# image_processor_type values whose preprocessing is the one implemented here: CLIP's, and transformers'
# LlavaImageProcessor (CLIP's steps with LLaVA-1.5's pad-to-square in front when its `do_pad` is true). LLaVA-NeXT's
# "anyres" tiling (LlavaNextImageProcessor) and SigLIP's square resize are different pipelines.
_CLIP_PROCESSOR_TYPES = {"CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast"}
LLAVA_PROCESSOR_TYPES = {"LlavaImageProcessor", "LlavaImageProcessorPil", "LlavaImageProcessorFast"}
_BACKENDS = ("auto", "native", "python")


# ------------------------------------------------------------------------------------------------------
# Loading: anything a user may hand us -> PIL RGB
# ------------------------------------------------------------------------------------------------------


def load_image(image) -> PIL.Image.Image:
    """Return `image` as a decoded PIL image in mode RGB.

    Accepts a file path (str or Path), a PIL image of any mode, or a numpy uint8 array of shape (H, W),
    (H, W, 1), (H, W, 3) or (H, W, 4). Transparency is composited onto white, as transformers'
    convert_to_rgb does: with PIL's alpha_composite for PIL images and with its float64 formula for
    RGBA arrays (the two differ by one level on some pixels). Note that LLaVA's own training code calls
    `Image.open(path).convert("RGB")`, which drops alpha instead; for files with alpha this function follows
    transformers. No EXIF rotation is applied (neither LLaVA nor CLIPImageProcessor applies one).

    Raises ImageError naming the problem (and the path) for a missing, unreadable, corrupt or truncated
    file, a zero-size image, or an array of the wrong dtype or shape.
    """
    if isinstance(image, (str, os.PathLike)):
        return _to_rgb(_open_image_file(Path(image)))
    if isinstance(image, PIL.Image.Image):
        _check_nonempty(image.width, image.height, "PIL image")
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        return PIL.Image.fromarray(rgb_array(image))
    raise ImageError(
        f"unsupported image type {type(image).__name__}: pass a file path, a PIL image or a numpy uint8 "
        "array of shape (H, W) or (H, W, C) with C in 1, 3, 4"
    )


def rgb_array(array: np.ndarray) -> np.ndarray:
    """Check a numpy image and return it as a C-contiguous (H, W, 3) uint8 array (no copy when it is one)."""
    if array.dtype != np.uint8:
        raise ImageError(f"image array must have dtype uint8 (0..255), got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"image array must have shape (H, W) or (H, W, C) with C in 1, 3, 4 (channels last), got "
            f"shape {tuple(array.shape)}"
        )
    _check_nonempty(array.shape[1], array.shape[0], "image array")
    channels = array.shape[2]
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        # transformers' formula for arrays: alpha-weighted blend onto white in float64, rounded half-even.
        alpha = array[:, :, 3:4] / 255.0
        array = np.round(alpha * array[:, :, :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(array)


def _open_image_file(path: Path) -> PIL.Image.Image:
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()  # decode now, so a truncated or corrupt file fails here and not mid-batch
            image = opened
    except PIL.Image.DecompressionBombError as err:
        raise ImageError(f"image file {path} is too large to decode safely: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ImageError(f"cannot decode image file {path}: {err}") from err
    _check_nonempty(image.width, image.height, f"image file {path}")
    return image


def _check_nonempty(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size ({width}x{height} pixels)")


def _has_alpha(image: PIL.Image.Image) -> bool:
    # "A" as a band name means alpha in every mode except LAB, where it is the a* colour axis.
    return (image.mode != "LAB" and "A" in image.getbands()) or "transparency" in image.info


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    try:
        if _has_alpha(image):
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot convert a PIL image of mode {image.mode} to RGB: {err}") from err


# ------------------------------------------------------------------------------------------------------
# Geometry shared by the Python and the native path
# ------------------------------------------------------------------------------------------------------


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `shortest_edge`; the long side is truncated,
    int(edge * long / short), as transformers computes it (float64 division, so 1x1000 -> 336x336000)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def mean_colour(image_mean) -> tuple[int, int, int]:
    """LLaVA-1.5's padding colour: the normalisation mean in 0..255, truncated ((122, 116, 104) for CLIP)."""
    return tuple(int(m * 255) for m in image_mean)


def pad_to_square(rgb: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """Centre an (H, W, 3) image on a square canvas of colour `fill`; the shorter side gets
    (long - short) // 2 pixels before it, as LLaVA-1.5's expand2square places it."""
    height, width, _ = rgb.shape
    edge = max(height, width)
    if height == width:
        return rgb
    canvas = np.empty((edge, edge, 3), dtype=np.uint8)
    canvas[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (edge - height) // 2, (edge - width) // 2
    canvas[top : top + height, left : left + width] = rgb
    return canvas


def center_crop(rgb: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Crop (H, W, C) to (crop_height, crop_width) around the centre, starting at (H - h) // 2; where the
    image is smaller than the crop, that floor offset is negative and the uncovered pixels are 0, exactly
    transformers' center_crop (its pad-then-crop reduces to this one offset)."""
    height, width, channels = rgb.shape
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return rgb[top : top + crop_height, left : left + crop_width]
    out = np.zeros((crop_height, crop_width, channels), dtype=rgb.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    dst_top, dst_left = src_top - top, src_left - left
    rows = min(height - src_top, crop_height - dst_top)
    cols = min(width - src_left, crop_width - dst_left)
    out[dst_top : dst_top + rows, dst_left : dst_left + cols] = rgb[
        src_top : src_top + rows, src_left : src_left + cols
    ]
    return out


# ------------------------------------------------------------------------------------------------------
# The processor
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageProcessor:
    """CLIPImageProcessor's settings (its defaults: CLIP ViT-B/L 224) plus LLaVA-1.5's pad-to-square.

    `processor(images)` returns a float tensor of shape (N, 3, crop_height, crop_width).
    `backend`: "python" is this file's reference path; "native" the C++ extension llava_fast._C (an
    error if it is not built); "auto" (default) uses native when it is built and the resample is bicubic
    (everything else it implements), else Python, warning once if the extension is missing. The
    environment variable LLAVA_FAST_NATIVE=0 makes "auto" mean Python. Both give identical values.
    """

    do_resize: bool = True
    shortest_edge: int = 224
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True  # kept for configs; images always become RGB (the tower takes 3 channels)
    image_aspect_ratio: str | None = None  # None, or "pad" for LLaVA-1.5's expand-to-square
    backend: str = field(default="auto", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "crop_size", tuple(int(s) for s in self.crop_size))
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if self.shortest_edge < 1 or len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"sizes must be positive: shortest_edge={self.shortest_edge}, crop_size={self.crop_size}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ValueError(
                f"image_mean and image_std need 3 values, std nonzero: {self.image_mean}, {self.image_std}"
            )
        if self.image_aspect_ratio not in (None, "pad"):
            raise ValueError(f"image_aspect_ratio must be None or 'pad', got {self.image_aspect_ratio!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def clip(cls, image_size: int = 336, pad: bool = False, **overrides) -> "ImageProcessor":
        """OpenAI CLIP's preprocessing at `image_size` (336 for LLaVA-1.5's ViT-L/14-336, 224 for LLaVA-1's
        ViT-L/14); pad=True adds LLaVA-1.5's pad-to-square (the original checkpoints' image_aspect_ratio)."""
        settings = dict(
            shortest_edge=image_size,
            crop_size=(image_size, image_size),
            image_aspect_ratio="pad" if pad else None,
        )
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def from_pretrained(cls, path, image_aspect_ratio="from_config", backend: str = "auto") -> "ImageProcessor":
        """Read `<path>/preprocessor_config.json` (a CLIPImageProcessor config, e.g. llava-hf's, or a
        LlavaImageProcessor one).

        image_aspect_ratio: "from_config" (default) takes it from preprocessor_config.json (LlavaImageProcessor's
        `do_pad`, which transformers honours, or an `image_aspect_ratio` key, which llava-fast wrote before and
        transformers ignores) or, failing both, from a config.json beside it (original LLaVA checkpoints say
        "pad" there); or pass None/"pad".
        Raises CheckpointError for a missing, unreadable or malformed config.
        """
        path = Path(path)
        config_file = path if path.is_file() else path / "preprocessor_config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"no preprocessor config at {config_file}; original LLaVA checkpoints ship none (their vision "
                "tower is openai/clip-vit-large-patch14-336): use ImageProcessor.clip(336, pad=True)"
            )
        config = read_json(config_file)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        kind = config.get("image_processor_type", "CLIPImageProcessor")
        if kind not in _CLIP_PROCESSOR_TYPES | LLAVA_PROCESSOR_TYPES:
            raise CheckpointError(
                f"{config_file}: image_processor_type {kind!r} is not supported (only CLIP's resize + crop, "
                f"with LLaVA's optional padding: {sorted(_CLIP_PROCESSOR_TYPES | LLAVA_PROCESSOR_TYPES)})"
            )
        do_pad = config.get("do_pad") if kind in LLAVA_PROCESSOR_TYPES else None
        if do_pad is not None and not isinstance(do_pad, bool):
            raise CheckpointError(f"{config_file}: do_pad must be true or false, got {do_pad!r}")
        if image_aspect_ratio == "from_config":
            image_aspect_ratio = config.get("image_aspect_ratio") if do_pad is None else ("pad" if do_pad else None)
            model_config = config_file.parent / "config.json"
            if image_aspect_ratio is None and model_config.is_file():
                model = read_json(model_config)
                image_aspect_ratio = model.get("image_aspect_ratio") if isinstance(model, dict) else None
            if image_aspect_ratio in ("square", "original"):  # LLaVA's names for "no padding"
                image_aspect_ratio = None
        try:
            settings = _settings_from_config(config)
            return cls(**settings, image_aspect_ratio=image_aspect_ratio, backend=backend)
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{config_file}: malformed preprocessor config: {err}") from err

    @property
    def image_size(self) -> int:
        """Edge of the square images this processor produces (the vision tower's input resolution)."""
        height, width = self.crop_size if self.do_center_crop else (self.shortest_edge, self.shortest_edge)
        if height != width:
            raise ValueError(f"crop_size {self.crop_size} is not square; read crop_size instead")
        return height

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        return mean_colour(self.image_mean)

    def with_backend(self, backend: str) -> "ImageProcessor":
        return replace(self, backend=backend)

    @property
    def active_backend(self) -> str:
        """"native" or "python": the path __call__ takes with these settings on this install."""
        return "native" if self._use_native() else "python"

    # --- processing ---------------------------------------------------------------------------------

    def __call__(self, images, *, dtype: torch.dtype = torch.float32, device=None, out=None) -> torch.Tensor:
        """images: one image or a list of them (anything load_image accepts) -> (N, 3, H, W) tensor.

        out: an optional preallocated (N, 3, H, W) tensor to write into (e.g. pinned memory reused across
        batches); it is returned. Otherwise the result is allocated, in pinned memory when `device` is a
        CUDA device so the copy can overlap (non_blocking).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ImageError("no images given")
        if out is not None and device is not None and torch.device(device).type != out.device.type:
            raise ValueError(f"out is on {out.device} but device={device} was asked for")
        if self._use_native():
            pixels = _preprocess_native(self, images, dtype, out, device)
        else:
            pixels = torch.stack([self.preprocess_python(image) for image in images]).to(dtype)
        if out is not None:
            if pixels is not out:
                _check_out(out, pixels.shape, dtype)
                out.copy_(pixels)
            return out
        if device is None or torch.device(device).type == "cpu":
            return pixels
        return pixels.to(device, non_blocking=pixels.is_pinned())

    def preprocess_python(self, image) -> torch.Tensor:
        """The reference path for one image -> (3, H, W) float32."""
        rgb = np.asarray(load_image(image))  # (H, W, 3) uint8
        if self.image_aspect_ratio == "pad":
            rgb = pad_to_square(rgb, self.pad_colour)
        if self.do_resize:
            height, width = resized_size(rgb.shape[0], rgb.shape[1], self.shortest_edge)
            if (height, width) != rgb.shape[:2]:
                resized = PIL.Image.fromarray(rgb).resize((width, height), resample=self.resample)
                rgb = np.asarray(resized)
        if self.do_center_crop:
            rgb = center_crop(rgb, *self.crop_size)
        pixels = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))  # (3, H, W) uint8, contiguous
        # (contiguous matters: torch's elementwise ops on the permuted view ran 30x slower, 33 ms vs 1 ms)
        return self.rescale_and_normalize(pixels)

    def rescale_and_normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, ...) uint8 -> float32: x * rescale_factor in float64 rounded to float32, as transformers'
        rescale does, then (x - mean) / std in float32, as its normalize does."""
        if self.do_rescale:
            pixels = (pixels.double() * self.rescale_factor).float()
        else:
            pixels = pixels.float()
        if self.do_normalize:
            shape = (3,) + (1,) * (pixels.dim() - 1)
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(shape)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(shape)
            pixels = (pixels - mean) / std
        return pixels

    def _use_native(self) -> bool:
        if self.backend == "python":
            return False
        reason = _native_unsupported(self)
        if self.backend == "native":
            if reason is not None:
                raise RuntimeError(f"backend='native' asked for, but {reason}")
            return True
        if reason is not None and reason == _native_state.get("reason"):  # the extension, not the settings
            warn_once(f"{reason}; image preprocessing uses the slower Python path. To build it, install "
                      "with a C++17 compiler present: pip install -e .")
        return reason is None


def _settings_from_config(config: dict) -> dict:
    """CLIPImageProcessor's config keys -> ImageProcessor fields; missing keys take CLIPImageProcessor's
    defaults, as transformers does. Sizes may be ints (older configs) or dicts."""
    settings = {}
    size = config.get("size", {"shortest_edge": ImageProcessor.shortest_edge})
    if isinstance(size, dict):
        if set(size) != {"shortest_edge"}:
            raise ValueError(f"size must be {{'shortest_edge': N}}, got {size}")
        size = size["shortest_edge"]
    settings["shortest_edge"] = _positive_int(size, "size")
    crop = config.get("crop_size", {"height": ImageProcessor.crop_size[0], "width": ImageProcessor.crop_size[1]})
    if isinstance(crop, dict):
        crop = (crop["height"], crop["width"])
    elif not isinstance(crop, (list, tuple)):
        crop = (crop, crop)
    settings["crop_size"] = tuple(_positive_int(c, "crop_size") for c in crop)
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
        if key in config:
            if not isinstance(config[key], bool):
                raise ValueError(f"{key} must be true or false, got {config[key]!r}")
            settings[key] = config[key]
    if "resample" in config:
        settings["resample"] = _positive_int(config["resample"], "resample", minimum=0)
    if "rescale_factor" in config:
        settings["rescale_factor"] = float(config["rescale_factor"])
    for key in ("image_mean", "image_std"):
        if key in config:
            values = config[key]
            values = [values] * 3 if isinstance(values, (int, float)) else values
            if not isinstance(values, list) or len(values) != 3:
                raise ValueError(f"{key} must be a number or a list of 3 numbers, got {config[key]!r}")
            settings[key] = tuple(float(v) for v in values)
    return settings


def _positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------------
# The native path (llava_fast._C, built from csrc/)
# ------------------------------------------------------------------------------------------------------

_native_state: dict = {}  # filled on first use: module (or None), reason, pass_order
_OUTPUT_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


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


def _native_unsupported(processor: ImageProcessor) -> str | None:
    """Why the native path cannot run these settings here, or None if it can."""
    if processor.backend == "auto" and os.environ.get("LLAVA_FAST_NATIVE", "1") == "0":
        return "LLAVA_FAST_NATIVE=0"
    if processor.do_resize and processor.resample != BICUBIC:
        return f"resample={processor.resample} (the native path implements bicubic, 3, only)"
    if _native_module() is None:
        return _native_state["reason"]
    return None


def _native_input(image):
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


def _input_size(item) -> tuple[int, int]:
    return (item[2], item[3]) if isinstance(item, tuple) else item.shape[:2]


def _empty_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, backed by 2 MiB pages when large: the first write to a fresh 43 MB batch
    (32 x 3 x 336 x 336 float32) page-faults 10,000 4 KiB pages, 10 ms on the 2-core VM, a third of the
    native batch time; transparent huge pages (where the kernel allows them on request) halve that."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < (8 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # the tensor keeps `memory` alive


def _check_out(out: torch.Tensor, shape, dtype: torch.dtype) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)}")


def _preprocess_native(processor: ImageProcessor, images, dtype: torch.dtype, out, device) -> torch.Tensor:
    native = _native_module()
    arrays = [_native_input(image) for image in images]
    sizes = []
    for array in arrays:
        height, width = _input_size(array)
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
    compute_dtype = dtype if dtype in _OUTPUT_BITS else torch.float32
    shape = (len(arrays), 3, out_height, out_width)
    writes_into_out = (
        out is not None and out.device.type == "cpu" and out.dtype == compute_dtype and out.is_contiguous()
    )
    if writes_into_out:
        _check_out(out, shape, dtype)
        pixels = out
    elif device is not None and torch.device(device).type == "cuda":
        pixels = torch.empty(shape, dtype=compute_dtype, pin_memory=True)  # so the copy can overlap
    else:
        pixels = _empty_cpu(shape, compute_dtype)
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 256)  # (3, 256): every uint8 level per channel
    table = processor.rescale_and_normalize(levels).to(compute_dtype).contiguous()
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


_warned: set = set()


def warn_once(message: str) -> None:
    """A UserWarning the first time this message comes up in the process (not on import)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
