"""The CLIP vision tower's activation on the native CPU kernels (csrc/vision.cpp), where they run.

In: the tower's MLP activations as llava_fast/model.py holds them on the CPU, float32 or bfloat16, with no
autograd graph recorded. Out: quick_gelu written into its input in place, or False where the native kernel does
not apply (no extension, another device, a grad-recording call, a non-contiguous or fake tensor) and the caller
then runs ops.py's torch path, which is also the reference tests/test_native_vision.py compares it with:
quick_gelu_reference (float32 math rounded once, so within a bfloat16 ulp of it).

Why: tiny-next's 5 tiles x 577 tokens spent ~18% of the tower in quick_gelu as three torch passes (bfloat16,
2 cores, Sapphire Rapids); csrc/vision.cpp's header gives the details.
"""

from __future__ import annotations

import torch

from llava_fast.cpu import gemv

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _usable(x: torch.Tensor) -> bool:
    # A plain tensor only: a subclass (FakeTensor while tracing shapes) has no memory behind data_ptr().
    return (gemv.NATIVE and hasattr(gemv._C, "vision_quick_gelu") and type(x) is torch.Tensor and x.device.type == "cpu"
            and x.dtype in _DTYPES and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def quick_gelu_(x: torch.Tensor) -> bool:
    """x * sigmoid(1.702 x) into x itself (contiguous, on the CPU): True, or False with x untouched."""
    if not _usable(x) or not x.is_contiguous():
        return False
    gemv._C.vision_quick_gelu(x.data_ptr(), x.numel(), _DTYPES[x.dtype], torch.get_num_threads())
    return True
