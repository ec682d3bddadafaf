"""Flash-attention backward in Triton (FlashAttention-2) and the differentiable attention ops: the decoder's
causal attention with RoPE (training) and the CLIP encoder's non-causal attention. The forward is
attention_prefill.py's kernel with the lse stored; math, layouts and precision: attention_common.py.

  _backward_delta_kernel  delta_i = sum_d dO_id * O_id (FA2 preprocessing), fp32.
  _backward_dkdv_kernel   per key block: dV = P^T dO, dK = dS^T Q / sqrt(D) over all G heads of the group
                          (the GQA reduction happens in registers, no atomics), P recomputed from lse.
  _backward_dq_kernel     per query tile: dQ = dS K / sqrt(D). Backward FLOPs = 3.5x the forward's
                          (7 matmuls vs 2: S and dP are recomputed in both kernels).
  RoPE's backward (the transpose rotation, R(-p)) is applied to dQ and dK before they are stored.

Torch references: `llava_fast.ops.rotary_causal_attention`, `llava_fast.ops.vision_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_common import (
    LOG2_E,
    bth_strides,
    dot_precision,
    head_dims,
    last_dim_contiguous,
    load_rotated_halves,
    store_unrotated_halves,
    write_rotary_kv,
)
from .attention_prefill import flash_forward

# ------------------------------------------------------------------------------------------------------
# Kernels: delta, dK/dV per key block, dQ per query tile
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _backward_delta_kernel(
    out_ptr, dout_ptr, delta_ptr, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    T, num_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (cdiv(T * G, BLOCK_M), B * Hkv): delta (B, Hkv, T, G) = rowsum(dO * O) in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = (pid_bh % num_kv_heads) * GROUP + rows % GROUP
    d = tl.arange(0, D_PAD)
    mask = (tok < T)[:, None] & (d < HEAD_DIM)[None, :]
    o = tl.load(out_ptr + b * stride_ob + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + b * stride_dob + tok[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh * T * GROUP + rows, tl.sum(o * do, 1), mask=tok < T)


@triton.jit
def _dkdv_step(dk1, dk2, dv, k1, k2, v, keys, r0, q_base, do_base, lse_base, delta_base,
               stride_qt, stride_qh, stride_dot, stride_doh, cos_ptr, sin_ptr, stride_cos, T, kv_head, qk_scale,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
               MASKED: tl.constexpr, ROPE: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold packed query rows [r0, r0 + BLOCK_M) into the key block's dK, dV (scores transposed: (N, M)).

    Rows past T load q = dO = delta = 0 and so add exactly 0; MASKED applies the causal diagonal."""
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = r0 + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = tok < T
    q1, q2 = load_rotated_halves(q_base + tok * stride_qt + head * stride_qh, row_valid, tok,
                                 cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, ROPE)
    q1 = q1.to(k1.dtype)
    q2 = q2.to(k1.dtype)
    d = tl.arange(0, D_PAD)
    do = tl.load(do_base + tok[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :],
                 mask=row_valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(v.dtype)
    lse = tl.load(lse_base + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_base + rows, mask=row_valid, other=0.0)
    s_t = tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION)
    s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=DOT_PRECISION)
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    if MASKED:
        p_t = tl.where(keys[:, None] <= tok[None, :], p_t, 0.0)
    dv = tl.dot(p_t.to(v.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q1.dtype)
    dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PRECISION)
    dk2 = tl.dot(ds_t, q2, dk2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def _backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_cos, T, num_kv_heads, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_N), B * Hkv): dK, dV of BLOCK_N keys, summed over the G query heads that share them.

    k_ptr holds the rotated keys; dK is taken w.r.t. them, then rotated back to the input's frame."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    key_valid = keys < T
    k_rows = k_ptr + b * stride_kb + keys * stride_kt + kv_head * stride_kh
    k1, k2 = load_rotated_halves(k_rows, key_valid, keys, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, False)
    k1 = k1.to(k_ptr.dtype.element_ty)
    k2 = k2.to(k_ptr.dtype.element_ty)
    d = tl.arange(0, D_PAD)
    v = tl.load(v_ptr + b * stride_vb + keys[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                mask=key_valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0)

    dk1 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    q_base = q_ptr + b * stride_qb
    do_base = dout_ptr + b * stride_dob
    lse_base = lse_ptr + pid_bh * T * GROUP
    delta_base = delta_ptr + pid_bh * T * GROUP
    num_rows = T * GROUP
    if CAUSAL:
        # Rows of tokens < n0 see none of these keys; rows of tokens >= n0 + BLOCK_N see all of them.
        diag_lo = ((n0 * GROUP) // BLOCK_M) * BLOCK_M
        diag_hi = tl.cdiv((n0 + BLOCK_N) * GROUP, BLOCK_M) * BLOCK_M
    else:
        diag_lo = 0
        diag_hi = 0
    for r0 in range(diag_lo, diag_hi, BLOCK_M):
        dk1, dk2, dv = _dkdv_step(dk1, dk2, dv, k1, k2, v, keys, r0, q_base, do_base, lse_base, delta_base,
                                  stride_qt, stride_qh, stride_dot, stride_doh, cos_ptr, sin_ptr, stride_cos,
                                  T, kv_head, qk_scale, GROUP, HEAD_DIM, HALF_PAD, D_PAD, True, ROPE, BLOCK_M,
                                  DOT_PRECISION)
    for r0 in range(diag_hi, num_rows, BLOCK_M):
        dk1, dk2, dv = _dkdv_step(dk1, dk2, dv, k1, k2, v, keys, r0, q_base, do_base, lse_base, delta_base,
                                  stride_qt, stride_qh, stride_dot, stride_doh, cos_ptr, sin_ptr, stride_cos,
                                  T, kv_head, qk_scale, GROUP, HEAD_DIM, HALF_PAD, D_PAD, False, ROPE, BLOCK_M,
                                  DOT_PRECISION)

    dk_rows = dk_ptr + b * stride_dkb + keys * stride_dkt + kv_head * stride_dkh
    store_unrotated_halves(dk_rows, key_valid, dk1 * sm_scale, dk2 * sm_scale, keys, cos_ptr, sin_ptr,
                           stride_cos, HALF, HALF_PAD, ROPE)
    tl.store(dv_ptr + b * stride_dvb + keys[:, None] * stride_dvt + kv_head * stride_dvh + d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=key_valid[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _dq_step(dq1, dq2, q1, q2, do, lse, delta, tok, n0, key_end, k_base, v_base, stride_kt, stride_vt,
             qk_scale, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys [n0, n0 + BLOCK_N) into the query tile's dQ."""
    HALF: tl.constexpr = HEAD_DIM // 2
    keys = n0 + tl.arange(0, BLOCK_N)
    d_half = tl.arange(0, HALF_PAD)
    d = tl.arange(0, D_PAD)
    key_in = keys < key_end
    k_mask = key_in[:, None] & (d_half < HALF)[None, :]
    k_ptrs = k_base + keys[:, None] * stride_kt + d_half[None, :]
    k1 = tl.load(k_ptrs, mask=k_mask, other=0.0)
    k2 = tl.load(k_ptrs + HALF, mask=k_mask, other=0.0)
    v_t = tl.load(v_base + keys[None, :] * stride_vt + d[:, None],
                  mask=key_in[None, :] & (d < HEAD_DIM)[:, None], other=0.0)  # (D_PAD, BLOCK_N)
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
    s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        visible = key_in[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= tok[:, None])
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)
    dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cos_ptr, sin_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_cos, T, num_kv_heads, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T * G, BLOCK_M), B * Hkv): dQ of BLOCK_M packed query rows, rotated back by R(-t)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = tok < T
    q_rows = q_ptr + b * stride_qb + tok * stride_qt + head * stride_qh
    q1, q2 = load_rotated_halves(q_rows, row_valid, tok, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, ROPE)
    q1 = q1.to(k_ptr.dtype.element_ty)
    q2 = q2.to(k_ptr.dtype.element_ty)
    d = tl.arange(0, D_PAD)
    do = tl.load(dout_ptr + b * stride_dob + tok[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :],
                 mask=row_valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(v_ptr.dtype.element_ty)
    lse = tl.load(lse_ptr + pid_bh * T * GROUP + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + pid_bh * T * GROUP + rows, mask=row_valid, other=0.0)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh

    tok_lo = (pid_m * BLOCK_M) // GROUP
    if CAUSAL:
        full_end = ((tok_lo + 1) // BLOCK_N) * BLOCK_N
        key_end = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP + 1, T)
    else:
        full_end = (T // BLOCK_N) * BLOCK_N
        key_end = T
    dq1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, tok, n0, key_end, k_base, v_base, stride_kt,
                            stride_vt, qk_scale, HEAD_DIM, HALF_PAD, D_PAD, False, CAUSAL, BLOCK_N, DOT_PRECISION)
    for n0 in range(full_end, key_end, BLOCK_N):
        dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, tok, n0, key_end, k_base, v_base, stride_kt,
                            stride_vt, qk_scale, HEAD_DIM, HALF_PAD, D_PAD, True, CAUSAL, BLOCK_N, DOT_PRECISION)

    dq_rows = dq_ptr + b * stride_dqb + tok * stride_dqt + head * stride_dqh
    store_unrotated_halves(dq_rows, row_valid, dq1 * sm_scale, dq2 * sm_scale, tok, cos_ptr, sin_ptr,
                           stride_cos, HALF, HALF_PAD, ROPE)


# ------------------------------------------------------------------------------------------------------
# Tile sizes and the autograd wrapper
# ------------------------------------------------------------------------------------------------------


def backward_tiles(device, d_pad, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) shared by the dK/dV and dQ kernels. The backward holds
    three accumulators (dK halves, dV or dQ halves) beside P and dP, so tiles are 64 x 64, 2 stages.
    fp32 (IEEE FMA dots, see forward_tiles): at 64 x 64 ptxas reports 157 KB (dK/dV, a 14.6 KB stack frame
    per thread) and 92 KB (dQ) of spill loads + stores at D = 128; 16 x 32, 8 warps, 1 stage: 112 / 76
    registers, no spill.
    bf16/fp16 dK/dV at D >= 80 sits at 255 registers and spills 160-356 bytes (8 at D = 64); kept until a
    GPU can time the spill-free candidates (64 x 32, 8 warps, 2 stages: 178 registers at D = 128)."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 16, 32, 8, 1
    return 64, 64, (8 if d_pad >= 128 else 4), 2


class FlashAttentionFunction(torch.autograd.Function):
    """Differentiable attention on (B, T, H, D) / (B, T, Hkv, D) inputs without a cache: causal with RoPE at
    positions 0..T-1 (training), or non-causal without RoPE (vision). Saves q, the rotated k, v, out and
    the lse; the backward recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, causal, rope):
        q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
        if rope:  # rotate K once into a (B, Hkv, T, D) buffer: the query tiles all read it, the backward too
            B, T, Hkv, D = k.shape
            k_attn = torch.empty(B, Hkv, T, D, device=k.device, dtype=k.dtype)
            write_rotary_kv(k, None, cos, sin, k_attn, None)
        else:
            k_attn = k
        out, lse = flash_forward(q, k_attn, rope, v, False, cos, sin, None, None, causal, rope, store_lse=True)
        ctx.save_for_backward(q, k_attn, v, out, lse, cos, sin)
        ctx.causal, ctx.rope = causal, rope
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_attn, v, out, lse, cos, sin = ctx.saved_tensors
        causal, rope = ctx.causal, ctx.rope
        dout = last_dim_contiguous(dout)
        B, T, H, D = q.shape
        Hkv = v.shape[2]
        group = H // Hkv
        half_pad, d_pad = head_dims(D)
        block_m, block_n, num_warps, num_stages = backward_tiles(q.device, d_pad, q.dtype)
        delta = torch.empty_like(lse)
        _backward_delta_kernel[(triton.cdiv(T * group, block_m), B * Hkv)](
            out, dout, delta, *bth_strides(out, False), *bth_strides(dout, False), T, Hkv,
            GROUP=group, HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=block_m, num_warps=4,
        )
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty(B, T, Hkv, D, device=q.device, dtype=k_attn.dtype)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        common = dict(GROUP=group, HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, CAUSAL=causal, ROPE=rope,
                      DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                      num_warps=num_warps, num_stages=num_stages)
        k_heads_first = rope  # the rotated buffer is (B, Hkv, T, D); an unrotated k is the input itself
        table = (cos, sin, cos.stride(0)) if rope else (q, q, 0)
        sm_scale = 1.0 / math.sqrt(D)
        _backward_dkdv_kernel[(triton.cdiv(T, block_n), B * Hkv)](
            q, k_attn, v, dout, lse, delta, dk, dv, table[0], table[1],
            *bth_strides(q, False), *bth_strides(k_attn, k_heads_first), *bth_strides(v, False),
            *bth_strides(dout, False), *bth_strides(dk, False), *bth_strides(dv, False),
            table[2], T, Hkv, LOG2_E * sm_scale, sm_scale, **common,
        )
        _backward_dq_kernel[(triton.cdiv(T * group, block_m), B * Hkv)](
            q, k_attn, v, dout, lse, delta, dq, table[0], table[1],
            *bth_strides(q, False), *bth_strides(k_attn, k_heads_first), *bth_strides(v, False),
            *bth_strides(dout, False), *bth_strides(dq, False),
            table[2], T, Hkv, LOG2_E * sm_scale, sm_scale, **common,
        )
        return dq, dk, dv, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# The ops (same signatures and semantics as llava_fast.ops)
# ------------------------------------------------------------------------------------------------------


def rotary_causal_attention(q, k, v, cos, sin, window=0):
    """See llava_fast.ops.rotary_causal_attention (differentiable in q, k, v; with a sliding window, forward
    only: the backward kernels have no window)."""
    if window and q.shape[1] > window:
        if any(x.requires_grad for x in (q, k, v)):
            raise NotImplementedError(f"sliding_window={window}: the Triton attention backward has no sliding "
                                      "window; train this model with the torch kernels (LLAVA_FAST_KERNELS=torch)")
        k_attn = torch.empty(k.shape[0], k.shape[2], k.shape[1], k.shape[3], device=k.device, dtype=k.dtype)
        q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
        write_rotary_kv(k, None, cos, sin, k_attn, None)  # (B, Hkv, T, D)
        return flash_forward(q, k_attn, True, v, False, cos, sin, None, None, True, True, store_lse=False,
                             window=window)
    return FlashAttentionFunction.apply(q, k, v, cos, sin, True, True)


def vision_attention(q, k, v):
    """See llava_fast.ops.vision_attention (differentiable in q, k, v, should the tower be unfrozen)."""
    return FlashAttentionFunction.apply(q, k, v, None, None, False, False)


TRITON_OPS = {
    "rotary_causal_attention": rotary_causal_attention,
    "vision_attention": vision_attention,
}
