"""Loading: anything a user may hand over -> a decoded PIL image in mode RGB, or an ImageError naming the
problem (a missing, unreadable, corrupt or truncated file, a zero-size image, an array of the wrong dtype or
shape)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image

from llava_fast.errors import ImageError


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
