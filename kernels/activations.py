"""Elementwise activation kernels: LLaMA's SwiGLU half and CLIP's quick_gelu, forward and backward.

References (the oracles the tests use): `llava_fast.ops.swiglu`, `llava_fast.ops.quick_gelu`.

SwiGLU, s = sigmoid(gate):
    out   = gate * s * up
    dgate = dout * up * s * (1 + gate * (1 - s))
    dup   = dout * gate * s
quick_gelu, s = sigmoid(1.702 x):
    out = x * s
    dx  = dout * (s + 1.702 * x * s * (1 - s))

All math in fp32 registers, one rounding on the store (eager torch rounds silu(gate) to bf16 before the
multiply, so these are slightly more accurate than the reference). Any shape: the tensors are flattened
and a 1-D grid covers them with a masked tail.

Bytes saved (bf16, n elements): eager SwiGLU writes and rereads silu(gate) (4n extra bytes on top of the
6n minimum); its autograd saves gate, up and silu(gate) and runs ~6 elementwise kernels in backward.
The fused backward reads gate, up, dout and writes dgate, dup: 10n bytes, nothing saved but the inputs.
quick_gelu: eager forward materialises 1.702x and sigmoid(1.702x), 14n bytes of traffic in three kernels;
fused: 4n forward (read x, write out) and 6n backward (read x, dout, write dx).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------

QUICK_GELU_ALPHA = 1.702


@triton.jit
def _swiglu_forward_kernel(GATE, UP, OUT, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _swiglu_backward_kernel(GATE, UP, DOUT, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(DGATE + offsets, dout * up * sig * (1.0 + gate * (1.0 - sig)), mask=mask)
    tl.store(DUP + offsets, dout * silu, mask=mask)


@triton.jit
def _quick_gelu_forward_kernel(X, OUT, n_elements, ALPHA: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, x * tl.sigmoid(ALPHA * x), mask=mask)


@triton.jit
def _quick_gelu_backward_kernel(X, DOUT, DX, n_elements, ALPHA: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(ALPHA * x)
    tl.store(DX + offsets, dout * (sig + ALPHA * x * sig * (1.0 - sig)), mask=mask)


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------

# 4096 elements and 8 warps a program: 16 bf16 values (two 16-byte loads) per thread per operand, which
# keeps enough bytes in flight to saturate HBM on H100; the interpreter also prefers few, wide programs.
ELEMENTWISE_BLOCK = 4096
ELEMENTWISE_WARPS = 8


def _flat(t):
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _grid(n_elements):
    return (triton.cdiv(n_elements, ELEMENTWISE_BLOCK),)


def swiglu_forward(gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    gate_flat, up_flat = _flat(gate), _flat(up)
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate_flat.numel()
    if n:
        _swiglu_forward_kernel[_grid(n)](gate_flat, up_flat, out, n, BLOCK=ELEMENTWISE_BLOCK,
                                         num_warps=ELEMENTWISE_WARPS)
    return out


def swiglu_backward(gate, up, dout):
    dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
    dup = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[_grid(n)](_flat(gate), _flat(up), _flat(dout), dgate, dup, n,
                                          BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return dgate, dup


def quick_gelu_forward(x):
    x_flat = _flat(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x_flat.numel()
    if n:
        _quick_gelu_forward_kernel[_grid(n)](x_flat, out, n, ALPHA=QUICK_GELU_ALPHA, BLOCK=ELEMENTWISE_BLOCK,
                                             num_warps=ELEMENTWISE_WARPS)
    return out


def quick_gelu_backward(x, dout):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n:
        _quick_gelu_backward_kernel[_grid(n)](_flat(x), _flat(dout), dx, n, ALPHA=QUICK_GELU_ALPHA,
                                              BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return dx


# ------------------------------------------------------------------------------------------------------
# Autograd wrappers and the ops
# ------------------------------------------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    """Saves only gate and up; silu(gate) is recomputed in backward (one sigmoid is cheaper than n bytes)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return swiglu_backward(gate, up, dout)


class QuickGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return quick_gelu_forward(x)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        return quick_gelu_backward(x, dout)


def swiglu(gate, up):
    """`llava_fast.ops.swiglu`: silu(gate) * up."""
    return SwiGLUFunction.apply(gate, up)


def quick_gelu(x):
    """`llava_fast.ops.quick_gelu`: x * sigmoid(1.702 x)."""
    return QuickGELUFunction.apply(x)


TRITON_OPS = {"swiglu": swiglu, "quick_gelu": quick_gelu}
