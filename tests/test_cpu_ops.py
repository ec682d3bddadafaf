"""llava_fast/cpu_ops.py (csrc/cpu_ops.cpp) against the references in ops.py: random inputs, odd widths,
strided rows, both dtypes, with and without the residual; and that the custom op runs it on the CPU."""

import pytest
import torch

from llava_fast import cpu_ops, gemv, ops

pytestmark = pytest.mark.skipif(not gemv.NATIVE, reason="llava_fast._C not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 37, 96), (3, 300, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_reference(dtype, shape, with_residual):
    torch.manual_seed(shape[1])
    C = shape[-1]
    x = (torch.randn(*shape[:-1], 2 * C) * 3)[..., :C].to(dtype)  # rows at a stride of 2C: a view
    residual = torch.randn(shape).to(dtype) if with_residual else None
    weight = (torch.rand(C) + 0.5).to(dtype)
    got = cpu_ops.rms_norm(x, weight, 1e-5, residual)
    want = ops.rms_norm_reference(x, weight, 1e-5, residual)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        else:  # same rounding points; a float32 sum in another order may move a value by one bfloat16 step
            assert ((g.float() - w.float()).abs() <= 2 ** -7 * w.float().abs() + 1e-6).float().mean() == 1
            assert (g != w).float().mean() < 0.02
    if with_residual:
        assert torch.equal(got[1], want[1])  # the residual sum rounds once, as the reference's
    else:
        assert got[1] is x


def test_rms_norm_declines_what_it_does_not_do():
    x = torch.randn(4, 8)
    assert cpu_ops.rms_norm(x.half(), torch.ones(8).half(), 1e-5) is None
    assert cpu_ops.rms_norm(x, torch.ones(8).bfloat16(), 1e-5) is None  # mixed dtypes: the reference promotes
    assert cpu_ops.rms_norm(x, torch.ones(8), 1e-5, torch.randn(4, 8).double()) is None


def test_the_custom_op_uses_it_and_backward_is_the_reference(monkeypatch):
    calls = []
    real = cpu_ops.OPS["rms_norm"]
    monkeypatch.setitem(cpu_ops.OPS, "rms_norm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(5, 24, requires_grad=True)
    w = torch.rand(24, requires_grad=True)
    saved = ops.BACKEND
    ops.use_backend("torch")
    try:
        normed, _ = ops.rms_norm(x, w, 1e-6)
        normed.square().sum().backward()
    finally:
        ops.use_backend(saved)
    assert calls
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ops.rms_norm_reference(x2, w2, 1e-6)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)
