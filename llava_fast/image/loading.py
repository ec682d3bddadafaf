"""Loading: anything a user may hand over -> a decoded PIL image in mode RGB, or an ImageError naming the
problem (a missing, unreadable, corrupt or truncated file, a zero-size image, an array of the wrong dtype or
shape)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image

from llava_fast.errors import ImageError

# The largest image, width x height, that every entry point reads from a file or bytes (generate, chat, the
# Python API, the pipelines, the trainer's data, the server): 64 Mi pixels = 8192 x 8192, a 201 MB RGB array
# where the tower sees 336 x 336. Checked from the header, before the pixels are decoded. Pillow's own bomb check
# (a warning at 89 M pixels, an error at 179 M) gives way to it, so one limit gives one message everywhere.
DEFAULT_MAX_IMAGE_PIXELS = 64 << 20
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
OVERRIDE_HINT = "--max-image-pixels N on the command line, llava_fast.image.set_max_image_pixels(N) in Python"


def set_max_image_pixels(limit: int) -> None:
    """Set the largest image (width x height) every image file this process reads may have (the CLI's
    --max-image-pixels calls it). Files over the limit raise ImageError before they are decoded."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ImageError(f"the image pixel limit must be a positive integer, got {limit!r}")
    global _max_image_pixels
    _max_image_pixels = limit
    if PIL.Image.MAX_IMAGE_PIXELS is not None and PIL.Image.MAX_IMAGE_PIXELS < limit:
        PIL.Image.MAX_IMAGE_PIXELS = limit  # Pillow's refusal (at twice it) must not undercut a raised limit


def max_image_pixels() -> int:
    """The current limit (DEFAULT_MAX_IMAGE_PIXELS unless set_max_image_pixels changed it)."""
    return _max_image_pixels


def check_image_pixels(width: int, height: int, what: str, limit: int | None = None, hint: bool = True) -> None:
    """ImageError when width x height is over `limit` (default: max_image_pixels()). hint=False leaves out how to
    raise the limit, for a caller who cannot (a server's client)."""
    limit = _max_image_pixels if limit is None else limit
    if width * height > limit:
        raise ImageError(f"{what} has {width}x{height} = {width * height:,} pixels, more than the limit of "
                         f"{limit:,} pixels{_hint(hint)}")


def _hint(hint: bool) -> str:
    return f" (raise it with {OVERRIDE_HINT})" if hint else ""


def open_image(source, what: str, limit: int | None = None, hint: bool = True) -> PIL.Image.Image:
    """A file path or binary stream -> its decoded PIL image (any mode), its size checked against the pixel limit
    (check_image_pixels) from the header, before the pixels are decoded. Raises ImageError naming `what` for an
    image over the limit; Pillow's own errors (unreadable, corrupt, truncated) are the caller's to word."""
    limit = _max_image_pixels if limit is None else limit
    with warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) from its own threshold (89 M pixels) and refuses at twice it;
        # our limit, checked next, decides, so its warning is not shown and its refusal gets our message. (The
        # filter is process-wide while it lasts: a thread opening an image then may miss a warning, never an error.)
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            opened = PIL.Image.open(source)
        except PIL.Image.DecompressionBombError:
            pillow = 2 * PIL.Image.MAX_IMAGE_PIXELS
            raise ImageError(f"{what} has more than {pillow:,} pixels, more than the limit of "
                             f"{min(limit, pillow):,} pixels{_hint(hint)}") from None
    try:
        check_image_pixels(opened.width, opened.height, what, limit, hint)
        opened.load()  # decode now, so a truncated or corrupt file fails here and not mid-batch
    except BaseException:
        opened.close()
        raise
    return opened


def load_image(image, max_pixels: int | None = None) -> PIL.Image.Image:
    """Return `image` as a decoded PIL image in mode RGB.

    Accepts a file path (str or Path), a PIL image of any mode, or a numpy uint8 array of shape (H, W),
    (H, W, 1), (H, W, 3) or (H, W, 4). Transparency is composited onto white, as transformers'
    convert_to_rgb does: with PIL's alpha_composite for PIL images and with its float64 formula for
    RGBA arrays (the two differ by one level on some pixels). Note that LLaVA's own training code calls
    `Image.open(path).convert("RGB")`, which drops alpha instead; for files with alpha this function follows
    transformers. No EXIF rotation is applied (neither LLaVA nor CLIPImageProcessor applies one).

    Raises ImageError naming the problem (and the path) for a missing, unreadable, corrupt or truncated
    file, a file whose image is over the pixel limit, a zero-size image, or an array of the wrong dtype or
    shape. The limit (max_pixels, default max_image_pixels()) guards decoding: it applies to files, checked
    from their header; a PIL image or array handed over is decoded already.
    """
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        # Path() made "" the current directory ("image path is not a file: .") and "http://host/a.jpg" a missing
        # file "http:/host/a.jpg".
        if isinstance(name, str) and name.lower().startswith(("http://", "https://")):
            raise ImageError(f"image {name[:100]} is a URL: llava-fast reads image files and fetches nothing from the "
                             "network; download it and give the file")
        if not name:
            raise ImageError("the image path is empty")
        return _to_rgb(_open_image_file(Path(image), max_pixels))
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


def _open_image_file(path: Path, max_pixels: int | None) -> PIL.Image.Image:
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    try:
        with open_image(path, f"image file {path}", max_pixels) as opened:
            image = opened  # leaving the block closes the file and keeps the decoded pixels
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        if isinstance(err, ImageError):
            raise
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
