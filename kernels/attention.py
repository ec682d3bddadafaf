"""Attention for LLaVA in Triton: rotary prefill against a KV cache, split-KV decode, the training
forward/backward, and the CLIP encoder's non-causal attention. One kernel family.

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

Kernels, in the order below:
  _rope_kv_write_kernel   rotate new K and write K, V into the cache (or a training buffer) at
                          start_pos + t; padding rows (t >= seq_lens) never reach the cache.
                          Bytes: read + write 2 * B*T*Hkv*D * es (es = bytes per element).
  _attention_fwd_kernel   flash forward: causal (prefill, training) or not (vision); per-row start_pos /
                          seq_lens read from device memory (a right-padded, variable-length batch).
                          Causal key blocks are split into an unmasked stage (all keys visible to every
                          row of the tile) and a masked diagonal stage. FLOPs (causal, S cached tokens):
                          4 * B*H*D * (T*S + T^2/2); prefill from zero: 4*B*H*T^2*D/2; vision: 4*N*H*T^2*D.
  _decode_split_kernel    one new token per row, grid (B, Hkv, num_splits) fixed by shapes; each program
                          reads its row's length from device memory and takes 1/num_splits of it, so
                          the launch is CUDA-graph capturable (no .item() anywhere on this path).
                          Bytes: 2 * B*Hkv*L*D * es for the cache (K and V read once per KV head).
  _decode_merge_kernel    log-sum-exp merge of the splits: reads B*H*num_splits*(D+1) fp32.
  _backward_delta_kernel  delta_i = sum_d dO_id * O_id (FA2 preprocessing), fp32.
  _backward_dkdv_kernel   per key block: dV = P^T dO, dK = dS^T Q / sqrt(D) over all G heads of the group
                          (the GQA reduction happens in registers, no atomics), P recomputed from lse.
  _backward_dq_kernel     per query tile: dQ = dS K / sqrt(D). Backward FLOPs = 3.5x the forward's
                          (7 matmuls vs 2: S and dP are recomputed in both kernels).
  RoPE's backward (the transpose rotation, R(-p)) is applied to dQ and dK before they are stored.

Precision: fp32 inputs use input_precision="ieee" (a GPU would otherwise use tf32 and miss the fp32
tests' tolerance); fp16/bf16 dots accumulate in fp32; P is cast to V's dtype for the PV product (as in
FA2). q is rotated in fp32 and rounded once to the cache dtype (the reference rounds per product).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------------
# Shared device helpers
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rotated_halves(row_ptrs, row_mask, positions, cos_ptr, sin_ptr, stride_cos,
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
def _store_unrotated_halves(row_ptrs, row_mask, x1, x2, positions, cos_ptr, sin_ptr, stride_cos,
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
    if HAS_LENS:
        start = tl.load(start_pos_ptr + b).to(tl.int32)
        n_new = tl.load(seq_lens_ptr + b).to(tl.int32)
    else:
        start = 0
        n_new = T
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tok < n_new
    pos = start + tok

    k_rows = k_ptr + b * stride_kb + tok * stride_kt + head * stride_kh
    k1, k2 = _load_rotated_halves(k_rows, valid, pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, True)
    kd_rows = k_dst_ptr + b * stride_kdb + pos * stride_kdt + head * stride_kdh
    _store_unrotated_halves(kd_rows, valid, k1, k2, pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, False)
    if COPY_V:
        d = tl.arange(0, D_PAD)
        mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        v_rows = v_ptr + b * stride_vb + tok * stride_vt + head * stride_vh
        vals = tl.load(v_rows[:, None] + d[None, :], mask=mask)
        vd_rows = v_dst_ptr + b * stride_vdb + pos * stride_vdt + head * stride_vdh
        tl.store(vd_rows[:, None] + d[None, :], vals.to(v_dst_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# Forward: prefill, training, vision
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0, key_end, query_pos,
                     qk_scale, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One step of the online softmax: fold keys [n0, n0 + BLOCK_N) into (acc, m_i, l_i).

    MASKED blocks drop keys >= key_end and, if CAUSAL, keys after each row's position; unmasked blocks
    (the bulk of a long prefix) skip both compares and the -inf guards."""
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


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cos_ptr, sin_ptr, start_pos_ptr, seq_lens_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_cos,
    T, num_kv_heads, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, HAS_LENS: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T * G, BLOCK_M), B * Hkv). Query tile = BLOCK_M packed (token, head) rows of one KV head.

    Row b's new token t sits at position start_pos[b] + t and sees keys [0, start_pos[b] + t] (causal) or
    [0, start_pos[b] + seq_lens[b]) (not causal); rows t >= seq_lens[b] are padding and store 0."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    if HAS_LENS:
        start = tl.load(start_pos_ptr + b).to(tl.int32)
        n_new = tl.load(seq_lens_ptr + b).to(tl.int32)
    else:
        start = 0
        n_new = T

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = tok < n_new
    query_pos = start + tok
    q_rows = q_ptr + b * stride_qb + tok * stride_qt + head * stride_qh
    q1, q2 = _load_rotated_halves(q_rows, row_valid, query_pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, ROPE)
    q1 = q1.to(k_ptr.dtype.element_ty)
    q2 = q2.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh

    # Key range of the tile. Keys [0, full_end) are visible to every row (no masks); [full_end, key_end)
    # is the causal diagonal / sequence tail, masked. An all-padding tile attends to nothing.
    tok_lo = (pid_m * BLOCK_M) // GROUP
    tile_has_rows = tok_lo < n_new
    if CAUSAL:
        tok_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
        full_end = tl.where(tile_has_rows, ((start + tok_lo + 1) // BLOCK_N) * BLOCK_N, 0)
        key_end = tl.where(tile_has_rows, start + tok_hi + 1, 0)
    else:
        kv_len = start + n_new
        full_end = tl.where(tile_has_rows, (kv_len // BLOCK_N) * BLOCK_N, 0)
        key_end = tl.where(tile_has_rows, kv_len, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0,
                                         key_end, query_pos, qk_scale, HEAD_DIM, HALF_PAD, D_PAD,
                                         False, CAUSAL, BLOCK_N, DOT_PRECISION)
    for n0 in range(full_end, key_end, BLOCK_N):
        acc, m_i, l_i = _attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0,
                                         key_end, query_pos, qk_scale, HEAD_DIM, HALF_PAD, D_PAD,
                                         True, CAUSAL, BLOCK_N, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(row_valid[:, None], acc / l_safe[:, None], 0.0)
    d = tl.arange(0, D_PAD)
    o_ptrs = out_ptr + b * stride_ob + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(tok < T)[:, None] & (d < HEAD_DIM)[None, :])
    if STORE_LSE:  # (B, Hkv, T, G) = packed rows; base-2 logsumexp of the scaled scores
        tl.store(lse_ptr + pid_bh * T * GROUP + rows, m_i + tl.log2(l_safe), mask=tok < T)


# ------------------------------------------------------------------------------------------------------
# Decode: split-KV (Flash-Decoding) + log-sum-exp merge
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, partial_out_ptr, partial_lse_ptr, cos_ptr, sin_ptr,
    start_pos_ptr, seq_lens_ptr,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_cos,
    num_heads, num_kv_heads, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (B, Hkv, NUM_SPLITS). All G query heads of the group against split `split` of row b's keys.

    The row's key count L = start_pos[b] + 1 (0 if seq_lens[b] = 0) is read here, on the device; the split
    covers [split * S, (split + 1) * S) with S = cdiv(L, NUM_SPLITS) rounded up to BLOCK_N, so the work is
    even for any L while the grid stays fixed. Writes normalised partial outputs and their base-2 lse."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(start_pos_ptr + b).to(tl.int32)
    key_count = tl.where(tl.load(seq_lens_ptr + b) > 0, start + 1, 0)  # seq_lens 0: a padding row, output 0

    g = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + g
    g_valid = g < GROUP
    query_pos = start + tl.zeros([BLOCK_G], tl.int32)
    q_rows = q_ptr + b * stride_qb + head * stride_qh
    q1, q2 = _load_rotated_halves(q_rows, g_valid, query_pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, True)
    q1 = q1.to(k_cache_ptr.dtype.element_ty)
    q2 = q2.to(k_cache_ptr.dtype.element_ty)
    k_base = k_cache_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_cache_ptr + b * stride_vb + kv_head * stride_vh

    split_len = tl.cdiv(tl.cdiv(key_count, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, key_count)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D_PAD], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):  # every key < key_count is at or before the query: no causal mask
        acc, m_i, l_i = _attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0,
                                         hi, query_pos, qk_scale, HEAD_DIM, HALF_PAD, D_PAD,
                                         True, False, BLOCK_N, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # an empty split weighs 0 in the merge
    d = tl.arange(0, D_PAD)
    slot = (b * num_heads + head) * NUM_SPLITS + split  # partials are (B, H, NUM_SPLITS, D)
    tl.store(partial_out_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None],
             mask=g_valid[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(partial_lse_ptr + slot, lse, mask=g_valid)


@triton.jit
def _decode_merge_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, stride_ob, stride_oh, num_heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Grid (B * H,): out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse)."""
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    head = pid % num_heads
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(partial_lse_ptr + pid * NUM_SPLITS + s, mask=s < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weights = tl.math.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    mask = (s < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :]
    parts = tl.load(partial_out_ptr + (pid * NUM_SPLITS + s[:, None]) * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # padding row: 0
    tl.store(out_ptr + b * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ------------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2): delta, dK/dV per key block, dQ per query tile
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
    q1, q2 = _load_rotated_halves(q_base + tok * stride_qt + head * stride_qh, row_valid, tok,
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
    k1, k2 = _load_rotated_halves(k_rows, key_valid, keys, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, False)
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
    _store_unrotated_halves(dk_rows, key_valid, dk1 * sm_scale, dk2 * sm_scale, keys, cos_ptr, sin_ptr,
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
    q1, q2 = _load_rotated_halves(q_rows, row_valid, tok, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, ROPE)
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
    _store_unrotated_halves(dq_rows, row_valid, dq1 * sm_scale, dq2 * sm_scale, tok, cos_ptr, sin_ptr,
                            stride_cos, HALF, HALF_PAD, ROPE)


# ------------------------------------------------------------------------------------------------------
# Tile sizes and launchers
# ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dims(head_dim):
    """(HALF_PAD, D_PAD): the halves and the full head dim padded to powers of two (tl.dot wants >= 16)."""
    if head_dim % 2:
        raise ValueError(f"head dim {head_dim} must be even (RoPE rotates halves)")
    return max(16, triton.next_power_of_2(head_dim // 2)), max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def forward_tiles(device, d_pad, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel.

    GPU: the fused-attention tutorial's H100 shape (BLOCK_M 128 / BLOCK_N 64, 3 stages), 8 warps once the
    (128, D_PAD) fp32 accumulator is 64 KiB. Untuned; an autotune over these four is the next step.
    fp32 dots are IEEE, i.e. FMAs without tensor cores, whose operands sit in registers: at 128 x 64 the
    sm_90 build hits 255 registers with 13 KB of spill loads + stores at D = 128 (10 KB at D = 64) and takes
    229888 B of shared memory, 2.5 KB under H100's 232448. 64 x 16, 8 warps, 2 stages: 102 registers, 53 KB,
    no spill (ptxas -v via tests/kernel_compile_check.py); fp32 is the accuracy path, not the fast one.
    Interpreter: 32 / 16, small enough that a 129-token test crosses several blocks and both stages."""
    if device.type != "cuda":
        return 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 16, 8, 2
    return 128, 64, (8 if d_pad >= 128 else 4), 3


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


def decode_tiles(device, group):
    """(BLOCK_G, BLOCK_N, num_warps, num_stages): the G heads padded to tl.dot's 16-row minimum; 64 keys
    per step keeps 4-deep loads in flight on a memory-bound kernel."""
    block_g = max(16, triton.next_power_of_2(group))
    if device.type != "cuda":
        return block_g, 16, 4, 1
    return block_g, 64, 4, 3


def decode_num_splits(batch, num_kv_heads, cache_len, device):
    """Splits of the KV sequence per (row, KV head). Depends on shapes only, never on the lengths' values,
    so a decode step can be captured in a CUDA graph and replayed at any length.

    GPU: enough programs for ~2 waves over the SMs (B * Hkv = 32 at batch 1 of a 7B -> 9 splits on
    132 SMs), at most one split per 256 cache slots (shorter splits pay more in the merge than they
    save) and at most 64. CPU (interpreter): 4, so the tests cross split boundaries."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(cache_len, 16)))
    waves = triton.cdiv(2 * _sm_count(device.index), batch * num_kv_heads)
    return max(1, min(waves, triton.cdiv(cache_len, 256), 64))


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _bth_strides(x, heads_first):
    """(batch, token, head) strides of a (B, T, H, D) tensor, or of a (B, H, T, D) one when heads_first."""
    return (x.stride(0), x.stride(2), x.stride(1)) if heads_first else (x.stride(0), x.stride(1), x.stride(2))


def write_rotary_kv(k, v, cos, sin, k_dst, v_dst, start_pos=None, seq_lens=None):
    """Rotate k (B, T, Hkv, D) by RoPE at start_pos + t and write it (and v, if given) into the (B, Hkv, *, D)
    destinations at those positions; rows t >= seq_lens are skipped. No host sync: lengths stay on device."""
    B, T, Hkv, D = k.shape
    half_pad, d_pad = _dims(D)
    block_t = 16 if k.device.type != "cuda" else min(64, max(16, triton.next_power_of_2(T)))
    has_lens = seq_lens is not None
    copy_v = v is not None
    v_src, v_out = (v, v_dst) if copy_v else (k, k_dst)  # unused placeholders when only K is written
    _rope_kv_write_kernel[(triton.cdiv(T, block_t), B * Hkv)](
        k, v_src, k_dst, v_out, cos, sin,
        start_pos if has_lens else k, seq_lens if has_lens else k,
        *_bth_strides(k, False), *_bth_strides(v_src, False),
        *_bth_strides(k_dst, True), *_bth_strides(v_out, True), cos.stride(0),
        T, Hkv,
        HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, HAS_LENS=has_lens, COPY_V=copy_v, BLOCK_T=block_t,
        num_warps=4,
    )


def _attention_forward(q, k, k_heads_first, v, v_heads_first, cos, sin, start_pos, seq_lens, causal, rope,
                       store_lse):
    """Launch the forward kernel. q (B, T, H, D); k, v (B, Tk, Hkv, D), or (B, Hkv, Tk, D) where *_heads_first.
    Returns out (B, T, H, D) and, if store_lse, lse (B, Hkv, T, G) fp32 in base 2."""
    B, T, H, D = q.shape
    Hkv = v.shape[1] if v_heads_first else v.shape[2]
    group = H // Hkv
    half_pad, d_pad = _dims(D)
    block_m, block_n, num_warps, num_stages = forward_tiles(q.device, d_pad, k.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, Hkv, T, group, device=q.device, dtype=torch.float32) if store_lse else out
    has_lens = seq_lens is not None
    _attention_fwd_kernel[(triton.cdiv(T * group, block_m), B * Hkv)](
        q, k, v, out, lse, cos if rope else q, sin if rope else q,
        start_pos if has_lens else q, seq_lens if has_lens else q,
        *_bth_strides(q, False), *_bth_strides(k, k_heads_first), *_bth_strides(v, v_heads_first),
        *_bth_strides(out, False), cos.stride(0) if rope else 0,
        T, Hkv, LOG2_E / math.sqrt(D),
        GROUP=group, HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, CAUSAL=causal, ROPE=rope, HAS_LENS=has_lens,
        STORE_LSE=store_lse, DOT_PRECISION=_dot_precision(k.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if store_lse else out


def decode_attention(q, cos, sin, k_cache, v_cache, start_pos, seq_lens, num_splits=None):
    """One new token per row (q (B, 1, H, D), not yet rotated) against a cache that already holds it.
    Row b attends to cache positions [0, start_pos[b]]; rows with seq_lens[b] = 0 return 0.

    Launch shapes depend only on (B, H, Hkv, D, Tmax): capturable in a CUDA graph."""
    B, _, H, D = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    half_pad, d_pad = _dims(D)
    if num_splits is None:
        num_splits = decode_num_splits(B, Hkv, Tmax, q.device)
    block_g, block_n, num_warps, num_stages = decode_tiles(q.device, group)
    partial_out = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
    partial_lse = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, partial_out, partial_lse, cos, sin, start_pos, seq_lens,
        q.stride(0), q.stride(2), *_bth_strides(k_cache, True), *_bth_strides(v_cache, True), cos.stride(0),
        H, Hkv, LOG2_E / math.sqrt(D),
        GROUP=group, HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, NUM_SPLITS=num_splits, BLOCK_G=block_g,
        BLOCK_N=block_n, DOT_PRECISION=_dot_precision(k_cache.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    _decode_merge_kernel[(B * H,)](
        partial_out, partial_lse, out, out.stride(0), out.stride(2), H,
        HEAD_DIM=D, D_PAD=d_pad, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        num_warps=1,
    )
    return out


class FlashAttentionFunction(torch.autograd.Function):
    """Differentiable attention on (B, T, H, D) / (B, T, Hkv, D) inputs without a cache: causal with RoPE at
    positions 0..T-1 (training), or non-causal without RoPE (vision). Saves q, the rotated k, v, out and
    the lse; the backward recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, causal, rope):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        if rope:  # rotate K once into a (B, Hkv, T, D) buffer: the query tiles all read it, the backward too
            B, T, Hkv, D = k.shape
            k_attn = torch.empty(B, Hkv, T, D, device=k.device, dtype=k.dtype)
            write_rotary_kv(k, None, cos, sin, k_attn, None)
        else:
            k_attn = k
        out, lse = _attention_forward(q, k_attn, rope, v, False, cos, sin, None, None, causal, rope, store_lse=True)
        ctx.save_for_backward(q, k_attn, v, out, lse, cos, sin)
        ctx.causal, ctx.rope = causal, rope
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_attn, v, out, lse, cos, sin = ctx.saved_tensors
        causal, rope = ctx.causal, ctx.rope
        dout = _last_dim_contiguous(dout)
        B, T, H, D = q.shape
        Hkv = v.shape[2]
        group = H // Hkv
        half_pad, d_pad = _dims(D)
        block_m, block_n, num_warps, num_stages = backward_tiles(q.device, d_pad, q.dtype)
        delta = torch.empty_like(lse)
        _backward_delta_kernel[(triton.cdiv(T * group, block_m), B * Hkv)](
            out, dout, delta, *_bth_strides(out, False), *_bth_strides(dout, False), T, Hkv,
            GROUP=group, HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=block_m, num_warps=4,
        )
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty(B, T, Hkv, D, device=q.device, dtype=k_attn.dtype)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        common = dict(GROUP=group, HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, CAUSAL=causal, ROPE=rope,
                      DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                      num_warps=num_warps, num_stages=num_stages)
        k_heads_first = rope  # the rotated buffer is (B, Hkv, T, D); an unrotated k is the input itself
        table = (cos, sin, cos.stride(0)) if rope else (q, q, 0)
        sm_scale = 1.0 / math.sqrt(D)
        _backward_dkdv_kernel[(triton.cdiv(T, block_n), B * Hkv)](
            q, k_attn, v, dout, lse, delta, dk, dv, table[0], table[1],
            *_bth_strides(q, False), *_bth_strides(k_attn, k_heads_first), *_bth_strides(v, False),
            *_bth_strides(dout, False), *_bth_strides(dk, False), *_bth_strides(dv, False),
            table[2], T, Hkv, LOG2_E * sm_scale, sm_scale, **common,
        )
        _backward_dq_kernel[(triton.cdiv(T * group, block_m), B * Hkv)](
            q, k_attn, v, dout, lse, delta, dq, table[0], table[1],
            *_bth_strides(q, False), *_bth_strides(k_attn, k_heads_first), *_bth_strides(v, False),
            *_bth_strides(dout, False), *_bth_strides(dq, False),
            table[2], T, Hkv, LOG2_E * sm_scale, sm_scale, **common,
        )
        return dq, dk, dv, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# The ops (same signatures and semantics as llava_fast.ops)
# ------------------------------------------------------------------------------------------------------


def rotary_cached_attention(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens):
    """See llava_fast.ops.rotary_cached_attention. Two launches for prefill (RoPE + cache write, then the
    attention reading K/V from the cache), three for decode (cache write, split-KV, merge); none syncs."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in the head dim (they are written in place)")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    write_rotary_kv(k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens)
    if q.shape[1] == 1:
        return decode_attention(q, cos, sin, k_cache, v_cache, start_pos, seq_lens)
    return _attention_forward(q, k_cache, True, v_cache, True, cos, sin, start_pos, seq_lens,
                              causal=True, rope=True, store_lse=False)


def rotary_causal_attention(q, k, v, cos, sin):
    """See llava_fast.ops.rotary_causal_attention (differentiable in q, k, v)."""
    return FlashAttentionFunction.apply(q, k, v, cos, sin, True, True)


def vision_attention(q, k, v):
    """See llava_fast.ops.vision_attention (differentiable in q, k, v, should the tower be unfrozen)."""
    return FlashAttentionFunction.apply(q, k, v, None, None, False, False)


TRITON_OPS = {
    "rotary_cached_attention": rotary_cached_attention,
    "rotary_causal_attention": rotary_causal_attention,
    "vision_attention": vision_attention,
}
