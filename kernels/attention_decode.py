"""Split-KV decode attention in Triton (Flash-Decoding): one new token per row against the KV cache.
Math, layouts and precision: attention_common.py. At batch 1 one program per (row, KV head) would leave most
SMs idle (32 programs for a 7B on 132 SMs), so the cache is split and the parts merged by log-sum-exp.

  _decode_split_kernel    grid (B, Hkv, num_splits) fixed by shapes; each program reads its row's length
                          from device memory and takes 1/num_splits of it, so the launch is CUDA-graph
                          capturable (no .item() anywhere on this path).
                          Bytes: 2 * B*Hkv*L*D * es for the cache (K and V read once per KV head).
  _decode_merge_kernel    log-sum-exp merge of the splits: reads B*H*num_splits*(D+1) fp32.

Reached through `rotary_cached_attention` (attention_prefill.py) when T = 1; torch reference:
`llava_fast.ops.rotary_cached_attention`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .attention_common import LOG2_E, attend_kv_block, bth_strides, dot_precision, head_dims, load_rotated_halves

# ------------------------------------------------------------------------------------------------------
# Kernels: split-KV + log-sum-exp merge
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, partial_out_ptr, partial_lse_ptr, cos_ptr, sin_ptr,
    start_pos_ptr, seq_lens_ptr,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_cos,
    num_heads, num_kv_heads, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (B, Hkv, NUM_SPLITS). All G query heads of the group against split `split` of row b's keys.

    The row's keys [lo, L) are read here, on the device: L = start_pos[b] + 1 (0 if seq_lens[b] = 0), lo = 0,
    or with a sliding window (window > 0) lo = max(L - window, 0). The split covers [lo + split * S,
    lo + (split + 1) * S) with S = cdiv(L - lo, NUM_SPLITS) rounded up to BLOCK_N, so the work is even for any
    L while the grid stays fixed. Writes normalised partial outputs and their base-2 lse."""
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
    q1, q2 = load_rotated_halves(q_rows, g_valid, query_pos, cos_ptr, sin_ptr, stride_cos, HALF, HALF_PAD, True)
    q1 = q1.to(k_cache_ptr.dtype.element_ty)
    q2 = q2.to(k_cache_ptr.dtype.element_ty)
    k_base = k_cache_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_cache_ptr + b * stride_vb + kv_head * stride_vh

    first_key = tl.where(window > 0, tl.maximum(key_count - window, 0), 0)
    split_len = tl.cdiv(tl.cdiv(key_count - first_key, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first_key + split * split_len
    hi = tl.minimum(lo + split_len, key_count)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D_PAD], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):  # every key in [first_key, key_count) is visible: no causal mask
        acc, m_i, l_i = attend_kv_block(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0,
                                        hi, query_pos, window, qk_scale, HEAD_DIM, HALF_PAD, D_PAD,
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
# Tile sizes, splits and launcher
# ------------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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


def decode_attention(q, cos, sin, k_cache, v_cache, start_pos, seq_lens, num_splits=None, window=0):
    """One new token per row (q (B, 1, H, D), not yet rotated) against a cache that already holds it.
    Row b attends to cache positions [0, start_pos[b]] (window > 0: the last `window` of them); rows with
    seq_lens[b] = 0 return 0.

    Launch shapes depend only on (B, H, Hkv, D, Tmax): capturable in a CUDA graph."""
    B, _, H, D = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    half_pad, d_pad = head_dims(D)
    if num_splits is None:
        num_splits = decode_num_splits(B, Hkv, Tmax, q.device)
    block_g, block_n, num_warps, num_stages = decode_tiles(q.device, group)
    partial_out = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
    partial_lse = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, partial_out, partial_lse, cos, sin, start_pos, seq_lens,
        q.stride(0), q.stride(2), *bth_strides(k_cache, True), *bth_strides(v_cache, True), cos.stride(0),
        H, Hkv, LOG2_E / math.sqrt(D), window,
        GROUP=group, HEAD_DIM=D, HALF_PAD=half_pad, D_PAD=d_pad, NUM_SPLITS=num_splits, BLOCK_G=block_g,
        BLOCK_N=block_n, DOT_PRECISION=dot_precision(k_cache.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    _decode_merge_kernel[(B * H,)](
        partial_out, partial_lse, out, out.stride(0), out.stride(2), H,
        HEAD_DIM=D, D_PAD=d_pad, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        num_warps=1,
    )
    return out


TRITON_OPS = {}  # decode is one path of rotary_cached_attention (attention_prefill.py)
