"""CPU inference versions of ops whose torch references run as many small ATen ops (csrc/cpu_ops.cpp).

In: the arguments of the op's reference in ops.py. Out: the same results, or None where the native version
does not apply (not on the CPU, no native extension, a dtype other than float32/bfloat16, mixed dtypes), and
ops.py then runs the reference. ops.py calls these from the custom ops' forward on the torch backend; backward
passes still recompute through the references (ops._register_recompute_autograd).

- rms_norm: ops.rms_norm_reference (LLaMA's RMSNorm with the residual add fused in front) in one pass per row
  instead of 8 ATen ops; equal to it up to float32 summation order (tests/test_cpu_ops.py).
"""

from __future__ import annotations

import torch

from llava_fast import gemv

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _rows(t, C):
    t2 = t.reshape(-1, C)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x, weight, eps, residual=None):
    """(normed, hidden) as ops.rms_norm_reference returns them, or None (see the module docstring)."""
    if not (gemv.NATIVE and x.device.type == "cpu" and x.dtype in _DTYPES and weight.dtype == x.dtype
            and weight.dim() == 1 and weight.is_contiguous() and x.dim() >= 1 and x.shape[-1] == weight.shape[0]
            and x.numel() > 0 and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))):
        return None
    C = x.shape[-1]
    x2 = _rows(x, C)
    r2 = None if residual is None else _rows(residual, C)
    normed = torch.empty(x.shape, dtype=x.dtype)
    hidden = x if residual is None else torch.empty(x.shape, dtype=x.dtype)
    gemv._C.rms_norm_rows(x2.data_ptr(), x2.stride(0), 0 if r2 is None else r2.data_ptr(),
                          0 if r2 is None else r2.stride(0), weight.data_ptr(), float(eps), x2.shape[0], C,
                          _DTYPES[x.dtype], normed.data_ptr(), 0 if residual is None else hidden.data_ptr(),
                          torch.get_num_threads())
    return normed, hidden


OPS = {"rms_norm": rms_norm}
