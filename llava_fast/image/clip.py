"""CLIP's image preprocessing (LLaVA v1 and 1.5): decoded image -> (N, 3, S, S) normalised pixels for the CLIP
vision tower.

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

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from llava_fast.checkpoints.config import read_json
from llava_fast.errors import CheckpointError, ImageError
from llava_fast.image import native
from llava_fast.image.geometry import BICUBIC, center_crop, mean_colour, pad_to_square, resized_size
from llava_fast.image.loading import load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# image_processor_type values whose preprocessing is the one implemented here: CLIP's, and transformers'
# LlavaImageProcessor (CLIP's steps with LLaVA-1.5's pad-to-square in front when its `do_pad` is true). LLaVA-NeXT's
# "anyres" tiling (LlavaNextImageProcessor) and SigLIP's square resize are different pipelines.
_CLIP_PROCESSOR_TYPES = {"CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast"}
LLAVA_PROCESSOR_TYPES = {"LlavaImageProcessor", "LlavaImageProcessorPil", "LlavaImageProcessorFast"}
_BACKENDS = ("auto", "native", "python")


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
    def clip(cls, image_size: int = 336, pad: bool = False, **overrides) -> ImageProcessor:
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
    def from_pretrained(cls, path, image_aspect_ratio="from_config", backend: str = "auto") -> ImageProcessor:
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

    def with_backend(self, backend: str) -> ImageProcessor:
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
            pixels = native.preprocess(self, images, dtype, out, device)
        else:
            pixels = torch.stack([self.preprocess_python(image) for image in images]).to(dtype)
        if out is not None:
            if pixels is not out:
                native.check_out(out, pixels.shape, dtype)
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
        reason = native.unsupported_reason(self)
        if self.backend == "native":
            if reason is not None:
                raise RuntimeError(f"backend='native' asked for, but {reason}")
            return True
        if reason is not None and reason == native.extension_missing_reason():  # the extension, not the settings
            native.warn_once(f"{reason}; image preprocessing uses the slower Python path. To build it, install "
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
