"""The native CPU GEMV (csrc/gemv.cpp) against its torch reference (llava_fast/cpu/gemv.py `reference`).

Every weight format (float32, bfloat16, int8 offset-binary, int4 at each group size), odd shapes (N not a
multiple of 4 or 16, K not a multiple of 32 or 64 where the format allows it), 1, 3 and 8 activation rows,
float32 and bfloat16 activations, both kernel sets (AVX-512 where the CPU has it, and the scalar fallback),
and 1 vs 2 threads, which must give bit-identical results (each output's accumulation order is fixed by K).
The int8/int4 kernels multiply by x quantized to int8 per 32-block (as llama.cpp's Q8_0 dot products do);
`reference` models that, and a looser check bounds the difference from the plain float F.linear.
"""

import pytest
import torch
import torch.nn.functional as F

from llava_fast.cpu import gemv as G

needs_native = pytest.mark.skipif(not G.NATIVE, reason="llava_fast._C was not built (no C++ toolchain)")


def _layer(fmt, N, K, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05 + 0.01  # an offset: int4's min and the int8 correction matter
    if fmt == G.F32:
        return G.GemvLinear.from_float(w)
    if fmt == G.BF16:
        return G.GemvLinear.from_float(w.bfloat16())
    pytest.importorskip("torchao", reason="int8/int4 weights are quantized by torchao (pip install torchao)")
    from llava_fast.cpu.quantize import quantize_weight

    return quantize_weight(w, 8 if fmt == G.Q8 else 4, group)


CASES = [(G.F32, 37, 100, None), (G.F32, 19, 1000, None), (G.BF16, 53, 98, None), (G.BF16, 21, 1030, None),
         (G.Q8, 45, 123, None), (G.Q8, 23, 32 * 5, None), (G.Q8, 6, 200, None), (G.Q4, 29, 96, 32),
         (G.Q4, 67, 32 * 7, 32), (G.Q4, 22, 256, 64), (G.Q4, 13, 64 * 5, 64), (G.Q4, 17, 128 * 3, 128),
         (G.Q4, 11, 256 * 3, 256)]


@needs_native
@pytest.mark.parametrize("kernels", ["best", "scalar"])
@pytest.mark.parametrize("fmt,N,K,group", CASES)
def test_gemv_matches_the_reference(fmt, N, K, group, kernels):
    from llava_fast import _C

    layer = _layer(fmt, N, K, group)
    assert _C.gemv_use_kernels(kernels)
    gen = torch.Generator().manual_seed(N * K)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, 3, 8):
                x = (torch.randn(rows, K, generator=gen) + 0.1).to(dtype)
                ref = G.reference(x, layer)  # float32
                out = G.gemv(x, layer, 1)
                assert out.dtype == dtype and out.shape == (rows, N)
                assert torch.equal(G.gemv(x, layer, 2), out), (dtype, rows)  # thread count changes no bit
                # float32 out: summation order only. bfloat16 out: at most one bf16 rounding of the result.
                tol = (2e-6 * ref.abs().max() if dtype == torch.float32
                       else (ref.bfloat16().float() - ref).abs().max() * 2)
                assert (out.float() - ref).abs().max() <= tol + 1e-7, (dtype, rows)
                if fmt in (G.Q8, G.Q4):  # activation quantization: ~0.5% of the output's scale, not more
                    plain = F.linear(x.float(), layer.dequantized(torch.float32))
                    err = (out.float() - plain).abs().max() / plain.abs().max()
                    assert 0 < err < 0.02, (dtype, rows, err)
    finally:
        _C.gemv_use_kernels("best")


@needs_native
@pytest.mark.parametrize("fmt,N,K,group", [(G.F32, 41, 200, None), (G.F32, 8, 1376, None), (G.BF16, 23, 130, None),
                                           (G.Q8, 21, 160, None), (G.Q4, 19, 128, 32)])
def test_a_row_gives_the_same_bits_whatever_else_is_in_the_call(fmt, N, K, group):
    """Batch invariance: the server batches requests, and each must get generate()'s answer alone, bit for bit.
    The float32 kernel tiles 4 weight rows x 6 activation rows above M = 1, tiles of 5 taking up a remainder
    (55 = 5 x 5 + 5 x 6) where they can, else a tile of 1-5 rows at the end (7 = 6 + 1), so these M cover every
    tile shape and the weight-row remainder; each row of the call must equal a call with that row alone."""
    layer = _layer(fmt, N, K, group)
    gen = torch.Generator().manual_seed(K)
    for rows in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 55, 64):
        x = torch.randn(rows, K, generator=gen) + 0.1
        out = G.gemv(x, layer, 2)
        ref = G.reference(x, layer)
        assert (out - ref).abs().max() <= 2e-6 * ref.abs().max() + 1e-7, rows
        for i in {0, rows // 2, rows - 1}:
            assert torch.equal(G.gemv(x[i:i + 1], layer, 1)[0], out[i]), (rows, i)


@needs_native
@pytest.mark.parametrize("fmt,group", [(G.Q8, None), (G.Q4, 32)])
def test_thread_count_changes_no_bit_where_the_row_ranges_split_unevenly(fmt, group):
    """N = 301: 1, 2 and 3 threads cut the rows into 4, 8 and 12 ranges whose ends are not multiples of 4, so
    a row runs in a block of 4 rows on one count and alone on another: both must sum it in the same order
    (an int4 model's int8 lm_head gave 1 vs 2 threads different logits)."""
    layer = _layer(fmt, 301, 96, group, seed=2)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(6)) + 0.1
    out = G.gemv(x, layer, 1)
    for threads in (2, 3):
        assert torch.equal(G.gemv(x, layer, threads), out), threads


@needs_native
@pytest.mark.parametrize("fmt,group", [(G.Q8, None), (G.Q4, 32)])
def test_a_quantized_layer_traces_under_torch_compile(fmt, group):
    """compile=True with int8/int4 weights: torch.compile(fullgraph) must trace the layer's prefill GEMM (F.linear
    on its torch-dequantized weight), not call the native dequantization on raw pointers (a graph break at
    torch.get_num_threads: generate() raised). The eager backend: the trace without inductor's C++ build."""
    layer = _layer(fmt, 24, 64, group, seed=3)
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(8))  # 40 rows: past the GEMV's 8
    torch._dynamo.reset()
    out = torch.compile(layer, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out, F.linear(x, layer.dequantized(torch.float32)), rtol=1e-5, atol=1e-5)


@needs_native
def test_scalar_and_best_kernels_agree_on_a_long_row():
    from llava_fast import _C

    for fmt in (G.F32, G.BF16, G.Q8, G.Q4):
        layer = _layer(fmt, 33, 2048, 64, seed=5)
        x = torch.randn(2, 2048)
        outs = []
        for kernels in ("scalar", "best"):
            assert _C.gemv_use_kernels(kernels)
            outs.append(G.gemv(x, layer, 2))
        _C.gemv_use_kernels("best")
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5 * outs[0].abs().max().item())


def test_quantize_activations_by_hand():
    x = torch.tensor([[127.0, -63.5, 0.5, 1.49] + [0.0] * 28 + [0.0] * 32 + [2.0, -1.0, 0.3]])  # K = 67
    xd = G.quantize_activations(x)
    assert xd.shape == x.shape
    # block 0: scale 1 -> round-half-even: -63.5 -> -64, 0.5 -> 0, 1.49 -> 1; block 1 all zero; block 2 (3
    # values): scale 2/127.
    assert xd[0, :4].tolist() == [127.0, -64.0, 0.0, 1.0] and not xd[0, 4:64].any()
    s = torch.tensor(2.0) / 127
    assert torch.equal(xd[0, 64:], torch.round(torch.tensor([2.0, -1.0, 0.3]) / s) * s)


def test_q8_weights_are_offset_binary():
    layer = _layer(G.Q8, 8, 64)
    assert layer.weight.dtype == torch.uint8
    q = layer.weight.to(torch.int16) - 128
    assert q.abs().max() == 127  # symmetric per row: each row's largest weight is +-127
    torch.testing.assert_close(layer.dequantized(torch.float32), q.float() * layer.scale.view(-1, 1))


def test_forward_falls_back_to_f_linear_beyond_gemv_rows():
    # Float weights; the int8/int4 prefill GEMM (bfloat16 where oneDNN has AVX512_BF16) is tests/test_dequantize.py's
    for fmt in (G.F32,):
        layer = _layer(fmt, 24, 64, 32)
        x = torch.randn(2, G.MAX_GEMV_ROWS + 3, 64)  # prefill-sized: F.linear on the dequantized weight
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(torch.float32)), rtol=1e-5, atol=1e-5)


@needs_native
def test_gemv_refuses_a_group_that_is_not_a_power_of_two():
    from llava_fast import _C

    x, y = torch.randn(1, 96), torch.empty(1, 4)
    w, s = torch.zeros(4, 48, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="power of two"):
        _C.gemv(x.data_ptr(), 0, 1, 96, w.data_ptr(), G.Q4, 4, 96, 96, s.data_ptr(), s.data_ptr(), y.data_ptr(), 4, 1)
