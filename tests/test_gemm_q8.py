"""The int8 prefill GEMM (csrc/gemm_q8.cpp) against its torch reference (llava_fast/cpu/gemv.py `reference`: the
dequantized weight times x quantized per 32-block, in float32), against the int8 GEMV (the same products summed in
another order) and against its own scalar loop, bit for bit.

Odd shapes: N not a multiple of the 32-row panel or of 8 (masked stores), K with a partial last block and K % 4 != 0;
1 to 70 rows (every micro-tile remainder). Bits: the same row alone, inside any batch, on 1 or 2 threads and through
the scalar loop (gemv_use_kernels("scalar")) must be identical, because a prompt's K/V must not depend on how the
server split it into calls."""

import pytest
import torch
import torch.nn.functional as F

from llava_fast.cpu import gemv as G

pytestmark = pytest.mark.skipif(not G.NATIVE or not hasattr(G._C, "gemm_q8"), reason="llava_fast._C not built")


def _int8_layer(N, K, seed=0):
    from llava_fast.cpu.quantize import quantize_weight

    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(N, K, generator=g) * 0.05 + 0.01, 8, None)


# (37, 1091): the AMX table runs its tiles from 16 rows and K = 1024 (70 rows: 4 full 16-row tiles and 6 left).
@pytest.mark.parametrize("N,K", [(29, 96), (67, 45), (16, 256), (45, 131), (70, 576), (37, 1091)])
def test_gemm_q8_matches_the_reference_the_gemv_and_its_scalar_loop(N, K):
    layer = _int8_layer(N, K, seed=N)
    gen = torch.Generator().manual_seed(K)
    for rows in (1, 3, 4, 13, 70):
        x = torch.randn(rows, K, generator=gen) + 0.1
        out = G.gemm_q8(x, layer, 2)
        ref = G.reference(x, layer)
        assert out.shape == (rows, N) and out.dtype == torch.float32
        # Summation order only: ~1e-7 of the output's scale measured; the activation quantization is in ref.
        assert (out - ref).abs().max() <= 2e-6 * ref.abs().max(), rows
        assert (out - G.gemv(x, layer)).abs().max() <= 2e-6 * ref.abs().max(), rows
        plain = F.linear(x, layer.dequantized(torch.float32))  # and the int8 activations cost < 2%
        assert 0 < (out - plain).abs().max() / plain.abs().max() < 0.02, rows
        assert torch.equal(G.gemm_q8(x, layer, 1), out), rows  # threads change no bit
        assert G._C.gemv_use_kernels("scalar")
        try:
            assert torch.equal(G.gemm_q8(x, layer, 1), out), rows  # the scalar loop: the same operations
        finally:
            G._C.gemv_use_kernels("best")


@pytest.mark.parametrize("K", [449, 1091])
def test_a_row_gives_the_same_bits_whatever_else_is_in_the_call(K):
    layer = _int8_layer(53, K, seed=3)
    x = torch.randn(67, K, generator=torch.Generator().manual_seed(4))
    whole = G.gemm_q8(x, layer, 2)
    for start, stop in [(0, 1), (5, 6), (0, 4), (3, 10), (10, 67), (66, 67)]:
        assert torch.equal(G.gemm_q8(x[start:stop], layer, 2), whole[start:stop]), (start, stop)


def test_gemm_q8_refuses_what_it_cannot_run():
    layer = _int8_layer(8, 64)
    with pytest.raises(ValueError, match="float32"):
        G.gemm_q8(torch.randn(2, 64).bfloat16(), layer)
    with pytest.raises(ValueError, match="K input features"):
        G.gemm_q8(torch.randn(2, 32), layer)
    with pytest.raises(ValueError, match="int8"):
        G.gemm_q8(torch.randn(2, 64), G.GemvLinear.from_float(torch.randn(8, 64)))
    bad_inputs = [(torch.randn(2, 64), torch.nn.Linear(64, 8)), ([[1.0] * 64], layer), (torch.randn(0, 64), layer)]
    for bad_x, bad in bad_inputs:
        with pytest.raises(ValueError, match="gemm_q8: x must be a float32 CPU tensor"):
            G.gemm_q8(bad_x, bad)
    x, y = torch.randn(2, 64), torch.empty(2, 8)
    with pytest.raises(ValueError, match="int8 weights need scales"):  # the native check, past the Python one
        G._C.gemm_q8(x.data_ptr(), 2, 64, layer.weight.data_ptr(), 8, 64, 0, y.data_ptr(), 8, 1)
