"""kernels/patch_embed.py against llava_fast.ops.patch_embed.

Accuracy rule (flash-attention's): compare with the reference run in fp64; the kernel's max error must be at
most 2x the error plain PyTorch makes in the same dtype, plus a small atol for dtypes where PyTorch is
already near-exact.
"""

import pytest
import torch

from llava_fast import ops
from llava_fast.kernels.patch_embed import patch_embed

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def make_inputs(N, S, P, C, weight_dtype, pixel_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = (S // P) ** 2
    pixel_values = torch.randn(N, 3, S, S, generator=g).to(pixel_dtype)
    weights = dict(
        patch_weight=torch.randn(C, 3, P, P, generator=g) * (3 * P * P) ** -0.5,
        class_embedding=torch.randn(C, generator=g),
        position_embedding=torch.randn(1 + L, C, generator=g) * 0.5,
        ln_weight=1.0 + 0.1 * torch.randn(C, generator=g),
        ln_bias=0.1 * torch.randn(C, generator=g),
    )
    return pixel_values, {k: v.to(weight_dtype) for k, v in weights.items()}


def assert_flash_rule(out, torch_out, ref, dtype):
    kernel_err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    assert kernel_err <= 2 * torch_err + ATOL[dtype], f"kernel err {kernel_err:.3g} vs torch err {torch_err:.3g}"


@pytest.mark.parametrize(
    "N, S, P, C",
    [(1, 28, 14, 64), (3, 42, 14, 32), (3, 56, 14, 48), (1, 56, 14, 80)],
)
@pytest.mark.parametrize(
    "weight_dtype, pixel_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)],
)
def test_patch_embed_matches_reference(N, S, P, C, weight_dtype, pixel_dtype):
    pixel_values, weights = make_inputs(N, S, P, C, weight_dtype, pixel_dtype)
    eps = 1e-5
    with torch.no_grad():
        out = patch_embed(pixel_values, *weights.values(), eps)
        torch_out = ops.patch_embed(pixel_values, *weights.values(), eps)
        ref = ops.patch_embed(pixel_values.double(), *(w.double() for w in weights.values()), eps)
    assert out.shape == (N, 1 + (S // P) ** 2, C)
    assert out.dtype == torch_out.dtype == weight_dtype
    assert_flash_rule(out, torch_out, ref, weight_dtype)


def test_patch_embed_inference_mode_and_channels_last():
    """Runs under inference_mode, and reads strided (channels-last) pixels without a copy."""
    pixel_values, weights = make_inputs(3, 42, 14, 40, torch.float32, torch.float32, seed=1)
    pixel_values = pixel_values.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = patch_embed(pixel_values, *weights.values(), 1e-6)
    ref = ops.patch_embed(pixel_values.double(), *(w.double() for w in weights.values()), 1e-6)
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_patch_embed_refuses_to_drop_gradients():
    pixel_values, weights = make_inputs(1, 28, 14, 32, torch.float32, torch.float32)
    weights["patch_weight"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        patch_embed(pixel_values, *weights.values(), 1e-5)
    with torch.no_grad():  # the frozen-tower path: fine
        patch_embed(pixel_values, *weights.values(), 1e-5)


def test_patch_embed_dispatch_table():
    from llava_fast.kernels import TRITON_OPS

    assert TRITON_OPS["patch_embed"] is patch_embed
