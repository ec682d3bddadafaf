"""Images in, pixel tensors out: LLaVA's image preprocessing for the CLIP vision tower.

In: anything a user may hand over (a file path, a PIL image, a numpy uint8 array). Out: (N, 3, S, S) float
pixels, normalised as the checkpoint's image processor does. Tested against transformers' CLIPImageProcessor
(the oracle) and, for the native path, against this package's Python path bit for bit.

    loading.py    any supported input -> PIL RGB, with the errors a user can act on
    geometry.py   the sizes and crops both paths share (resize edge, pad-to-square, center crop)
    clip.py       `ImageProcessor`: CLIP's resize + crop (+ LLaVA-1.5's pad) and its Python reference path
    native.py     the same arithmetic in C++ (llava_fast._C, built from csrc/), across threads
"""

from llava_fast.image.clip import BICUBIC, CLIP_MEAN, CLIP_STD, LLAVA_PROCESSOR_TYPES, ImageProcessor
from llava_fast.image.geometry import center_crop, mean_colour, pad_to_square, resized_size
from llava_fast.image.loading import load_image, rgb_array

__all__ = ["BICUBIC", "CLIP_MEAN", "CLIP_STD", "LLAVA_PROCESSOR_TYPES", "ImageProcessor", "center_crop",
           "load_image", "mean_colour", "pad_to_square", "resized_size", "rgb_array"]
