"""Geometry shared by the Python and the native preprocessing path: the resized size, LLaVA-1.5's
pad-to-square and its colour, and transformers' center crop."""

from __future__ import annotations

import numpy as np

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the resample CLIP's processor uses


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
