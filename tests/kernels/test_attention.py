"""Attention kernels (llava_fast.kernels.attention_prefill, _decode, _backward and their shared
attention_common) against the torch references in llava_fast.ops: prefill and decode with a KV cache
(outputs and cache contents), the training forward/backward, and the CLIP encoder's attention.

Tolerances follow the flash-attention rule: the kernel's error against an fp32 reference may be at most
2x the error the plain-PyTorch reference makes in the same dtype, plus one ulp at the output's scale.
fp32 has no lower-precision baseline, so it gets 1e-5 relative to the output's scale (summation-order
noise; ~1e-6 measured). Under the interpreter the tiles are 32 x 16 (forward), 16 x 16 (backward) and
4 decode splits, so the 33- and 129-token cases cross tile and split boundaries and both causal stages.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llava_fast import ops
from llava_fast.kernels import attention_backward, attention_common, attention_decode, attention_prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter gets tl.dot on bf16 wrong, so bf16 runs on a GPU only.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="torch.bfloat16")
DTYPES = [torch.float32, torch.float16, BF16]
ROPE_THETA = 10000.0
reference_cached = ops.TORCH_OPS["rotary_cached_attention"]  # the torch oracle even under the triton backend
reference_causal = ops.TORCH_OPS["rotary_causal_attention"]
reference_vision = ops.TORCH_OPS["vision_attention"]


def assert_close_to_reference(name, actual, same_dtype_reference, fp32_reference):
    assert actual.dtype == same_dtype_reference.dtype, f"{name}: dtype {actual.dtype}"
    assert actual.shape == same_dtype_reference.shape, f"{name}: shape {tuple(actual.shape)}"
    reference = fp32_reference.float()
    scale = max(reference.abs().max().item(), 1e-3)  # floored: a lone token's exactly-zero dq still has fp32 noise
    kernel_error = (actual.float() - reference).abs().max().item()
    if actual.dtype == torch.float32:
        allowed = 1e-5 * max(1.0, scale)
    else:
        torch_error = (same_dtype_reference.float() - reference).abs().max().item()
        allowed = 2 * torch_error + torch.finfo(actual.dtype).eps * scale
    assert kernel_error <= allowed, f"{name}: error {kernel_error:.3g} > allowed {allowed:.3g}"


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def make_cached_inputs(B, T, H, Hkv, D, cache_len, dtype):
    """q, k, v, a cache whose every slot holds random data (stale turns, so leaks show), cos, sin."""
    q, k, v = randn(B, T, H, D, dtype=dtype), randn(B, T, Hkv, D, dtype=dtype), randn(B, T, Hkv, D, dtype=dtype)
    k_cache, v_cache = randn(B, Hkv, cache_len, D, dtype=dtype), randn(B, Hkv, cache_len, D, dtype=dtype)
    cos, sin = ops.rope_tables(D, cache_len, ROPE_THETA, device=DEVICE)
    return q, k, v, k_cache, v_cache, cos, sin


def check_cached_attention(q, k, v, k_cache, v_cache, cos, sin, start_pos, seq_lens, window=0):
    """Run kernel, same-dtype reference and fp32 reference on copies of the cache; compare outputs and caches.
    window > 0: Mistral's sliding window, each position sees its last `window` keys."""
    start_pos = torch.tensor(start_pos, device=DEVICE)
    seq_lens = torch.tensor(seq_lens, device=DEVICE)
    caches = {name: (k_cache.clone(), v_cache.clone()) for name in ("kernel", "torch")}
    caches["fp32"] = (k_cache.float(), v_cache.float())
    out = attention_prefill.rotary_cached_attention(q, k, v, cos, sin, *caches["kernel"], start_pos, seq_lens,
                                                    window)
    same_dtype = reference_cached(q, k, v, cos, sin, *caches["torch"], start_pos, seq_lens, window)
    fp32 = reference_cached(q.float(), k.float(), v.float(), cos, sin, *caches["fp32"], start_pos, seq_lens,
                            window)
    assert_close_to_reference("out", out, same_dtype, fp32)
    # Whole caches: written slots hold the rotated K / V; the prefix and the slots past each row's new
    # tokens (padding never reaches the cache) must be untouched.
    for i, name in enumerate(("k_cache", "v_cache")):
        assert_close_to_reference(name, caches["kernel"][i], caches["torch"][i], caches["fp32"][i])
    padded = torch.arange(q.shape[1], device=DEVICE)[None, :] >= seq_lens[:, None]  # (B, T)
    assert torch.all(out[padded] == 0), "padded query rows must be 0"
    return out


# (B, T, H, Hkv, D, start_pos, seq_lens): GQA groups 4, 1, 8, 2; lengths 1, 5, 7, 33, 129; a
# multi-turn batch continuing cached conversations (start_pos > 0) mixed with a fresh one.
PREFILL_CASES = {
    "mixed_lengths_g4_d64": (3, 7, 4, 1, 64, [0, 0, 0], [7, 1, 5]),
    # start 46 and 62 put a tile's first causal boundary one key before a 16- (CPU) / 64-key (GPU) block edge
    "multi_turn_g1_d80": (3, 7, 2, 2, 80, [5, 46, 62], [7, 3, 6]),
    "long_g8_d128": (1, 129, 8, 1, 128, [0], [129]),
    "multi_turn_long_g2_d96": (2, 33, 4, 2, 96, [40, 0], [20, 33]),
}


@pytest.mark.parametrize("case", PREFILL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_matches_reference(dtype, case):
    torch.manual_seed(0)
    B, T, H, Hkv, D, start_pos, seq_lens = PREFILL_CASES[case]
    # The reference rotates padded rows too, so its tables must reach start_pos + T; spare slots stay untouched.
    cache_len = max(start_pos) + T + 9
    check_cached_attention(*make_cached_inputs(B, T, H, Hkv, D, cache_len, dtype), start_pos, seq_lens)


# (B, H, Hkv, D, cache_len, start_pos, seq_lens): ragged lengths from an empty cache (the first token)
# to a full one; a seq_lens of 0 marks a finished row that must return 0 and leave its cache alone.
DECODE_CASES = {
    "ragged_g8_d128": (3, 8, 1, 128, 100, [0, 37, 99], [1, 1, 1]),
    "ragged_g4_d80_with_padding_row": (3, 8, 2, 80, 70, [12, 69, 5], [1, 1, 0]),
    "g1_d64": (2, 2, 2, 64, 40, [17, 3], [1, 1]),
}


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_matches_reference(dtype, case):
    torch.manual_seed(0)
    B, H, Hkv, D, cache_len, start_pos, seq_lens = DECODE_CASES[case]
    check_cached_attention(*make_cached_inputs(B, 1, H, Hkv, D, cache_len, dtype), start_pos, seq_lens)


# (B, T, H, Hkv, D, start_pos, seq_lens, window): windows shorter than, across and longer than a 16-key block
# (the interpreter's BLOCK_N) and than the 32-row tiles; rows whose window starts before, at and after key 0;
# a padded row; a cached prefix longer than the window (multi-turn).
WINDOW_PREFILL_CASES = {
    "w7_fresh_odd_g4_d64": (2, 45, 4, 1, 64, [0, 0], [45, 30], 7),
    "w1_g2_d80": (1, 19, 4, 2, 80, [0], [19], 1),
    "w20_multi_turn_g1_d64": (3, 33, 2, 2, 64, [40, 3, 0], [33, 17, 0], 20),
    "w37_long_g8_d128": (1, 129, 8, 1, 128, [11], [129], 37),
    "w_longer_than_context": (2, 9, 4, 1, 64, [5, 0], [9, 9], 500),
}


@pytest.mark.parametrize("case", WINDOW_PREFILL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_sliding_window_matches_reference(dtype, case):
    torch.manual_seed(0)
    B, T, H, Hkv, D, start_pos, seq_lens, window = WINDOW_PREFILL_CASES[case]
    cache_len = max(start_pos) + T + 9
    check_cached_attention(*make_cached_inputs(B, T, H, Hkv, D, cache_len, dtype), start_pos, seq_lens, window)


# (B, H, Hkv, D, cache_len, start_pos, seq_lens, window): rows inside and past the window, a window of 1 (the
# token alone), one not a multiple of the 16-key block, split across the 4 interpreter splits, a padding row.
WINDOW_DECODE_CASES = {
    "w7_g4_d64": (3, 8, 2, 64, 100, [0, 6, 99], [1, 1, 1], 7),
    "w1_g1_d80": (2, 2, 2, 80, 40, [0, 31], [1, 1], 1),
    "w53_g8_d128_padding_row": (3, 8, 1, 128, 130, [120, 52, 77], [1, 1, 0], 53),
}


@pytest.mark.parametrize("case", WINDOW_DECODE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_sliding_window_matches_reference(dtype, case):
    torch.manual_seed(0)
    B, H, Hkv, D, cache_len, start_pos, seq_lens, window = WINDOW_DECODE_CASES[case]
    check_cached_attention(*make_cached_inputs(B, 1, H, Hkv, D, cache_len, dtype), start_pos, seq_lens, window)


def test_reference_sliding_window_is_the_band_of_keys():
    """The torch reference (the oracle above) against attention written out per query position: softmax over
    keys (pos - window, pos] only. Prefill from empty (T > window), a padded batch continuing a cache, and
    decode, all through the reference's three paths."""
    torch.manual_seed(0)
    B, H, Hkv, D, window, Tmax = 2, 4, 2, 16, 5, 40
    cos, sin = ops.rope_tables(D, Tmax, ROPE_THETA)

    def explicit(q, k_cache, v_cache, positions):  # q (B, T, H, D) rotated; cache holds rotated K
        out = torch.zeros_like(q)
        for b in range(B):
            for t, pos in enumerate(positions[b]):
                keys = range(max(0, pos - window + 1), pos + 1)
                for h in range(H):
                    kk, vv = k_cache[b, h // (H // Hkv), list(keys)], v_cache[b, h // (H // Hkv), list(keys)]
                    p = torch.softmax(kk @ q[b, t, h] / D ** 0.5, 0)
                    out[b, t, h] = p @ vv
        return out

    k_cache, v_cache = torch.randn(B, Hkv, Tmax, D), torch.randn(B, Hkv, Tmax, D)
    for start, T, lens in ((None, 13, None), ([13, 13], 6, [6, 4]), ([19, 17], 1, None)):
        q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
        start_t = None if start is None else torch.tensor(start)
        lens_t = None if lens is None else torch.tensor(lens)
        out = reference_cached(q, k, v, cos, sin, k_cache, v_cache, start_t, lens_t, window)
        positions = [[(0 if start is None else start[b]) + t for t in range(T)] for b in range(B)]
        pos_t = torch.tensor(positions)
        expected = explicit(ops.apply_rope(q, cos, sin, pos_t), k_cache, v_cache, positions)
        valid = torch.arange(T)[None] < torch.tensor(lens or [T] * B)[:, None]  # (B, T)
        torch.testing.assert_close(out[valid], expected[valid], atol=1e-5, rtol=1e-5)
        causal = reference_cached(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), start_t, lens_t)
        assert (causal[valid] - out[valid]).abs().max() > 1e-2  # the window changes the result


def test_training_attention_sliding_window_forward():
    """The training op's forward with a window matches the reference; with gradients wanted it is refused by
    name (the backward kernels have no window)."""
    torch.manual_seed(0)
    B, T, H, Hkv, D, window = 2, 45, 4, 2, 64, 9
    cos, sin = ops.rope_tables(D, T, ROPE_THETA, device=DEVICE)
    q, k, v = randn(B, T, H, D, dtype=torch.float32), randn(B, T, Hkv, D, dtype=torch.float32), randn(
        B, T, Hkv, D, dtype=torch.float32)
    expected = reference_causal(q, k, v, cos, sin, window)
    assert_close_to_reference("out", attention_backward.rotary_causal_attention(q, k, v, cos, sin, window),
                              expected, expected)
    assert (reference_causal(q, k, v, cos, sin) - expected).abs().max() > 1e-2
    with pytest.raises(NotImplementedError, match="sliding_window=9.*LLAVA_FAST_KERNELS=torch"):
        attention_backward.rotary_causal_attention(q.requires_grad_(), k, v, cos, sin, window)


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_split_merge_any_split_count(num_splits):
    """The merge is exact for any split count, including splits left empty (16 splits over 40 keys)."""
    torch.manual_seed(0)
    q, k, v, k_cache, v_cache, cos, sin = make_cached_inputs(2, 1, 4, 1, 64, 48, torch.float32)
    start_pos, seq_lens = torch.tensor([39, 6], device=DEVICE), torch.tensor([1, 1], device=DEVICE)
    expected = reference_cached(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), start_pos, seq_lens)
    attention_common.write_rotary_kv(k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens)
    out = attention_decode.decode_attention(q, cos, sin, k_cache, v_cache, start_pos, seq_lens, num_splits=num_splits)
    assert_close_to_reference("out", out, expected, expected)


class RecordHostSyncs(TorchDispatchMode):
    """Records every op that copies a tensor's value to the host (.item(), int(), bool(), .tolist()) and
    the shape of every tensor created: a CUDA graph can capture neither a sync nor a shape that follows
    the data."""

    SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")

    def __init__(self):
        super().__init__()
        self.syncs, self.created = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC_OPS:
            self.syncs.append(func._schema.name)
        out = func(*args, **(kwargs or {}))
        if func._schema.name in ("aten::empty", "aten::empty_strided", "aten::empty_like"):
            self.created.append(tuple(out.shape))
        return out


def test_decode_launch_has_no_host_sync_and_fixed_shapes():
    torch.manual_seed(0)
    B, H, Hkv, D, cache_len = 3, 8, 2, 64, 64
    q, k, v, k_cache, v_cache, cos, sin = make_cached_inputs(B, 1, H, Hkv, D, cache_len, torch.float16)
    seq_lens = torch.ones(B, dtype=torch.int32, device=DEVICE)
    records = []
    for lengths in ([0, 5, 9], [63, 1, 40]):
        start_pos = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        with RecordHostSyncs() as record:
            attention_prefill.rotary_cached_attention(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens)
        assert record.syncs == [], f"decode synchronised with the host via {record.syncs}"
        records.append(record.created)
    assert records[0] == records[1], "decode buffers (and so the grid) changed with the lengths' values"
    num_splits = attention_decode.decode_num_splits(B, Hkv, cache_len, q.device)  # a function of shapes alone
    assert (B, H, num_splits, D) in records[0], "partial outputs are (B, H, num_splits, D)"
    # The recorder does catch syncs: the reference reads lengths on the host.
    with RecordHostSyncs() as record:
        reference_cached(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens)
    assert record.syncs


def test_prefill_has_no_host_sync():
    torch.manual_seed(0)
    q, k, v, k_cache, v_cache, cos, sin = make_cached_inputs(2, 5, 4, 2, 64, 16, torch.float32)
    start_pos, seq_lens = torch.tensor([3, 0], device=DEVICE), torch.tensor([5, 2], device=DEVICE)
    with RecordHostSyncs() as record:
        attention_prefill.rotary_cached_attention(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens)
    assert record.syncs == []


def test_decode_num_splits_depends_on_shapes_only():
    cpu = torch.device("cpu")
    assert attention_decode.decode_num_splits(1, 8, 4096, cpu) == 4
    assert attention_decode.decode_num_splits(1, 8, 20, cpu) == 2  # never more splits than 16-key blocks
    assert attention_decode.decode_num_splits(1, 8, 8, cpu) == 1


def run_with_grads(fn, inputs, dout, *extra):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, *extra)
    return (out,) + torch.autograd.grad(out, leaves, dout)


def check_forward_backward(kernel_fn, reference_fn, q, k, v, *extra):
    dout = torch.randn_like(q)
    got = run_with_grads(kernel_fn, (q, k, v), dout, *extra)
    same_dtype = run_with_grads(reference_fn, (q, k, v), dout, *extra)
    fp32 = run_with_grads(reference_fn, (q.float(), k.float(), v.float()), dout.float(), *extra)
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), got, same_dtype, fp32):
        assert_close_to_reference(name, a, s, r)


# (B, T, H, Hkv, D): GQA groups 4, 8, 1; T = 1 (a lone token), 7, 129 (crosses tiles, both stages).
TRAINING_CASES = {
    "t1_g4_d64": (2, 1, 4, 1, 64),
    "t7_g4_d64": (2, 7, 4, 1, 64),
    "t129_g8_d80": (1, 129, 8, 1, 80),
    "t33_g1_d128": (2, 33, 2, 2, 128),
}


@pytest.mark.parametrize("case", TRAINING_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_attention_forward_backward(dtype, case):
    torch.manual_seed(0)
    B, T, H, Hkv, D = TRAINING_CASES[case]
    cos, sin = ops.rope_tables(D, T + 5, ROPE_THETA, device=DEVICE)
    q, k, v = randn(B, T, H, D, dtype=dtype), randn(B, T, Hkv, D, dtype=dtype), randn(B, T, Hkv, D, dtype=dtype)
    check_forward_backward(attention_backward.rotary_causal_attention, reference_causal, q, k, v, cos, sin)


def test_training_attention_strided_inputs():
    """q, k, v as views into one fused QKV projection output (the model's layout), dout transposed."""
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 19, 4, 2, 64
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    cos, sin = ops.rope_tables(D, T, ROPE_THETA, device=DEVICE)
    check_forward_backward(attention_backward.rotary_causal_attention, reference_causal, q, k, v, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vision_attention_forward_backward(dtype):
    torch.manual_seed(0)
    q, k, v = (randn(2, 37, 2, 64, dtype=dtype) for _ in range(3))
    check_forward_backward(attention_backward.vision_attention, reference_vision, q, k, v)


def test_vision_attention_clip_length():
    """CLIP ViT-L/14 at 336 px: 577 tokens (a 1-key tail block after 36 full ones), D = 64, fp16."""
    torch.manual_seed(0)
    q, k, v = (randn(1, 577, 1, 64, dtype=torch.float16) for _ in range(3))
    out = attention_backward.vision_attention(q, k, v)
    assert_close_to_reference("out", out, reference_vision(q, k, v),
                              reference_vision(q.float(), k.float(), v.float()))


def test_triton_ops_match_contract():
    families = (attention_common, attention_prefill, attention_decode, attention_backward)
    names = [name for family in families for name in family.TRITON_OPS]
    assert sorted(names) == ["rotary_cached_attention", "rotary_causal_attention", "vision_attention"]  # once each
    assert set(names) <= set(ops.OP_NAMES)
