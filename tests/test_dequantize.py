"""The native dequantization (csrc/dequantize.cpp) against GemvLinear's torch expression of the same formula, and
the quantized prefill GEMM (bfloat16 on AVX512_BF16) against float32 F.linear on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from llava_fast.cpu import gemv
from llava_fast.cpu.gemv import Q4, Q8, GemvLinear
from llava_fast.cpu.quantize import quantize_weight

pytestmark = pytest.mark.skipif(not gemv.NATIVE, reason="llava_fast._C not built")


def torch_dequantized(layer, dtype):
    saved, gemv.NATIVE = gemv.NATIVE, False
    try:
        return layer.dequantized(dtype)
    finally:
        gemv.NATIVE = saved


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("shape", [(37, 128), (333, 384), (5, 256)])
def test_native_equals_torch_formula(bits, group, shape):
    torch.manual_seed(bits + shape[0])
    w = torch.randn(*shape) * torch.rand(shape[0], 1) * 0.1  # rows of different scales
    layer = quantize_weight(w, bits, group)
    for dtype in (torch.float32, torch.bfloat16):
        got = layer.dequantized(dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, torch_dequantized(layer, dtype))  # bit for bit: the same roundings
    # into a bigger buffer: the first N * K elements, as the prefill scratch uses it
    buf = torch.full((shape[0] * shape[1] + 7,), float("nan"))
    got = layer.dequantized(torch.float32, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, torch_dequantized(layer, torch.float32))
    assert (got - w).abs().max() < (0.02 if bits == 8 else 0.2) * w.abs().max()  # it is w, quantized


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quantized_prefill_gemm(bits, group):
    torch.manual_seed(3)
    w = torch.randn(200, 96) * 0.05
    layer = quantize_weight(w, bits, group)
    assert layer.format == (Q8 if bits == 8 else Q4)
    x = torch.randn(2, 13, 96)  # 26 rows: above MAX_GEMV_ROWS, the prefill GEMM
    exact = F.linear(x, torch_dequantized(layer, torch.float32))
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (2, 13, 200)
    if gemv.PREFILL_BF16:  # x and W rounded to bfloat16, float32 sums
        want = F.linear(x.bfloat16().float(), torch_dequantized(layer, torch.bfloat16).float())
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    else:
        torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    second = layer(x + 1)  # the scratch weight is rewritten, not stale: another layer in between
    quantize_weight(torch.randn(64, 96), bits, group)(torch.randn(20, 96))
    assert torch.allclose(layer(x + 1), second)


def test_errors():
    layer = GemvLinear(Q4, torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.float16),
                       torch.zeros(4, 1, dtype=torch.float16), group=32)
    with pytest.raises(ValueError, match="out must be"):
        gemv._C.dequantize(layer.weight.data_ptr(), Q4, 4, 32, 32, layer.scale.data_ptr(),
                           layer.minimum.data_ptr(), torch.empty(4, 32).data_ptr(), 7, 1)
    with pytest.raises(ValueError, match="group"):
        gemv._C.dequantize(layer.weight.data_ptr(), Q4, 4, 32, 48, layer.scale.data_ptr(),
                           layer.minimum.data_ptr(), torch.empty(4, 32).data_ptr(), 0, 1)
