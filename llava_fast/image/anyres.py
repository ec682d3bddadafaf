"""AnyRes (LLaVA-NeXT / LLaVA-1.6): one image of any size -> a base tile plus a grid of tower-sized tiles.

Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge". The steps, as the original's
`process_anyres_image` (llava/mm_utils.py) and transformers' `LlavaNextImageProcessor` (PIL backend) do them:

    best resolution   among `image_grid_pinpoints` (height, width), the one that keeps the most of the image's
                      pixels once it is scaled to fit, then the one that wastes the fewest (first wins ties)
    resize + pad      scale to fit it (the fitted side exactly, the other ceil'd), bicubic; centre on black
    tiles             cut into S x S tiles, row-major (S = the tower's 336 px): rows x cols of them
    base tile         the whole image resized to S x S (aspect ratio not kept), in front of the tiles
    per tile          CLIP's steps (resize shortest edge, center crop: no-ops for an S x S tile), normalise

The model (model.py) arranges the tiles' features back into the (rows * P, cols * P) grid (P patches per tile
side), cuts off the rows or columns that only saw padding (`unpadded_window`), and appends a learned newline
after each remaining row. `num_image_tokens` counts the result, so prompts get one <image> position per feature.

Image sizes are (height, width) throughout, as transformers has them; the original's are (width, height),
and its pinpoints too, which its config reader swaps (checkpoints/config.py).

`AnyResProcessor(backend=...)` picks the path as `ImageProcessor` does: "python" is `image_tiles` below (Pillow +
numpy), the reference; "native" (and "auto" where the extension is built) makes one call to llava_fast._C per
batch: per image, the base tile's resize and the canvas's resize, placed, padded and normalised straight into
the tiles (native.py). Both give the same bits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from llava_fast.checkpoints.config import read_json
from llava_fast.errors import CheckpointError, ImageError
from llava_fast.image import native
from llava_fast.image.clip import _BACKENDS, BICUBIC, ImageProcessor, _settings_from_config
from llava_fast.image.loading import load_image

# transformers' LlavaNextImageProcessor names; their preprocessing is this file's.
LLAVA_NEXT_PROCESSOR_TYPES = {"LlavaNextImageProcessor", "LlavaNextImageProcessorPil", "LlavaNextImageProcessorFast"}
# LLaVA-1.6's pinpoints (height, width) as its checkpoints and transformers' processor default carry them.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


# ------------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------------


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) among `pinpoints` that shows most of the image once scaled to fit (its effective
    pixels, at most the image's own), ties broken by the fewest wasted pixels, then by list order."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(height, width) of the image scaled to fit the target: the side with the smaller scale becomes the
    target's, the other is ceil'd and capped (a 1000x700 image into 672x1008 -> 672x960)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def grid_shape(height: int, width: int, pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of this size."""
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    return best_h // tile_size, best_w // tile_size


def num_tiles(height: int, width: int, pinpoints, tile_size: int) -> int:
    """Tiles the tower runs for one image: the grid's plus the base tile."""
    rows, cols = grid_shape(height, width, pinpoints, tile_size)
    return rows * cols + 1


def unpadded_window(height: int, width: int, grid_height: int, grid_width: int, exact: bool = True):
    """The (top, bottom, left, right) window of a (grid_height, grid_width) feature grid that covers the image
    and not the black padding around it. The image filled the grid along its tighter side; along the other,
    (grid - scaled) // 2 rows or columns are dropped on each side.

    exact: round the scaled size to 7 decimals before truncating, as transformers does (so 0.9999999 counts
    as 1); False: truncate directly, as the original's unpad_image does. They differ when the float product
    falls just under an integer."""
    if width / height > grid_width / grid_height:
        scaled = height * (grid_width / width)
        scaled = int(round(scaled, 7)) if exact else int(scaled)
        pad = (grid_height - scaled) // 2
        return pad, grid_height - pad, 0, grid_width
    scaled = width * (grid_height / height)
    scaled = int(round(scaled, 7)) if exact else int(scaled)
    pad = (grid_width - scaled) // 2
    return 0, grid_height, pad, grid_width - pad


def num_image_tokens(height: int, width: int, pinpoints, tile_size: int, patches_per_side: int,
                     base_tokens: int, exact: bool = True) -> int:
    """Image positions one image fills in the prompt (mm_patch_merge_type spatial_unpad): the base tile's
    `base_tokens` features, then the unpadded grid with one newline per row. A 672x672 image: 576 + 48 x 49 =
    2,928 (with CLIP's 24 x 24 patches per 336-px tile)."""
    rows, cols = grid_shape(height, width, pinpoints, tile_size)
    top, bottom, left, right = unpadded_window(height, width, rows * patches_per_side, cols * patches_per_side,
                                               exact)
    return base_tokens + (bottom - top) * (right - left + 1)


@functools.lru_cache(maxsize=64)
def _feature_order(height: int, width: int, pinpoints: tuple, tile_size: int, patches_per_side: int,
                   exact: bool) -> tuple[torch.Tensor, int, int]:
    P = patches_per_side
    rows, cols = grid_shape(height, width, pinpoints, tile_size)
    top, bottom, left, right = unpadded_window(height, width, rows * P, cols * P, exact)
    r = torch.arange(top, bottom).unsqueeze(1)  # (H', 1) grid rows kept
    c = torch.arange(left, right).unsqueeze(0)  # (1, W') grid columns kept
    tile = 1 + (r // P) * cols + c // P  # (H', W'): the grid's tiles follow the base tile, row-major
    grid = tile * P * P + (r % P) * P + c % P  # (H', W') feature rows
    grid = torch.cat([grid, grid.new_zeros(grid.shape[0], 1)], dim=1)  # newline slots (filled by the caller)
    return torch.cat([torch.arange(P * P), grid.reshape(-1)]), bottom - top, right - left


def feature_order(height: int, width: int, pinpoints, tile_size: int, patches_per_side: int,
                  exact: bool = True) -> tuple[torch.Tensor, int, int]:
    """One image's prompt positions as rows of its (tiles * P * P, C) tile features (mm_patch_merge_type
    spatial_unpad): (index, H', W'), index (num_image_tokens,) long, the base tile's P * P rows, then the
    (rows * P, cols * P) grid's unpadded window row by row, each row's W' features followed by a newline slot
    (index 0 there; the caller writes image_newline into those H' positions). One gather then arranges, unpads
    and splices the grid instead of a permuted copy, a slice and three concatenations. Cached per geometry; do
    not modify the tensor."""
    return _feature_order(int(height), int(width), tuple(tuple(p) for p in pinpoints), tile_size, patches_per_side,
                          bool(exact))


# ------------------------------------------------------------------------------------------------------
# Pixels
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnyResProcessor:
    """LlavaNextImageProcessor: `processor(images)` -> (pixel_values (sum of tiles, 3, S, S), image_sizes (N, 2)
    long (height, width)); image i's tiles are its base tile then its grid, row-major, and come before image
    i + 1's. `tile` holds CLIP's per-tile settings (S = its crop size); `backend` as ImageProcessor's (the
    tile's own is not used)."""

    tile: ImageProcessor
    grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS
    backend: str = field(default="auto", compare=False)

    def __post_init__(self):
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.grid_pinpoints)
        size = self.tile_size
        if not pinpoints or any(len(p) != 2 or min(p) < size or p[0] % size or p[1] % size for p in pinpoints):
            raise ValueError(f"image_grid_pinpoints must be (height, width) pairs, multiples of the {size}-px tile, "
                             f"got {self.grid_pinpoints}")
        object.__setattr__(self, "grid_pinpoints", pinpoints)
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    @classmethod
    def clip(cls, image_size: int = 336, grid_pinpoints=LLAVA_NEXT_PINPOINTS, backend: str = "auto") -> AnyResProcessor:
        return cls(ImageProcessor.clip(image_size=image_size, backend="python"), grid_pinpoints, backend)

    @classmethod
    def from_pretrained(cls, path, grid_pinpoints=None) -> AnyResProcessor:
        """Read `<path>/preprocessor_config.json`: a LlavaNextImageProcessor config (its image_grid_pinpoints,
        unless `grid_pinpoints` is given, as an original checkpoint's config.json gives them) or a CLIP one
        (which then needs `grid_pinpoints`)."""
        path = Path(path)
        config_file = path if path.is_file() else path / "preprocessor_config.json"
        config = read_json(config_file)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        try:
            tile = ImageProcessor(**_settings_from_config(config), backend="python")
            pinpoints = grid_pinpoints or config.get("image_grid_pinpoints")
            if pinpoints is None:
                raise ValueError("no image_grid_pinpoints")
            return cls(tile, tuple(tuple(p) for p in pinpoints))
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{config_file}: malformed LLaVA-NeXT preprocessor config: {err}") from err

    @property
    def tile_size(self) -> int:
        return self.tile.crop_size[0] if self.tile.do_center_crop else self.tile.shortest_edge

    def with_backend(self, backend: str) -> AnyResProcessor:
        return AnyResProcessor(self.tile, self.grid_pinpoints, backend)

    @property
    def active_backend(self) -> str:
        """"native" or "python": the path __call__ takes with these settings on this install."""
        return "native" if self._use_native() else "python"

    def _native_unsupported_reason(self) -> str | None:
        """The native path resizes with bicubic only, and writes S x S tiles as they are: the per-tile resize
        and crop must be no-ops (shortest_edge = S, a square S crop), as in every LLaVA-NeXT config."""
        tile, size = self.tile, self.tile_size
        if tile.resample != BICUBIC:
            return f"resample={tile.resample} (the native path implements bicubic, 3, only)"
        if tile.shortest_edge != size or (tile.do_center_crop and tile.crop_size != (size, size)):
            return (f"shortest_edge={tile.shortest_edge} with crop_size={tile.crop_size} (the native AnyRes path "
                    "needs both equal to the tile size)")
        return None

    def _use_native(self) -> bool:
        if self.backend == "python":
            return False
        reason = self._native_unsupported_reason()
        if reason is not None:
            if self.backend == "native":
                raise RuntimeError(f"backend='native' asked for, but {reason}")
            return False
        return self.tile.with_backend(self.backend)._use_native()  # the extension itself, LLAVA_FAST_NATIVE

    def __call__(self, images, *, dtype: torch.dtype = torch.float32, device=None):
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ImageError("no images given")
        if self._use_native():
            pixel_values, sizes = self._native_tiles(images, dtype, device)
        else:
            tiles, sizes = [], []
            for image in images:
                rgb = np.asarray(load_image(image))  # (H, W, 3) uint8
                tiles.append(self.image_tiles(rgb))
                sizes.append(rgb.shape[:2])
            pixel_values = torch.cat(tiles).to(dtype)
        image_sizes = torch.tensor(sizes, dtype=torch.long)
        if device is not None:
            pixel_values, image_sizes = pixel_values.to(device), image_sizes.to(device)
        return pixel_values, image_sizes

    def image_tiles(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1 + rows * cols, 3, S, S) float32: the base tile, then the grid row-major."""
        height, width = rgb.shape[:2]
        S = self.tile_size
        best_h, best_w = select_best_resolution(height, width, self.grid_pinpoints)
        new_h, new_w = fitted_size(height, width, best_h, best_w)
        canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)  # black padding, before normalisation
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = _resize(rgb, new_h, new_w, self.tile.resample)
        grid = [canvas[i : i + S, j : j + S] for i in range(0, best_h, S) for j in range(0, best_w, S)]
        edge = self.tile.shortest_edge
        base = _resize(rgb, edge, edge, self.tile.resample)
        return torch.stack([self.tile.preprocess_python(t) for t in [base] + grid])

    def _native_tiles(self, images, dtype: torch.dtype, device):
        """image_tiles' result for every image in one native call: per image two placements, the base tile
        (the image resized to S x S) and the canvas (resized to fit, centred, written as its S x S tiles)."""
        arrays = [native.native_input(image) for image in images]
        S = self.tile_size
        tile_elements = 3 * S * S
        placements, sizes, tiles = [], [], 0
        for i, array in enumerate(arrays):
            height, width = native.input_size(array)
            best_h, best_w = select_best_resolution(height, width, self.grid_pinpoints)
            new_h, new_w = fitted_size(height, width, best_h, best_w)
            placements.append((i, S, S, 0, 0, S, S, S, S, tiles * tile_elements))
            placements.append((i, new_h, new_w, (best_h - new_h) // 2, (best_w - new_w) // 2, best_h, best_w, S, S,
                               (tiles + 1) * tile_elements))
            tiles += 1 + (best_h // S) * (best_w // S)
            sizes.append((height, width))
        return native.preprocess_tiles(self.tile, arrays, placements, (tiles, 3, S, S), dtype, device), sizes


def _resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(PIL.Image.fromarray(rgb).resize((width, height), resample=resample))
