"""CLIP's patch embedding + class token + position embedding + pre_layrnorm, in one launch.

Torch reference: `llava_fast.ops.patch_embed` (conv2d with stride P, cat the class token, add positions,
LayerNorm). Forward only: the vision tower is frozen in every LLaVA training stage.

Math, per image n and output row t (t = 0 is the class token, t = 1 + l is patch l = (pr, pc)):

    x[t, :] = class_embedding                                   if t == 0
            = sum_k pixels[n, l, k] * patch_weight[:, k]        otherwise  (k = (ch, i, j), K = 3*P*P)
    x[t, :] += position_embedding[t, :]
    out[n, t, :] = (x[t, :] - mean) * rsqrt(var + eps) * ln_weight + ln_bias     (mean/var over C)

where pixels[n, l, (ch, i, j)] = pixel_values[n, ch, pr*P + i, pc*P + j]. The kernel computes those
addresses itself (im2col inside the GEMM's A-tile load), so the (N, L, K) patch matrix never exists.

Shapes: pixel_values (N, 3, S, S), any strides (channels-last works); patch_weight (C, 3, P, P) contiguous;
class_embedding (C,); position_embedding (1 + L, C); out (N, 1 + L, C), L = (S/P)^2, G = S/P per side.

One program owns BLOCK_M output rows x the whole C row (BLOCK_C = next_pow2(C)), so LayerNorm runs on the
fp32 accumulator in registers and each output element is written once. CLIP-L at 336 px (L = 576,
C = 1024, K = 588, fp32 pixels, fp16 weights), HBM bytes per image: the reference casts the pixels
(1.35 MB read, 0.68 MB written), convolves (0.68 MB read, 1.18 MB written), then cat, the position add
and LayerNorm each read and write the (577, 1024) activation again (~8.3 MB with the position table):
~12 MB in 5 launches. This kernel reads the pixels once (1.35 MB), the position table (1.18 MB, from
L2 after the first image) and writes the output (1.18 MB): ~3.7 MB in 1 launch. The GEMM is only
0.69 GFLOP/image, so the tile choices favour keeping the row resident over tensor-core efficiency.

Numerics: accumulate and normalise in fp32, round once at the store. The reference rounds to the weight
dtype after the conv and again after the position add, so in fp16 this kernel is at least as accurate.
Pixels are cast to the weight dtype before the dot, as the reference does. fp32 uses an IEEE dot, not tf32
(~1e-3 relative error over K = 588): an fp32 caller asks for accuracy, and the GEMM is not the bottleneck.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _patch_embed_layer_norm_kernel(
    pixel_ptr, weight_ptr, class_ptr, position_ptr, ln_weight_ptr, ln_bias_ptr, out_ptr,
    n_rows, C, grid_side, eps,
    stride_pn, stride_pc, stride_ph, stride_pw,
    stride_on, stride_ot,
    P: tl.constexpr, K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output rows t, (BLOCK_M,)
    cols = tl.arange(0, BLOCK_C)  # channels c, (BLOCK_C,)
    row_in = rows < n_rows
    col_in = cols < C
    is_patch = row_in & (rows > 0)

    # Row part of each patch pixel's address: the patch's top-left corner in image n.
    patch = tl.where(is_patch, rows - 1, 0)
    patch_row = patch // grid_side
    patch_col = patch % grid_side
    row_offset = (
        n * stride_pn + (patch_row * P).to(tl.int64) * stride_ph + (patch_col * P).to(tl.int64) * stride_pw
    )

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # flattened (ch, i, j), the conv weight's own order
        k_in = ks < K
        ch = ks // (P * P)
        i = (ks // P) % P
        j = ks % P
        k_offset = ch * stride_pc + i * stride_ph + j * stride_pw  # (BLOCK_K,)
        pixels = tl.load(
            pixel_ptr + row_offset[:, None] + k_offset[None, :],
            mask=is_patch[:, None] & k_in[None, :], other=0.0,
        ).to(weight_ptr.dtype.element_ty)  # (BLOCK_M, BLOCK_K), rounded as the reference rounds
        weight = tl.load(
            weight_ptr + cols[None, :] * K + ks[:, None], mask=k_in[:, None] & col_in[None, :], other=0.0,
        )  # (BLOCK_K, BLOCK_C): patch_weight viewed as (C, K), transposed by the addressing
        acc = tl.dot(pixels, weight, acc, input_precision=DOT_PRECISION)

    class_row = tl.load(class_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    x = tl.where((rows == 0)[:, None], class_row[None, :], acc)
    x += tl.load(
        position_ptr + rows[:, None] * C + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0,
    ).to(tl.float32)

    # LayerNorm over the C valid channels; padded channels are 0 in x and excluded from the variance.
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(col_in[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    ln_weight = tl.load(ln_weight_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    ln_bias = tl.load(ln_bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * ln_weight[None, :] + ln_bias[None, :]

    out_offset = n * stride_on + rows[:, None].to(tl.int64) * stride_ot + cols[None, :]
    tl.store(out_ptr + out_offset, y.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


def _block_sizes(device, C, weight_dtype):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages).

    GPU: 16 rows x the full C row. At C = 1024 the fp32 accumulator is 16K values = 64 registers/thread
    over 8 warps, and one weight tile is 64 KB of shared memory (BLOCK_K * 1024 * itemsize), so two pipeline
    stages fit in H100's 228 KB. The rows of one image (577 at 336 px) make 37 programs; the 1.2 MB weight
    is re-read from L2 by each. Not yet measured on a GPU.
    Interpreter: the cost is per program and per loop step, so bigger tiles keep the tests fast.
    """
    if device.type != "cuda":
        return 32, 128, 4, 1
    block_k = 32 if weight_dtype.itemsize <= 2 else 16
    return 16, block_k, 8 if C >= 512 else 4, 2


def patch_embed(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps):
    """Same contract as `llava_fast.ops.patch_embed`. Forward only."""
    inputs = (pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise RuntimeError(
            "the Triton patch_embed has no backward (the vision tower is frozen): set requires_grad=False on "
            "the vision tower's weights, call it under torch.no_grad(), or use LLAVA_FAST_KERNELS=torch"
        )
    N, channels, S, S_w = pixel_values.shape
    C, weight_channels, P, P_w = patch_weight.shape
    if channels != weight_channels or P != P_w or S != S_w or S % P:
        raise ValueError(
            f"patch_embed: pixel_values {tuple(pixel_values.shape)} and patch_weight {tuple(patch_weight.shape)} "
            f"need square images, matching channels and S divisible by P"
        )
    grid_side = S // P
    n_rows = 1 + grid_side * grid_side
    if tuple(position_embedding.shape) != (n_rows, C) or class_embedding.shape != (C,):
        raise ValueError(
            f"patch_embed: position_embedding {tuple(position_embedding.shape)} must be ({n_rows}, {C}) and "
            f"class_embedding {tuple(class_embedding.shape)} must be ({C},)"
        )
    # The kernel indexes these as dense arrays; each is already contiguous in a loaded model (no copy).
    patch_weight, class_embedding, position_embedding, ln_weight, ln_bias = (
        t.contiguous() for t in (patch_weight, class_embedding, position_embedding, ln_weight, ln_bias)
    )
    out_dtype = torch.promote_types(
        torch.promote_types(patch_weight.dtype, class_embedding.dtype), position_embedding.dtype
    )  # the reference's cat + add promote the same way
    out = torch.empty(N, n_rows, C, device=pixel_values.device, dtype=out_dtype)

    BLOCK_M, BLOCK_K, num_warps, num_stages = _block_sizes(pixel_values.device, C, patch_weight.dtype)
    grid = (triton.cdiv(n_rows, BLOCK_M), N)
    _patch_embed_layer_norm_kernel[grid](
        pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, out,
        n_rows, C, grid_side, eps,
        *pixel_values.stride(),
        out.stride(0), out.stride(1),
        P=P, K=channels * P * P,
        DOT_PRECISION="ieee" if patch_weight.dtype == torch.float32 else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_C=triton.next_power_of_2(C),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


TRITON_OPS = {"patch_embed": patch_embed}
