"""Flash-attention forward in Triton: prefill against the KV cache, the training forward (with the lse the
backward needs) and the CLIP encoder's non-causal attention. Math, layouts and precision: attention_common.py.

  _attention_fwd_kernel   causal (prefill, training) or not (vision); per-row start_pos / seq_lens read from
                          device memory (a right-padded, variable-length batch). Causal key blocks are split
                          into an unmasked stage (all keys visible to every row of the tile) and a masked
                          diagonal stage; with a sliding window, a masked stage before them holds the
                          window's lower edge and the keys before it are skipped. FLOPs (causal, S cached
                          tokens): 4 * B*H*D * (T*S + T^2/2); prefill from zero: 4*B*H*T^2*D/2; vision:
                          4*N*H*T^2*D.

The op `rotary_cached_attention` (torch reference: `llava_fast.ops.rotary_cached_attention`) writes the new
K/V into the cache, then runs this kernel for a prompt (T > 1) or attention_decode.py's split-KV kernels for
one new token.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_common import (
    LOG2_E,
    attend_kv_block,
    bth_strides,
    dot_precision,
    head_dims,
    last_dim_contiguous,
    load_rotated_halves,
    row_span,
    write_rotary_kv,
)
from .attention_decode import decode_attention

# ------------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cos_ptr, sin_ptr, start_pos_ptr, seq_lens_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_cos,
    T, num_kv_heads, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, HAS_LENS: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T * G, BLOCK_M), B * Hkv). Query tile = BLOCK_M packed (token, head) rows of one KV head.

    Row b's new token t sits at position start_pos[b] + t and sees keys [0, start_pos[b] + t] (causal; with
    window > 0 only (start_pos[b] + t - window, start_pos[b] + t]) or [0, start_pos[b] + seq_lens[b]) (not
    causal); rows t >= seq_lens[b] are padding and store 0."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    start, n_new = row_span(start_pos_ptr, seq_lens_ptr, b, T, HAS_LENS)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = tok < n_new
    query_pos = start + tok
    q_rows = q_ptr + b * stride_qb + tok * stride_qt + head * stride_qh
    q1, q2 = load_rotated_halves(q_rows, row_valid, query_pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, ROPE)
    q1 = q1.to(k_ptr.dtype.element_ty)
    q2 = q2.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh

    # Key range of the tile. Keys [full_lo, full_end) are visible to every row (no masks); [full_end,
    # key_end) is the causal diagonal / sequence tail, masked; [key_lo, full_lo) the sliding window's lower
    # edge, masked (empty without a window), and keys before key_lo are outside every row's window. An
    # all-padding tile attends to nothing.
    tok_lo = (pid_m * BLOCK_M) // GROUP
    tile_has_rows = tok_lo < n_new
    if CAUSAL:
        tok_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
        full_end = tl.where(tile_has_rows, ((start + tok_lo + 1) // BLOCK_N) * BLOCK_N, 0)
        key_end = tl.where(tile_has_rows, start + tok_hi + 1, 0)
        windowed = tile_has_rows & (window > 0)
        key_lo = tl.where(windowed, (tl.maximum(start + tok_lo - window + 1, 0) // BLOCK_N) * BLOCK_N, 0)
        full_lo = tl.where(windowed, tl.cdiv(tl.maximum(start + tok_hi - window + 1, 0), BLOCK_N) * BLOCK_N, 0)
        full_lo = tl.minimum(full_lo, full_end)
    else:
        kv_len = start + n_new
        full_end = tl.where(tile_has_rows, (kv_len // BLOCK_N) * BLOCK_N, 0)
        key_end = tl.where(tile_has_rows, kv_len, 0)
        key_lo = 0
        full_lo = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n0 in range(key_lo, full_lo, BLOCK_N):
        acc, m_i, l_i = attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0,
                                        key_end, query_pos, window, qk_scale, HEAD_DIM, HALF_PAD, D_PAD,
                                        True, CAUSAL, BLOCK_N, DOT_PRECISION)
    for n0 in range(full_lo, full_end, BLOCK_N):
        acc, m_i, l_i = attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0,
                                        key_end, query_pos, window, qk_scale, HEAD_DIM, HALF_PAD, D_PAD,
                                        False, CAUSAL, BLOCK_N, DOT_PRECISION)
    for n0 in range(full_end, key_end, BLOCK_N):
        acc, m_i, l_i = attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0,
                                        key_end, query_pos, window, qk_scale, HEAD_DIM, HALF_PAD, D_PAD,
                                        True, CAUSAL, BLOCK_N, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(row_valid[:, None], acc / l_safe[:, None], 0.0)
    d = tl.arange(0, D_PAD)
    o_ptrs = out_ptr + b * stride_ob + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(tok < T)[:, None] & (d < HEAD_DIM)[None, :])
    if STORE_LSE:  # (B, Hkv, T, G) = packed rows; base-2 logsumexp of the scaled scores
        tl.store(lse_ptr + pid_bh * T * GROUP + rows, m_i + tl.log2(l_safe), mask=tok < T)


# ------------------------------------------------------------------------------------------------------
# Tile sizes and launcher
# ------------------------------------------------------------------------------------------------------


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


def flash_forward(q, k, k_heads_first, v, v_heads_first, cos, sin, start_pos, seq_lens, causal, rope,
                  store_lse, window=0):
    """Launch the forward kernel. q (B, T, H, D); k, v (B, Tk, Hkv, D), or (B, Hkv, Tk, D) where *_heads_first.
    window > 0 (causal only): each position sees its last `window` keys (Mistral's sliding window).
    Returns out (B, T, H, D) and, if store_lse, lse (B, Hkv, T, G) fp32 in base 2."""
    B, T, H, D = q.shape
    Hkv = v.shape[1] if v_heads_first else v.shape[2]
    group = H // Hkv
    half_pad, d_pad = head_dims(D)
    block_m, block_n, num_warps, num_stages = forward_tiles(q.device, d_pad, k.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, Hkv, T, group, device=q.device, dtype=torch.float32) if store_lse else out
    has_lens = seq_lens is not None
    _attention_fwd_kernel[(triton.cdiv(T * group, block_m), B * Hkv)](
        q, k, v, out, lse, cos if rope else q, sin if rope else q,
        start_pos if has_lens else q, seq_lens if has_lens else q,
        *bth_strides(q, False), *bth_strides(k, k_heads_first), *bth_strides(v, v_heads_first),
        *bth_strides(out, False), cos.stride(0) if rope else 0,
        T, Hkv, LOG2_E / math.sqrt(D), window,
        GROUP=group, HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, CAUSAL=causal, ROPE=rope, HAS_LENS=has_lens,
        STORE_LSE=store_lse, DOT_PRECISION=dot_precision(k.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if store_lse else out


# ------------------------------------------------------------------------------------------------------
# The op (same signature and semantics as llava_fast.ops)
# ------------------------------------------------------------------------------------------------------


def rotary_cached_attention(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens, window=0):
    """See llava_fast.ops.rotary_cached_attention. Two launches for prefill (RoPE + cache write, then the
    attention reading K/V from the cache), three for decode (cache write, split-KV, merge); none syncs."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in the head dim (they are written in place)")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    write_rotary_kv(k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens)
    if q.shape[1] == 1:
        return decode_attention(q, cos, sin, k_cache, v_cache, start_pos, seq_lens, window=window)
    return flash_forward(q, k_cache, True, v_cache, True, cos, sin, start_pos, seq_lens,
                         causal=True, rope=True, store_lse=False, window=window)


TRITON_OPS = {"rotary_cached_attention": rotary_cached_attention}
