"""The torch backend's training cross-entropy (target rows only, chunked, gradients in forward) against
linear_cross_entropy_reference: loss, dhidden and dweight, float32 and bfloat16, odd shapes, one chunk or many.
bfloat16 follows the accuracy rule: its error against the float64 reference at most ~2x the reference's own."""

import pytest
import torch

from llava_fast import ops


def _case(n, c, v, dtype, ignored_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g).to(dtype)
    weight = (torch.randn(v, c, generator=g) * 0.2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored_fraction] = -100
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, dtype=None):
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = fn(h, w, labels)
    (loss * 1.7).backward()  # a non-unit incoming gradient
    return loss.detach().double(), h.grad.double(), w.grad.double()


@pytest.mark.parametrize("n,c,v,ignored,chunk_bytes", [(37, 24, 101, 0.8, 64 * 2**20), (123, 40, 73, 0.3, 4 * 73 * 5),
                                                        (5, 123, 423, 0.0, 4 * 423)])
def test_float32_matches_the_reference(n, c, v, ignored, chunk_bytes):
    hidden, weight, labels = _case(n, c, v, torch.float32, ignored, n)
    rows = lambda h, w, y: ops.linear_cross_entropy_target_rows(h, w, y, -100, chunk_bytes)  # noqa: E731
    got = _loss_and_grads(rows, hidden, weight, labels)
    want = _loss_and_grads(ops.linear_cross_entropy_reference, hidden, weight, labels)
    assert got[0].item() > 0.5  # a real loss, not a degenerate one
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (got[1][labels == -100] == 0).all()  # rows without a target get no gradient


@pytest.mark.parametrize("chunk_bytes", [64 * 2**20, 4 * 301 * 7])
def test_bfloat16_error_within_twice_the_reference(chunk_bytes):
    hidden, weight, labels = _case(61, 48, 301, torch.bfloat16, 0.5, 3)
    exact = _loss_and_grads(ops.linear_cross_entropy_reference, hidden, weight, labels, torch.float64)
    ref = _loss_and_grads(ops.linear_cross_entropy_reference, hidden, weight, labels)
    got = _loss_and_grads(lambda h, w, y: ops.linear_cross_entropy_target_rows(h, w, y, -100, chunk_bytes),
                          hidden, weight, labels)
    for g, r, e in zip(got, ref, exact):
        assert (g - e).abs().max() <= 2 * (r - e).abs().max() + 1e-6


def test_public_op_uses_it_on_the_torch_backend_and_no_target_is_nan():
    hidden, weight, labels = _case(9, 8, 11, torch.float32, 0.0, 1)
    ops.use_backend("torch")
    torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, labels),
                               ops.linear_cross_entropy_reference(hidden, weight, labels))
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    loss = ops.linear_cross_entropy(h, weight, labels)
    assert torch.isnan(loss) and torch.isnan(ops.linear_cross_entropy_reference(hidden, weight, labels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_swiglu_equals_the_reference(dtype):
    """The eager-training SwiGLU (saves gate and up only) against autograd through swiglu_reference: the same
    ops in the same order, so equal bit for bit, in bfloat16 too."""
    g = torch.Generator().manual_seed(5)
    gate, up, grad = (torch.randn(3, 7, 37, generator=g) * 3 for _ in range(3))

    def run(fn):
        a, b = (t.to(dtype).clone().requires_grad_() for t in (gate, up))
        out = fn(a, b)
        out.backward(grad.to(dtype))
        return out, a.grad, b.grad

    ops.use_backend("torch")
    got, want = run(ops.swiglu), run(ops.swiglu_reference)
    assert got[1].abs().max() > 0.5
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_training_rope_equals_apply_rope():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 11, h, 16, generator=g) for h in (4, 2, 2))
    cos, sin = ops.rope_tables(16, 32, 10000.0)
    positions = torch.arange(11).expand(2, 11)
    assert torch.equal(ops._rope_from_zero(q, cos, sin), ops.apply_rope(q, cos, sin, positions))
    got = ops.rotary_causal_attention_reference(q, k, v, cos, sin)
    qr, kr = ops.apply_rope(q, cos, sin, positions), ops.apply_rope(k, cos, sin, positions)
    mask = torch.ones(11, 11, dtype=torch.bool).tril()
    want = ops._sdpa_gqa(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n,c,v,chunk_bytes,held", [(37, 40, 301, 64 * 2**20, "parts"),
                                                     (61, 64, 301, 4 * 301 * 7, "parts"),
                                                     (29, 4, 73, 4 * 73 * 7, "whole")])
def test_weight_grad_sink_takes_the_whole_gradient_in_vocabulary_chunks(monkeypatch, n, c, v, chunk_bytes, held):
    """With a sink, lm_head's weight gradient goes to it in row chunks (16 rows here: 16, ..., and a short last
    one), covering the vocabulary once in order, none reaching .grad; the chunks equal the whole gradient's rows
    (float32 rounding at most) and the loss and dhidden are the same bits. `held`: forward keeps the row chunks' dz
    and h while they are smaller than the (V, C) gradient (c = 4: from 4 target rows it keeps the whole one)."""
    monkeypatch.setattr(ops, "VOCAB_ROWS_PER_GRAD_CHUNK", 16)
    hidden, weight, labels = _case(n, c, v, torch.float32, 0.3, n + v)
    got, spans = torch.full((v, c), float("nan"), dtype=torch.float64), []

    def sink(lo, hi, grad):
        spans.append((lo, hi))
        got[lo:hi] = grad.double()

    def run(with_sink):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = ops.linear_cross_entropy_target_rows(h, w, labels, -100, chunk_bytes, sink if with_sink else None)
        (loss * 1.7).backward()
        return loss.detach(), h.grad, w.grad

    loss, dh, dw_none = run(True)
    want_loss, want_dh, want_dw = run(False)
    keep = int((labels != -100).sum())
    assert (keep * (v + c) < v * c) == (held == "parts")
    assert dw_none is None and want_dw.abs().sum() > 0
    assert spans == [(lo, min(v, lo + 16)) for lo in range(0, v, 16)]
    assert torch.equal(loss, want_loss) and torch.equal(dh, want_dh)
    torch.testing.assert_close(got, want_dw.double(), rtol=1e-6, atol=1e-7)
