"""SwiGLU and quick_gelu kernels against the torch references in llava_fast.ops, forward and backward.

Tolerances: fp32 is compared with the fp32 reference directly (rtol 1e-5); fp16/bf16 follow the
flash-attention rule: the kernel's error against an fp32 reference may be at most 2x the error that the
plain-PyTorch reference makes in the same dtype, plus one ulp at the output's scale.
"""

import pytest
import torch
from accuracy import BF16, DEVICE, assert_close_to_reference

from llava_fast import ops
from llava_fast.kernels import activations

# 1-D 4097 crosses the 4096-element block by one; the others are odd in every dimension.
SHAPES = [(5, 123), (3, 77, 129), (4097,), (2, 3, 5, 7)]
DTYPES = [torch.float32, torch.float16, BF16]
reference_swiglu = ops.TORCH_OPS["swiglu"]  # the torch oracle even when the triton backend is active
reference_quick_gelu = ops.TORCH_OPS["quick_gelu"]




def forward_backward(fn, inputs, dout):
    """Output and the gradient of every input, for the upstream gradient dout."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return (out,) + torch.autograd.grad(out, inputs, dout)


def check_against_reference(fn, reference, inputs, names):
    dout = torch.randn(inputs[0].shape, device=DEVICE).to(inputs[0].dtype)
    ours = forward_backward(fn, inputs, dout)
    same_dtype = forward_backward(reference, inputs, dout)
    fp32 = forward_backward(reference, [t.float() for t in inputs], dout.float())
    for name, a, b, c in zip(names, ours, same_dtype, fp32):
        assert_close_to_reference(name, a, b, c)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_matches_reference(dtype, shape):
    torch.manual_seed(0)
    gate = (3 * torch.randn(shape, device=DEVICE)).to(dtype)  # reaches silu's flat and linear parts
    up = torch.randn(shape, device=DEVICE).to(dtype)
    check_against_reference(activations.swiglu, reference_swiglu, [gate, up], ["out", "dgate", "dup"])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quick_gelu_matches_reference(dtype, shape):
    torch.manual_seed(1)
    x = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    check_against_reference(activations.quick_gelu, reference_quick_gelu, [x], ["out", "dx"])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_extreme_inputs_stay_finite():
    """sigmoid(-200) overflows exp(200) to inf inside the kernel; the result must still be 0, not NaN."""
    x = torch.tensor([-200.0, -60.0, -1e-3, 0.0, 1e-3, 60.0, 200.0], device=DEVICE)
    up = torch.linspace(-2, 2, 7, device=DEVICE)
    check_against_reference(activations.swiglu, reference_swiglu, [x, up], ["out", "dgate", "dup"])
    check_against_reference(activations.quick_gelu, reference_quick_gelu, [x], ["out", "dx"])
    assert torch.isfinite(activations.quick_gelu(x)).all()


def test_non_contiguous_inputs():
    """The MLP's gate and up often come as two halves of one fused projection: strided views."""
    torch.manual_seed(2)
    gate_up = torch.randn(3, 77, 2 * 129, device=DEVICE)
    gate, up = gate_up[..., :129], gate_up[..., 129:]
    check_against_reference(activations.swiglu, reference_swiglu, [gate, up], ["out", "dgate", "dup"])
    x = torch.randn(129, 77, device=DEVICE).t()
    check_against_reference(activations.quick_gelu, reference_quick_gelu, [x], ["out", "dx"])


def test_empty_tensor():
    x = torch.randn(0, 129, device=DEVICE, requires_grad=True)
    assert activations.quick_gelu(x).shape == (0, 129)
    assert activations.swiglu(x, x).shape == (0, 129)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        activations.swiglu(torch.randn(4, 8, device=DEVICE), torch.randn(8, device=DEVICE))
