"""The CLIP vision tower's activation and attention on the native CPU kernels (csrc/vision.cpp), where they run.

In: the tower's tensors as llava_fast/model.py holds them on the CPU, float32 or bfloat16, with no autograd graph
recorded. Out: quick_gelu written into its input in place; attention from the fused q/k/v projection's output
read in place. Each function answers None / False where the native kernel does not apply (no extension, another
device, a grad-recording call, a layout it does not read) and the caller then runs ops.py's torch path, which
is also the reference tests/test_native_vision.py compares these with: quick_gelu_reference (float32 math
rounded once, so within a bfloat16 ulp of it) and vision_attention_reference (the decoder's attention kernel:
q and p rounded to bfloat16 on the AMX table, as a bfloat16 SDPA rounds them).

Why: tiny-next's 5 tiles x 577 tokens spent ~18% of the tower in quick_gelu as three torch passes and ~35% in
torch's SDPA (bfloat16, 2 cores, Sapphire Rapids); csrc/vision.cpp's header gives the details.
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


def _fused_qkv(q, k, v):
    """The (N, T, 3, H, D) tensor q, k, v are the unbound views of (ClipAttention with qkv_proj), or None."""
    N, T, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    stride = (T * 3 * H * D, 3 * H * D, D, 1)
    if q.stride() != stride or k.stride() != stride or v.stride() != stride:
        return None
    step = H * D * q.element_size()
    if k.data_ptr() - q.data_ptr() != step or v.data_ptr() - q.data_ptr() != 2 * step:
        return None
    base = q.storage_offset()
    qkv = torch.empty(0, dtype=q.dtype).set_(q.untyped_storage(), base, (N, T, 3, H, D))
    return qkv if qkv.is_contiguous() else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Non-causal attention (N, T, H, D) -> (N, T, H, D) contiguous, for q/k/v that are views of one fused
    projection's output (N, T, 3, H, D); None where the native kernel does not run this call."""
    if not _usable(q) or q.dim() != 4 or q.shape[1] == 0:
        return None
    N, T, H, D = q.shape
    if not gemv._C.vision_attention_supported(D, _DTYPES[q.dtype]):
        return None
    qkv = _fused_qkv(q, k, v)
    if qkv is None:
        return None
    out = torch.empty(N, T, H, D, dtype=q.dtype)
    if not gemv._C.vision_attention(qkv.data_ptr(), N, T, H, D, _DTYPES[q.dtype], out.data_ptr(),
                                    torch.get_num_threads()):
        return None
    return out
