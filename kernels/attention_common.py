"""Attention for LLaVA in Triton, the shared part: the math and layouts every attention kernel follows, the
device helpers they share (RoPE applied on load and undone on store, one online-softmax step over a key
block), the RoPE + KV-cache write, and the launch helpers. The kernel families, one per file:
  attention_prefill.py   flash forward: prefill against the KV cache, the training forward, CLIP's attention
  attention_decode.py    split-KV decode (one new token per row) + log-sum-exp merge
  attention_backward.py  FlashAttention-2 backward and the differentiable ops (training, vision)

Torch references (the oracle the tests compare against): `llava_fast.ops.rotary_cached_attention`,
`llava_fast.ops.rotary_causal_attention`, `llava_fast.ops.vision_attention` (and `apply_rope`).
Ideas from the Triton fused-attention tutorial, FlashAttention-2 (Dao 2023) and Flash-Decoding (Dao et
al. 2023); the code is ours.

Math. For query row i and key j, s_ij = <R(p_i) q_i, R(p_j) k_j> / sqrt(D), o_i = sum_j softmax_j(s_ij) v_j
over the visible keys (causal: j <= p_i). R(p) is RoPE in the non-interleaved "rotate_half" layout:
with x = [x1, x2] (halves of D), R(p) x = [x1 cos - x2 sin, x2 cos + x1 sin], cos/sin = tables[p] fp32.
Softmax is online (running max m, running sum l, both fp32) in base 2: s is scaled by log2(e)/sqrt(D)
once, so every exponential is one exp2. The logsumexp kept for the backward is m + log2(l), base 2.

Layouts. q (B, T, H, D); new k/v (B, T, Hkv, D); cache (B, Hkv, Tmax, D); cos/sin (Tmax, D/2) fp32.
GQA: G = H / Hkv query heads share one K/V head. Every kernel owns one (batch row, KV head) and packs
the G heads into its query tile: packed row r = t * G + g is (token t, head Hkv_index * G + g), so one
K/V tile load feeds all G heads (an H/Hkv = 4 model reads K/V 4x less than one program per query head)
and K/V are never repeated in memory. q·k is computed as q1·k1 + q2·k2 (two dots over the halves), which
is what lets RoPE rotate q inside the kernel without a lane shuffle, and pads odd head dims per half
(D = 80: halves 40 -> 64; D = 96: 48 -> 64; V is padded 80/96 -> 128), masked.

Kernel here:
  _rope_kv_write_kernel   rotate new K and write K, V into the cache (or a training buffer) at
                          start_pos + t; padding rows (t >= seq_lens) never reach the cache.
                          Bytes: read + write 2 * B*T*Hkv*D * es (es = bytes per element).

Precision: fp32 inputs use input_precision="ieee" (a GPU would otherwise use tf32 and miss the fp32
tests' tolerance); fp16/bf16 dots accumulate in fp32; P is cast to V's dtype for the PV product (as in
FA2). q is rotated in fp32 and rounded once to the cache dtype (the reference rounds per product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------------
# Device helpers shared by the forward, decode and backward kernels
# ------------------------------------------------------------------------------------------------------


@triton.jit
def load_rotated_halves(row_ptrs, row_mask, positions, cos_ptr, sin_ptr, stride_cos,
                        HALF: tl.constexpr, HALF_PAD: tl.constexpr, ROPE: tl.constexpr):
    """Load the two halves of rows (R, D) as fp32 (R, HALF_PAD) tiles, rotated by RoPE at `positions`."""
    d = tl.arange(0, HALF_PAD)
    mask = row_mask[:, None] & (d < HALF)[None, :]
    x1 = tl.load(row_ptrs[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptrs[:, None] + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        table = positions[:, None] * stride_cos + d[None, :]
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return x1, x2


@triton.jit
def store_unrotated_halves(row_ptrs, row_mask, x1, x2, positions, cos_ptr, sin_ptr, stride_cos,
                           HALF: tl.constexpr, HALF_PAD: tl.constexpr, ROPE: tl.constexpr):
    """Store fp32 halves after RoPE's backward: the transpose rotation R(-p) = [x1 cos + x2 sin, x2 cos - x1 sin]."""
    d = tl.arange(0, HALF_PAD)
    mask = row_mask[:, None] & (d < HALF)[None, :]
    if ROPE:
        table = positions[:, None] * stride_cos + d[None, :]
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = x1 * cos + x2 * sin, x2 * cos - x1 * sin
    dtype = row_ptrs.dtype.element_ty
    tl.store(row_ptrs[:, None] + d[None, :], x1.to(dtype), mask=mask)
    tl.store(row_ptrs[:, None] + HALF + d[None, :], x2.to(dtype), mask=mask)


@triton.jit
def row_span(start_pos_ptr, seq_lens_ptr, b, T, HAS_LENS: tl.constexpr):
    """(start, n_new) of batch row b: where its new tokens go in the cache and how many there are, read from
    device memory (no host sync); (0, T) for a batch without lengths (training, vision)."""
    if HAS_LENS:
        start = tl.load(start_pos_ptr + b).to(tl.int32)
        n_new = tl.load(seq_lens_ptr + b).to(tl.int32)
    else:
        start = 0
        n_new = T
    return start, n_new


@triton.jit
def attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0, key_end, query_pos,
                    window, qk_scale, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One step of the online softmax: fold keys [n0, n0 + BLOCK_N) into (acc, m_i, l_i).

    MASKED blocks drop keys >= key_end and, if CAUSAL, keys after each row's position and (window > 0, a
    sliding window) keys at or before position - window; unmasked blocks (the bulk of a long prefix) skip
    the compares and the -inf guards."""
    HALF: tl.constexpr = HEAD_DIM // 2
    keys = n0 + tl.arange(0, BLOCK_N)
    d_half = tl.arange(0, HALF_PAD)
    d = tl.arange(0, D_PAD)
    if MASKED:
        key_in = keys < key_end
        kt_mask = (d_half < HALF)[:, None] & key_in[None, :]
        v_mask = key_in[:, None] & (d < HEAD_DIM)[None, :]
    else:  # masks only pad the head dim (all-true for D = 64, 128); tl.load broadcasts them over keys
        kt_mask = (d_half < HALF)[:, None]
        v_mask = (d < HEAD_DIM)[None, :]
    kt_ptrs = k_base + keys[None, :] * stride_kt + d_half[:, None]  # (HALF_PAD, BLOCK_N): K^T halves
    k1t = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
    k2t = tl.load(kt_ptrs + HALF, mask=kt_mask, other=0.0)
    s = tl.dot(q1, k1t, input_precision=DOT_PRECISION)
    s = tl.dot(q2, k2t, s, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        visible = key_in[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= query_pos[:, None])
            visible = visible & ((window == 0) | (keys[None, :] > query_pos[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row with no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + keys[:, None] * stride_vt + d[None, :], mask=v_mask, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# ------------------------------------------------------------------------------------------------------
# RoPE + KV write
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _rope_kv_write_kernel(
    k_ptr, v_ptr, k_dst_ptr, v_dst_ptr, cos_ptr, sin_ptr, start_pos_ptr, seq_lens_ptr,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_kdb, stride_kdt, stride_kdh, stride_vdb, stride_vdt, stride_vdh, stride_cos,
    T, num_kv_heads,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    HAS_LENS: tl.constexpr, COPY_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), B * Hkv): rotate BLOCK_T new keys of one head, write them (and the values) at
    positions start_pos + t of the destination (B, Hkv, Tdst, D)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    head = pid_bh % num_kv_heads
    start, n_new = row_span(start_pos_ptr, seq_lens_ptr, b, T, HAS_LENS)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tok < n_new
    pos = start + tok

    k_rows = k_ptr + b * stride_kb + tok * stride_kt + head * stride_kh
    k1, k2 = load_rotated_halves(k_rows, valid, pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, True)
    kd_rows = k_dst_ptr + b * stride_kdb + pos * stride_kdt + head * stride_kdh
    store_unrotated_halves(kd_rows, valid, k1, k2, pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, False)
    if COPY_V:
        d = tl.arange(0, D_PAD)
        mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        v_rows = v_ptr + b * stride_vb + tok * stride_vt + head * stride_vh
        vals = tl.load(v_rows[:, None] + d[None, :], mask=mask)
        vd_rows = v_dst_ptr + b * stride_vdb + pos * stride_vdt + head * stride_vdh
        tl.store(vd_rows[:, None] + d[None, :], vals.to(v_dst_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# Launch helpers
# ------------------------------------------------------------------------------------------------------


def head_dims(head_dim):
    """(HALF_PAD, D_PAD): the halves and the full head dim padded to powers of two (tl.dot wants >= 16)."""
    if head_dim % 2:
        raise ValueError(f"head dim {head_dim} must be even (RoPE rotates halves)")
    return max(16, triton.next_power_of_2(head_dim // 2)), max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def bth_strides(x, heads_first):
    """(batch, token, head) strides of a (B, T, H, D) tensor, or of a (B, H, T, D) one when heads_first."""
    return (x.stride(0), x.stride(2), x.stride(1)) if heads_first else (x.stride(0), x.stride(1), x.stride(2))


def write_rotary_kv(k, v, cos, sin, k_dst, v_dst, start_pos=None, seq_lens=None):
    """Rotate k (B, T, Hkv, D) by RoPE at start_pos + t and write it (and v, if given) into the (B, Hkv, *, D)
    destinations at those positions; rows t >= seq_lens are skipped. No host sync: lengths stay on device."""
    B, T, Hkv, D = k.shape
    half_pad, d_pad = head_dims(D)
    block_t = 16 if k.device.type != "cuda" else min(64, max(16, triton.next_power_of_2(T)))
    has_lens = seq_lens is not None
    copy_v = v is not None
    v_src, v_out = (v, v_dst) if copy_v else (k, k_dst)  # unused placeholders when only K is written
    _rope_kv_write_kernel[(triton.cdiv(T, block_t), B * Hkv)](
        k, v_src, k_dst, v_out, cos, sin,
        start_pos if has_lens else k, seq_lens if has_lens else k,
        *bth_strides(k, False), *bth_strides(v_src, False),
        *bth_strides(k_dst, True), *bth_strides(v_out, True), cos.stride(0),
        T, Hkv,
        HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, HAS_LENS=has_lens, COPY_V=copy_v, BLOCK_T=block_t,
        num_warps=4,
    )


TRITON_OPS = {}  # the shared pieces only; the ops are in attention_prefill.py and attention_backward.py
