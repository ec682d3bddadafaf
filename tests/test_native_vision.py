"""The CLIP tower's native CPU pieces (csrc/vision.cpp through llava_fast/cpu/vision.py) against ops.py's torch
references: quick_gelu on every kernel table, and the whole tower.

Accuracy rule (flash-attention's): against a float32 reference, the native bfloat16 result's largest error is at
most twice what the torch path makes in bfloat16 on the same inputs, plus a few units of the output's scale in
float32 (whose kernels use their own exp and summation order)."""

import pytest
import torch

from llava_fast import ops
from llava_fast.cpu import gemv, vision

pytestmark = pytest.mark.skipif(not hasattr(gemv._C, "vision_quick_gelu"), reason="native extension not built")

TABLES = [t["name"] for t in gemv._C.cpu_isa_tables()] if gemv.NATIVE else []


@pytest.fixture
def table(request):
    gemv._C.use_cpu_isa(request.param)
    yield request.param
    gemv._C.use_cpu_isa("best")


def _max_err(x, ref):
    return (x.float() - ref).abs().max().item()


@pytest.mark.parametrize("table", [t for t in TABLES if t], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (15,), (3, 33, 1000), (5, 577, 1024), (2, 70001)])
def test_quick_gelu_in_place_matches_the_reference(table, dtype, shape):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * 3).to(dtype)
    ref = ops.quick_gelu_reference(x.float())
    torch_err = _max_err(ops.quick_gelu_reference(x), ref)
    with torch.no_grad():
        y = x.clone()
        assert vision.quick_gelu_(y)
    scale = ref.abs().max().item()
    bound = 2 * torch_err + 4e-6 * scale if dtype == torch.bfloat16 else 4e-6 * scale
    assert _max_err(y, ref) <= bound, (table, _max_err(y, ref), bound)
    assert not torch.equal(y, x)  # written in place


def test_quick_gelu_in_place_declines_what_it_cannot_run():
    x = torch.randn(4, 6)
    with torch.no_grad():
        t = x.t()
        assert not vision.quick_gelu_(t)  # not contiguous
        assert torch.equal(t, x.t())
        h = x.to(torch.float16)
        assert not vision.quick_gelu_(h)
    assert not vision.quick_gelu_(x.clone())  # autograd mode: the reference's ops, which backward needs
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert not vision.quick_gelu_(mode.from_tensor(x))  # no memory behind a fake tensor
    with torch.no_grad():  # ops.quick_gelu_ then returns the torch path's new tensor
        assert torch.equal(ops.quick_gelu_(t), ops.quick_gelu_reference(x.t()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tower_with_native_pieces_matches_the_torch_tower(dtype):
    """tiny-next's tower on 3 tiles: the native path (no grad) against the same model through the references
    (grad mode, which runs ops.py's torch references inline), both against the float32 tower."""
    from llava_fast.presets import random_model

    net = random_model("tiny-next", device="cpu", dtype=dtype).net
    net32 = random_model("tiny-next", device="cpu", dtype=torch.float32).net
    torch.manual_seed(1)
    px = torch.randn(3, 3, 336, 336)
    ref = net32.image_features(px)  # grad mode: the references
    torch_out = net.image_features(px)
    with torch.no_grad():
        native = net.image_features(px)
    assert native.shape == torch_out.shape == (3, 576, 256)
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        assert _max_err(native, ref) <= 1e-4 * scale
    else:
        assert _max_err(native, ref) <= 2 * _max_err(torch_out, ref) + 1e-3 * scale
