"""Images in, pixel tensors out: LLaVA's image preprocessing for the CLIP vision tower.

In: anything a user may hand over (a file path, a PIL image, a numpy uint8 array). Out: (N, 3, S, S) float
pixels, normalised as the checkpoint's image processor does. Tested against transformers' CLIPImageProcessor
(the oracle) and, for the native path, against this package's Python path bit for bit.

    loading.py    any supported input -> PIL RGB, with the errors a user can act on; the one pixel limit
    geometry.py   the sizes and crops both paths share (resize edge, pad-to-square, center crop)
    clip.py       `ImageProcessor`: CLIP's resize + crop (+ LLaVA-1.5's pad) and its Python reference path
    native.py     the same arithmetic in C++ (llava_fast._C, built from csrc/), across threads
    anyres.py     LLaVA-NeXT's AnyRes: the base tile plus a grid of tiles per image, and its token count
                  (tested against transformers' LlavaNextImageProcessor and the original's process_anyres_image)
"""

from llava_fast.image.anyres import LLAVA_NEXT_PROCESSOR_TYPES, AnyResProcessor
from llava_fast.image.clip import BICUBIC, CLIP_MEAN, CLIP_STD, LLAVA_PROCESSOR_TYPES, ImageProcessor
from llava_fast.image.geometry import center_crop, mean_colour, pad_to_square, resized_size
from llava_fast.image.loading import (
                                      DEFAULT_MAX_IMAGE_PIXELS,
                                      load_image,
                                      max_image_pixels,
                                      rgb_array,
                                      set_max_image_pixels,
)

__all__ = ["BICUBIC", "CLIP_MEAN", "CLIP_STD", "DEFAULT_MAX_IMAGE_PIXELS", "LLAVA_NEXT_PROCESSOR_TYPES",
           "LLAVA_PROCESSOR_TYPES", "AnyResProcessor", "ImageProcessor", "center_crop", "load_image",
           "max_image_pixels", "mean_colour", "pad_to_square", "resized_size", "rgb_array", "set_max_image_pixels"]
