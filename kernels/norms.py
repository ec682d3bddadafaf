"""Fused normalisation kernels: LLaMA's RMSNorm with the residual add in front, and CLIP's LayerNorm.

References (the oracles the tests use): `llava_fast.ops.rms_norm`, `llava_fast.ops.layer_norm`.

RMSNorm with residual, one row h of C channels per program:
    hidden = x + residual                 (rounded to the activation dtype, as torch's add does)
    rstd   = 1 / sqrt(mean(hidden^2) + eps)           fp32
    normed = weight * (hidden * rstd).to(dtype)       LLaMA's order: normalise in fp32, cast, then scale
  backward, with n = hidden * rstd and g = d(normed) * weight (fp32):
    dhidden_total = rstd * (g - n * mean(g * n)) + d(hidden)      the hidden output is also used
    dx = dresidual = dhidden_total;   dweight = sum_rows d(normed) * n.to(dtype)

LayerNorm (CLIP), xhat = (x - mean) * rstd, y = xhat * weight + bias:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight
    dweight = sum_rows dy * xhat;   dbias = sum_rows dy

Shapes: x, residual (..., C) flattened to (N, C); weight, bias (C,). Forward: one program per row holding
the whole row (C <= 8192 for LLaMA-7B/13B's 4096/5120 and CLIP's 1024). Backward: a fixed number of
programs (about one per SM) each walks a contiguous run of rows, keeps its dweight/dbias partial sums in
fp32 registers, and writes one (C,) partial row; torch sums the (P, C) partials. That costs P*C*4 bytes
(132 * 4096 * 4 = 2.1 MiB on H100) instead of an (N, C) fp32 buffer or atomics.

Bytes saved (bf16, N rows of C): unfused `x + residual` then RMSNorm reads x, residual, writes hidden,
reads hidden again and writes normed (plus fp32 temporaries in eager torch: h32, h32^2, normed32); the
fused forward reads 2NC and writes 2NC elements, i.e. 8NC bytes, against ~42NC bytes for eager torch
(add 6, .float() 6, pow 8, mean 4, multiply by rstd 8, cast 6, multiply by weight 4: bytes per element).
The backward reads hidden, d(normed), d(hidden) and writes dx once (8NC bytes) instead of materialising
the fp32 intermediates of autograd's graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_forward_kernel(
    X, RESIDUAL, HIDDEN, NORMED, WEIGHT, RSTD,
    row_stride_x, row_stride_residual, row_stride_hidden, row_stride_normed,
    n_channels, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: N * C passes 2^31 at 8 x 4096 tokens x 65536 channels
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_channels
    h = tl.load(X + row * row_stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(RESIDUAL + row * row_stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        # Round to the stream's dtype first: the reference normalises the rounded bf16 sum.
        h = h.to(HIDDEN.dtype.element_ty)
        tl.store(HIDDEN + row * row_stride_hidden + cols, h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_channels + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (h * rstd).to(HIDDEN.dtype.element_ty).to(tl.float32)  # LLaMA: cast before the weight
    tl.store(NORMED + row * row_stride_normed + cols, w * normed, mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    HIDDEN, RSTD, WEIGHT, DNORMED, DHIDDEN, DX, DWEIGHT_PARTIAL,
    row_stride_hidden, row_stride_dnormed, row_stride_dhidden, row_stride_dx,
    n_rows, n_channels, rows_per_program,
    HAS_DHIDDEN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_channels
    w = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds make the row index int64 too
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in tl.range(row_start, row_end):
        h = tl.load(HIDDEN + row * row_stride_hidden + cols, mask=mask, other=0.0).to(tl.float32)
        dnormed = tl.load(DNORMED + row * row_stride_dnormed + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = h * rstd
        dweight_acc += dnormed * n.to(HIDDEN.dtype.element_ty).to(tl.float32)
        g = dnormed * w
        dh = rstd * (g - n * (tl.sum(g * n, axis=0) / n_channels))
        if HAS_DHIDDEN:
            dh += tl.load(DHIDDEN + row * row_stride_dhidden + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * row_stride_dx + cols, dh, mask=mask)
    tl.store(DWEIGHT_PARTIAL + pid * n_channels + cols, dweight_acc, mask=mask)


@triton.jit
def _layer_norm_forward_kernel(
    X, Y, WEIGHT, BIAS, MEAN, RSTD,
    row_stride_x, row_stride_y, n_channels, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_channels
    x = tl.load(X + row * row_stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_channels
    centered = tl.where(mask, x - mean, 0.0)  # padding lanes must not add mean^2 to the variance
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / n_channels + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = centered * rstd
    if HAS_WEIGHT:
        y = y * tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * row_stride_y + cols, y, mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    X, WEIGHT, MEAN, RSTD, DY, DX, DWEIGHT_PARTIAL, DBIAS_PARTIAL,
    row_stride_x, row_stride_dy, row_stride_dx,
    n_rows, n_channels, rows_per_program,
    HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_channels
    if HAS_WEIGHT:
        w = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds make the row index int64 too
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in tl.range(row_start, row_end):
        x = tl.load(X + row * row_stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * row_stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        dweight_acc += dy * xhat
        dbias_acc += dy
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        mean_g = tl.sum(g, axis=0) / n_channels
        mean_g_xhat = tl.sum(g * xhat, axis=0) / n_channels
        dx = tl.load(RSTD + row) * (g - mean_g - xhat * mean_g_xhat)
        tl.store(DX + row * row_stride_dx + cols, dx, mask=mask)
    tl.store(DWEIGHT_PARTIAL + pid * n_channels + cols, dweight_acc, mask=mask)
    tl.store(DBIAS_PARTIAL + pid * n_channels + cols, dbias_acc, mask=mask)


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------

MAX_FUSED_CHANNELS = 65536 // 2  # a whole row lives in registers: 32768 fp32 = 128 KiB across the CTA


def _row_block(n_channels):
    """BLOCK_C and num_warps for one row per program: 4096 channels -> 8 warps, 16 fp32 values a thread."""
    block = triton.next_power_of_2(n_channels)
    if block > MAX_FUSED_CHANNELS:
        raise ValueError(f"norm over {n_channels} channels: at most {MAX_FUSED_CHANNELS} fit one program")
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, num_warps


def _backward_program_count(n_rows, device):
    """One backward program per SM: each keeps its dweight partial in registers across its rows."""
    if device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another; a few keep the partial-sum path exercised
        programs = 4
    return max(1, min(programs, n_rows))


def _as_rows(t):
    """(..., C) -> (N, C) with unit channel stride (a view when it already has one)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_forward(x, weight, eps, residual=None):
    """Returns (normed, hidden, rstd) as (N, C) rows; hidden is x itself when residual is None."""
    x_rows = _as_rows(x)
    n_rows, n_channels = x_rows.shape
    if residual is not None:
        residual_rows = _as_rows(residual)
        hidden_dtype = torch.promote_types(x.dtype, residual.dtype)
        hidden_rows = torch.empty((n_rows, n_channels), dtype=hidden_dtype, device=x.device)
    else:
        residual_rows, hidden_dtype, hidden_rows = x_rows, x.dtype, x_rows
    normed_dtype = torch.promote_types(weight.dtype, hidden_dtype)  # torch's `weight * normed` promotion
    normed_rows = torch.empty((n_rows, n_channels), dtype=normed_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_c, num_warps = _row_block(n_channels)
    if n_rows > 0:
        _rms_norm_forward_kernel[(n_rows,)](
            x_rows, residual_rows, hidden_rows, normed_rows, weight, rstd,
            x_rows.stride(0), residual_rows.stride(0), hidden_rows.stride(0), normed_rows.stride(0),
            n_channels, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_C=block_c, num_warps=num_warps,
        )
    return normed_rows, hidden_rows, rstd


def rms_norm_backward(hidden_rows, rstd, weight, dnormed_rows, dhidden_rows):
    """dhidden_total (N, C) fp32-accumulated, stored in hidden's dtype, and dweight (C,) in weight's dtype."""
    n_rows, n_channels = hidden_rows.shape
    dx_rows = torch.empty_like(hidden_rows)
    programs = _backward_program_count(n_rows, hidden_rows.device)
    dweight_partial = torch.empty((programs, n_channels), dtype=torch.float32, device=hidden_rows.device)
    block_c, num_warps = _row_block(n_channels)
    if n_rows == 0:
        return dx_rows, torch.zeros_like(weight)
    has_dhidden = dhidden_rows is not None
    dhidden_rows = dhidden_rows if has_dhidden else dnormed_rows  # a dummy pointer, never read
    _rms_norm_backward_kernel[(programs,)](
        hidden_rows, rstd, weight, dnormed_rows, dhidden_rows, dx_rows, dweight_partial,
        hidden_rows.stride(0), dnormed_rows.stride(0), dhidden_rows.stride(0), dx_rows.stride(0),
        n_rows, n_channels, triton.cdiv(n_rows, programs),
        HAS_DHIDDEN=has_dhidden, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx_rows, dweight_partial.sum(0).to(weight.dtype)


def layer_norm_forward(x, weight, bias, eps):
    x_rows = _as_rows(x)
    n_rows, n_channels = x_rows.shape
    y_rows = torch.empty_like(x_rows)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_c, num_warps = _row_block(n_channels)
    if n_rows > 0:
        _layer_norm_forward_kernel[(n_rows,)](
            x_rows, y_rows, weight if weight is not None else x_rows, bias if bias is not None else x_rows,
            mean, rstd, x_rows.stride(0), y_rows.stride(0), n_channels, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c, num_warps=num_warps,
        )
    return y_rows, x_rows, mean, rstd


def layer_norm_backward(x_rows, weight, mean, rstd, dy_rows):
    """dx (N, C) in x's dtype; dweight, dbias (C,) fp32 sums (cast by the caller)."""
    n_rows, n_channels = x_rows.shape
    dx_rows = torch.empty_like(x_rows)
    if n_rows == 0:
        zeros = torch.zeros(n_channels, dtype=torch.float32, device=x_rows.device)
        return dx_rows, zeros, zeros.clone()
    programs = _backward_program_count(n_rows, x_rows.device)
    dweight_partial = torch.empty((programs, n_channels), dtype=torch.float32, device=x_rows.device)
    dbias_partial = torch.empty_like(dweight_partial)
    block_c, num_warps = _row_block(n_channels)
    _layer_norm_backward_kernel[(programs,)](
        x_rows, weight if weight is not None else x_rows, mean, rstd, dy_rows, dx_rows,
        dweight_partial, dbias_partial,
        x_rows.stride(0), dy_rows.stride(0), dx_rows.stride(0),
        n_rows, n_channels, triton.cdiv(n_rows, programs),
        HAS_WEIGHT=weight is not None, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx_rows, dweight_partial.sum(0), dbias_partial.sum(0)


# ------------------------------------------------------------------------------------------------------
# Autograd wrappers and the ops
# ------------------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """(x, weight, eps) -> normed; with residual also -> hidden. Without a residual the op returns x as
    hidden outside this Function, so its gradient reaches x through autograd without a copy."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        normed_rows, hidden_rows, rstd = rms_norm_forward(x, weight, eps, residual)
        ctx.save_for_backward(hidden_rows, rstd, weight)
        ctx.shapes_and_dtypes = (x.shape, x.dtype, None if residual is None else residual.dtype)
        ctx.set_materialize_grads(False)  # an unused hidden output costs no zero-filled (N, C) gradient
        normed = normed_rows.view(x.shape)
        if residual is None:
            return normed
        return normed, hidden_rows.view(x.shape)

    @staticmethod
    def backward(ctx, dnormed, dhidden=None):
        hidden_rows, rstd, weight = ctx.saved_tensors
        shape, x_dtype, residual_dtype = ctx.shapes_and_dtypes
        dhidden_rows = None if dhidden is None else _as_rows(dhidden)
        if dnormed is None:  # only hidden was used: the norm contributes nothing
            if dhidden is None:
                return None, None, None, None
            dx, dweight = dhidden.reshape(shape), None
        else:
            dx_rows, dweight = rms_norm_backward(hidden_rows, rstd, weight, _as_rows(dnormed), dhidden_rows)
            dx = dx_rows.view(shape)
        # x and residual get the same gradient; autograd does not write into a gradient it shares.
        dresidual = None if residual_dtype is None else dx.to(residual_dtype)
        return dx.to(x_dtype), dweight, None, dresidual


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y_rows, x_rows, mean, rstd = layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x_rows, weight, mean, rstd)
        ctx.shape = x.shape
        ctx.has_bias = bias is not None
        ctx.param_dtype = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y_rows.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_rows, weight, mean, rstd = ctx.saved_tensors
        dx_rows, dweight, dbias = layer_norm_backward(x_rows, weight, mean, rstd, _as_rows(dy))
        weight_dtype, bias_dtype = ctx.param_dtype
        dweight = None if weight_dtype is None else dweight.to(weight_dtype)
        dbias = None if bias_dtype is None else dbias.to(bias_dtype)
        return dx_rows.view(ctx.shape), dweight, dbias, None


def rms_norm(x, weight, eps, residual=None):
    """`llava_fast.ops.rms_norm` in one fused pass: returns (normed, hidden)."""
    if residual is None:
        return RMSNormFunction.apply(x, weight, eps, None), x
    return RMSNormFunction.apply(x, weight, eps, residual)


def layer_norm(x, weight, bias, eps):
    """`llava_fast.ops.layer_norm` over the last dimension."""
    return LayerNormFunction.apply(x, weight, bias, eps)


TRITON_OPS = {"rms_norm": rms_norm, "layer_norm": layer_norm}
