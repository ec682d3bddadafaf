"""Fused, chunked lm_head + cross-entropy against llava_fast.ops.linear_cross_entropy with autograd.

Tolerances: fp32 is compared with the fp32 reference directly (rtol 1e-5); fp16/bf16 follow the
flash-attention rule: the kernel's error against an fp32 reference may be at most 2x the error that the
plain-PyTorch reference makes in the same dtype, plus one ulp at the output's scale.
"""

import functools
import math

import pytest
import torch
from accuracy import BF16, DEVICE, assert_close_to_reference

from llava_fast import ops
from llava_fast.kernels import cross_entropy

reference_linear_cross_entropy = ops.TORCH_OPS["linear_cross_entropy"]
# fp32 losses are O(1) and gradients O(1/N): a tighter absolute floor than the shared 1e-5.
assert_close_to_reference = functools.partial(assert_close_to_reference, fp32_atol=1e-6)




def make_inputs(n_tokens, n_channels, n_vocab, dtype, ignore_every=4, ignore_index=-100, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(n_tokens, n_channels, device=DEVICE).to(dtype)
    # Scaled so the logits have std ~2: a peaked but not one-hot softmax, like a trained LM.
    weight = (2 * torch.randn(n_vocab, n_channels, device=DEVICE) / math.sqrt(n_channels)).to(dtype)
    labels = torch.randint(0, n_vocab, (n_tokens,), device=DEVICE)
    labels[::ignore_every] = ignore_index  # prompt tokens and padding are ignored in LLaVA's training
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, grad_scale=1.0, **kwargs):
    """Loss and (dhidden, dweight) for loss * grad_scale, the way a trainer's loss scaling calls it."""
    hidden, weight = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss = fn(hidden, weight, labels, **kwargs)
    return (loss,) + torch.autograd.grad(loss * grad_scale, [hidden, weight])


CASES = [(37, 64, 517), (50, 48, 1000), (13, 32, 32064)]  # V = 32064: LLaVA-1.5's vocab, 8 blocks of 4096


@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunks_of_8"])
@pytest.mark.parametrize("n_tokens,n_channels,n_vocab", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16], ids=str)
def test_matches_reference(dtype, n_tokens, n_channels, n_vocab, chunked):
    hidden, weight, labels = make_inputs(n_tokens, n_channels, n_vocab, dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    max_chunk_bytes = 8 * n_vocab * itemsize if chunked else cross_entropy.MAX_CHUNK_LOGITS_BYTES
    ours = loss_and_grads(cross_entropy.linear_cross_entropy_chunked, hidden, weight, labels, grad_scale=2.5,
                          max_chunk_bytes=max_chunk_bytes)
    same_dtype = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_scale=2.5)
    fp32 = loss_and_grads(reference_linear_cross_entropy, hidden.float(), weight.float(), labels, grad_scale=2.5)
    for name, a, b, c in zip(["loss", "dhidden", "dweight"], ours, same_dtype, fp32):
        assert_close_to_reference(name, a, b, c)


def test_public_op_matches_reference():
    hidden, weight, labels = make_inputs(37, 64, 517, torch.float32, seed=1)
    ours = loss_and_grads(cross_entropy.linear_cross_entropy, hidden, weight, labels)
    theirs = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunks_never_hold_all_logits(monkeypatch):
    """The kernel only ever sees chunk-sized logits, chunk_rows < N, and the result is unchanged."""
    hidden, weight, labels = make_inputs(37, 64, 1000, torch.float32, seed=2)
    chunk_shapes = []
    launch = cross_entropy.cross_entropy_loss_and_grad_

    def recording_launch(logits, *args):
        chunk_shapes.append(tuple(logits.shape))
        return launch(logits, *args)

    monkeypatch.setattr(cross_entropy, "cross_entropy_loss_and_grad_", recording_launch)
    max_chunk_bytes = 10 * 1000 * 4 + 100  # room for 10 rows of fp32 logits, not 11
    ours = loss_and_grads(cross_entropy.linear_cross_entropy_chunked, hidden, weight, labels,
                          max_chunk_bytes=max_chunk_bytes)
    assert chunk_shapes == [(10, 1000)] * 3 + [(7, 1000)]
    theirs = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_rows_heuristic():
    # LLaMA's vocabulary in bf16: 256 MiB holds 4194 rows, rounded down to whole 128-row GEMM tiles.
    assert cross_entropy.chunk_rows_for(8192, 32000, torch.bfloat16) == 4096
    assert cross_entropy.chunk_rows_for(100, 32000, torch.bfloat16) == 100  # never more rows than tokens
    assert cross_entropy.chunk_rows_for(100, 10**9, torch.float32) == 1  # at least one row


def test_custom_ignore_index():
    hidden, weight, labels = make_inputs(37, 64, 517, torch.float32, seed=3, ignore_index=7)
    ours = loss_and_grads(cross_entropy.linear_cross_entropy, hidden, weight, labels, ignore_index=7)
    theirs = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, ignore_index=7)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    """A batch whose answers were all truncated away: loss 0 and zero grads, not the reference's 0/0 NaN."""
    hidden, weight, labels = make_inputs(13, 32, 517, torch.float32, seed=4)
    labels[:] = -100
    loss, dhidden, dweight = loss_and_grads(cross_entropy.linear_cross_entropy, hidden, weight, labels)
    assert loss.item() == 0.0
    assert not dhidden.any() and not dweight.any()


def test_frozen_weight_or_hidden():
    """LLaVA's stage 1 freezes the LLM: only the trainable input gets (and costs) a gradient GEMM."""
    hidden, weight, labels = make_inputs(37, 64, 517, torch.float32, seed=5)
    for trainable in ("hidden", "weight"):
        h = hidden.clone().requires_grad_(trainable == "hidden")
        w = weight.clone().requires_grad_(trainable == "weight")
        (grad,) = torch.autograd.grad(cross_entropy.linear_cross_entropy(h, w, labels),
                                      [h if trainable == "hidden" else w])
        h_ref = hidden.clone().requires_grad_(trainable == "hidden")
        w_ref = weight.clone().requires_grad_(trainable == "weight")
        (grad_ref,) = torch.autograd.grad(reference_linear_cross_entropy(h_ref, w_ref, labels),
                                          [h_ref if trainable == "hidden" else w_ref])
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_no_grad_evaluation():
    hidden, weight, labels = make_inputs(37, 64, 517, torch.float32, seed=6)
    with torch.no_grad():
        loss = cross_entropy.linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference_linear_cross_entropy(hidden.detach(), weight, labels), rtol=1e-5,
                               atol=1e-6)


def test_second_backward_is_refused():
    hidden, weight, labels = make_inputs(13, 32, 517, torch.float32, seed=7)
    hidden.requires_grad_()
    loss = cross_entropy.linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.gpu
def test_peak_memory_is_one_chunk_not_all_logits():
    """On the GPU: the extra memory at peak is the gradients plus one chunk of logits, far below (N, V)."""
    n_tokens, n_channels, n_vocab, max_chunk_bytes = 4096, 4096, 32000, 64 * 1024 * 1024
    hidden, weight, labels = make_inputs(n_tokens, n_channels, n_vocab, torch.bfloat16, seed=8)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.mm(hidden[:8], weight[:8].t())  # cuBLAS allocates its workspace once, before we measure
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = cross_entropy.linear_cross_entropy_chunked(hidden, weight, labels, max_chunk_bytes=max_chunk_bytes)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradients = hidden.numel() * 2 + weight.numel() * 2  # dhidden and dW live until backward
    slack = 64 * 1024 * 1024  # allocator rounding, a second cuBLAS workspace for the transposed GEMMs
    assert extra <= gradients + max_chunk_bytes + slack, f"{extra / 2**20:.0f} MiB at peak"
    assert extra < gradients + n_tokens * n_vocab * 2  # the bf16 logits alone would not fit
    loss.backward()
