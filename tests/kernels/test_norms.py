"""Fused RMSNorm (+ residual) and LayerNorm kernels against the torch references in llava_fast.ops.

Tolerances: fp32 is compared with the fp32 reference directly (rtol 1e-5); fp16/bf16 follow the
flash-attention rule: the kernel's error against an fp32 reference may be at most 2x the error that the
plain-PyTorch reference makes in the same dtype, plus one ulp at the output's scale.
"""

import pytest
import torch
from accuracy import BF16, DEVICE, assert_close_to_reference

from llava_fast import ops
from llava_fast.kernels import norms

SHAPES = [(5, 123), (3, 77, 129), (2, 1, 4096)]
DTYPES = [torch.float32, torch.float16, BF16]
reference_rms_norm = ops.TORCH_OPS["rms_norm"]  # the torch oracle even when the triton backend is active
reference_layer_norm = ops.TORCH_OPS["layer_norm"]




def leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_rms_norm(fn, x, weight, residual, dnormed, dhidden):
    """Forward + backward with gradients flowing into both outputs; returns outputs then input grads."""
    x, weight = leaf(x), leaf(weight)
    residual = None if residual is None else leaf(residual)
    normed, hidden = fn(x, weight, 1e-6, residual)
    inputs = [x, weight] + ([] if residual is None else [residual])
    grads = torch.autograd.grad([normed, hidden], inputs, [dnormed, dhidden])
    return (normed, hidden) + grads


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(dtype, shape, with_residual):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(dtype) if with_residual else None
    weight = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    dnormed = torch.randn(shape, device=DEVICE).to(dtype)
    dhidden = torch.randn(shape, device=DEVICE).to(dtype)

    ours = run_rms_norm(norms.rms_norm, x, weight, residual, dnormed, dhidden)
    same_dtype = run_rms_norm(reference_rms_norm, x, weight, residual, dnormed, dhidden)
    as_fp32 = [None if t is None else t.float() for t in (x, weight, residual, dnormed, dhidden)]
    fp32 = run_rms_norm(reference_rms_norm, *as_fp32)
    names = ["normed", "hidden", "dx", "dweight"] + (["dresidual"] if with_residual else [])
    for name, a, b, c in zip(names, ours, same_dtype, fp32):
        assert_close_to_reference(name, a, b, c)


def test_rms_norm_without_residual_returns_x_as_hidden():
    x = torch.randn(3, 77, 129, device=DEVICE)
    normed, hidden = norms.rms_norm(x, torch.randn(129, device=DEVICE), 1e-6)
    assert hidden is x


@pytest.mark.parametrize("used", ["normed", "hidden"])
def test_rms_norm_one_output_used(used):
    """An unused output arrives in backward as None (no zero-filled gradient); the other path must still flow."""
    torch.manual_seed(1)
    x, residual, weight = (leaf(torch.randn(s, device=DEVICE)) for s in ((5, 123), (5, 123), (123,)))
    grads = {}
    for name, fn in (("ours", norms.rms_norm), ("torch", reference_rms_norm)):
        normed, hidden = fn(x, weight, 1e-6, residual)
        out = normed if used == "normed" else hidden
        grads[name] = torch.autograd.grad((out * torch.linspace(-1, 1, 123)).sum(), [x, residual, weight],
                                          allow_unused=True)
    for a, b in zip(grads["ours"], grads["torch"]):
        if b is None:  # dweight when only hidden is used
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=str)
def test_rms_norm_fp32_weight_promotes_like_torch(dtype):
    """LLaMA checkpoints sometimes keep norm weights in fp32: `weight * normed.to(bf16)` is then fp32."""
    torch.manual_seed(2)
    x = torch.randn(3, 77, 129, device=DEVICE).to(dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(129, device=DEVICE)
    dnormed, dhidden = torch.randn(x.shape, device=DEVICE), torch.randn_like(x)
    ours = run_rms_norm(norms.rms_norm, x, weight, residual, dnormed, dhidden)
    theirs = run_rms_norm(reference_rms_norm, x, weight, residual, dnormed, dhidden)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    # The same roundings in the same order, so nearly bit-exact; an fp32 rstd that differs in its last
    # bit may flip a rare rounding by one ulp. Skipping the cast to x.dtype would change most elements.
    torch.testing.assert_close(ours[0], theirs[0], rtol=torch.finfo(dtype).eps, atol=1e-5)
    assert (~torch.isclose(ours[0], theirs[0], rtol=1e-6, atol=0)).float().mean() < 1e-3
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    for a, b in zip(ours[2:], theirs[2:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_rms_norm_non_contiguous_input():
    torch.manual_seed(3)
    base = torch.randn(7, 140, device=DEVICE)
    x = base[:, :123]  # row stride 140
    residual = torch.randn(123, 7, device=DEVICE).t()  # channel stride 7
    weight = torch.randn(123, device=DEVICE)
    dnormed, dhidden = torch.randn(7, 123, device=DEVICE), torch.randn(7, 123, device=DEVICE)
    ours = run_rms_norm(norms.rms_norm, x, weight, residual, dnormed, dhidden)
    theirs = run_rms_norm(reference_rms_norm, x, weight, residual, dnormed, dhidden)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def run_layer_norm(fn, x, weight, bias, dy):
    x = leaf(x)
    params = [leaf(p) if p is not None else None for p in (weight, bias)]
    y = fn(x, params[0], params[1], 1e-5)
    grads = torch.autograd.grad(y, [x] + [p for p in params if p is not None], dy)
    return (y,) + grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_matches_reference(dtype, shape):
    torch.manual_seed(4)
    x = (3 + 2 * torch.randn(shape, device=DEVICE)).to(dtype)  # an offset mean checks the centring
    weight = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    bias = torch.randn(shape[-1], device=DEVICE).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    ours = run_layer_norm(norms.layer_norm, x, weight, bias, dy)
    same_dtype = run_layer_norm(reference_layer_norm, x, weight, bias, dy)
    fp32 = run_layer_norm(reference_layer_norm, x.float(), weight.float(), bias.float(), dy.float())
    for name, a, b, c in zip(["y", "dx", "dweight", "dbias"], ours, same_dtype, fp32):
        assert_close_to_reference(name, a, b, c)


@pytest.mark.parametrize("has_weight,has_bias", [(False, False), (True, False), (False, True)])
def test_layer_norm_optional_affine(has_weight, has_bias):
    torch.manual_seed(5)
    x, dy = torch.randn(3, 77, 129, device=DEVICE), torch.randn(3, 77, 129, device=DEVICE)
    weight = torch.randn(129, device=DEVICE) if has_weight else None
    bias = torch.randn(129, device=DEVICE) if has_bias else None
    ours = run_layer_norm(norms.layer_norm, x, weight, bias, dy)
    theirs = run_layer_norm(reference_layer_norm, x, weight, bias, dy)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_and_clip_shapes_on_gpu(dtype):
    """LLaMA-7B's 4096 channels and CLIP-L's 1024 over many rows: the multi-row backward split at scale."""
    torch.manual_seed(6)
    for rows, channels in ((2 * 1023, 4096), (577 * 3, 1024)):
        x, residual, dnormed, dhidden = (torch.randn(rows, channels, device=DEVICE).to(dtype) for _ in range(4))
        weight = (1 + 0.5 * torch.randn(channels, device=DEVICE)).to(dtype)
        ours = run_rms_norm(norms.rms_norm, x, weight, residual, dnormed, dhidden)
        same_dtype = run_rms_norm(reference_rms_norm, x, weight, residual, dnormed, dhidden)
        fp32 = run_rms_norm(reference_rms_norm, *(t.float() for t in (x, weight, residual, dnormed, dhidden)))
        for name, a, b, c in zip(["normed", "hidden", "dx", "dweight", "dresidual"], ours, same_dtype, fp32):
            assert_close_to_reference(name, a, b, c)
        ours = run_layer_norm(norms.layer_norm, x, weight, weight - 1, dnormed)
        same_dtype = run_layer_norm(reference_layer_norm, x, weight, weight - 1, dnormed)
        fp32 = run_layer_norm(reference_layer_norm, x.float(), weight.float(), weight.float() - 1, dnormed.float())
        for name, a, b, c in zip(["y", "dx", "dweight", "dbias"], ours, same_dtype, fp32):
            assert_close_to_reference(name, a, b, c)
