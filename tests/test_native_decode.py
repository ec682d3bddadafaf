"""The native CPU decode step (csrc/decode.cpp via llava_fast/cpu/native_decode.py) against its reference, the torch
decode step (generate.decode_step): logits, the K/V it writes, lengths; every weight format, biases, GQA, tied
embeddings, llama3 RoPE, ragged rows in a view of some cache rows, and its errors."""

import dataclasses

import pytest
import torch

from llava_fast.checkpoints.config import LlavaConfig, TextConfig
from llava_fast.cpu import gemv, native_decode, plan
from llava_fast.cpu.quantize import prepare_for_inference
from llava_fast.generate import Decoder, decode_step
from llava_fast.model import LlavaForCausalLM
from llava_fast.presets import random_init_

pytestmark = pytest.mark.skipif(not gemv.NATIVE, reason="llava_fast._C not built")
# The Decoder prefills natively only with the AVX-512 or AVX2 kernel tables (cpu/plan.py)
needs_native_prefill = pytest.mark.skipif(not gemv.NATIVE or gemv._C.cpu_isa() not in ("avx512", "avx2"),
                                  reason="no native prefill with this CPU's kernel table (scalar or neon)")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def text_net(dtype=torch.float32, quantize=None, seed=0, **text):
    """A random text-only LLaMA (odd sizes: hidden 72, 3 heads of 24 over 1 KV head, MLP 100, vocab 301),
    fused and prepared as load() prepares it."""
    cfg = dict(vocab_size=301, hidden_size=72, intermediate_size=100, num_layers=3, num_heads=3, num_kv_heads=1,
               max_position_embeddings=256, rms_norm_eps=1e-5)
    cfg.update(text)
    net = LlavaForCausalLM(LlavaConfig(vision=None, text=TextConfig(**cfg)))
    random_init_(net, seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # random (not zero) biases and norm weights: they must be read
        for name, p in net.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + ("norm" in name))
    net = net.to(dtype).requires_grad_(False).eval()
    net.init_rope()
    return prepare_for_inference(net.fuse_projections(), quantize)


def prefilled(net, rows, capacity=None):
    """A Decoder whose rows hold prompts of different lengths (and stale K/V beyond them)."""
    dec = Decoder(net, len(rows), capacity or max(40, max(rows) + 8))
    dec.cache.k.normal_(), dec.cache.v.normal_()  # stale content must never be read
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, net.cfg.text.vocab_size, (n,), generator=g).tolist() for n in rows]
    for b, r in enumerate(ids):
        dec.prefill_slot(b, r)
    return dec


def both_steps(net, rows, steps=4, view_rows=None):
    """Run `steps` decode steps natively and through decode_step from the same state; returns the pairs."""
    dec = prefilled(net, rows)
    native = native_decode.for_model(net)
    assert native is not None, native_decode.why_not(net)
    n = view_rows or len(rows)
    cache_ref = type(dec.cache).__new__(type(dec.cache))
    cache_ref.k, cache_ref.v = dec.cache.k.clone(), dec.cache.v.clone()
    lengths_ref = dec.lengths.clone()
    tokens = torch.randint(0, net.cfg.text.vocab_size, (n,), generator=torch.Generator().manual_seed(2))
    out = []
    for _ in range(steps):
        got = native(dec.cache.rows(0, n), dec.lengths[:n], tokens)
        want = decode_step(net, cache_ref.rows(0, n), lengths_ref[:n], tokens)
        out.append((got, want))
        tokens = want.argmax(-1)
    return out, dec, cache_ref, lengths_ref


@pytest.mark.parametrize("text", [
    {},
    {"attention_bias": True, "mlp_bias": True},
    {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE},
    {"num_heads": 4, "num_kv_heads": 4, "head_dim": 10, "hidden_size": 40},  # MHA, head_dim != hidden / heads
    # head_dim 32, 64, 128: attention's register-resident kernels (decode.cpp attend_avx512); 24 and 10 above
    # take the generic loop
    {"num_heads": 4, "num_kv_heads": 2, "hidden_size": 128},
    {"num_heads": 3, "num_kv_heads": 1, "hidden_size": 192},
    {"num_heads": 2, "num_kv_heads": 2, "hidden_size": 256},
    {"num_heads": 2, "num_kv_heads": 1, "hidden_size": 192},
])
def test_float32_equals_torch_step(text):
    net = text_net(**text)
    pairs, dec, cache_ref, lengths_ref = both_steps(net, [5, 1, 11])
    for got, want in pairs:
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert want.std() > 1e-2  # logits that carry signal, not a degenerate model
    assert torch.equal(dec.lengths, lengths_ref)
    torch.testing.assert_close(dec.cache.k, cache_ref.k, atol=1e-5, rtol=1e-5)  # stale tail untouched too
    torch.testing.assert_close(dec.cache.v, cache_ref.v, atol=1e-5, rtol=1e-5)


def test_steps_only_the_rows_asked_for():
    # The server steps rows 0..n-1 of a bigger cache: row 2's K/V and length must not move.
    net = text_net()
    pairs, dec, cache_ref, lengths_ref = both_steps(net, [4, 9, 7], view_rows=2)
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert dec.lengths.tolist() == [8, 13, 7]
    assert torch.equal(dec.cache.k[:, 2], cache_ref.k[:, 2])


@pytest.mark.parametrize("quantize", ["int8wo", "int4wo-32"])
def test_quantized_equals_torch_step(quantize):
    for seed in range(3):
        net = text_net(quantize=quantize, seed=seed, hidden_size=96, num_heads=4, num_kv_heads=2, intermediate_size=160)
        for got, want in both_steps(net, [6, 3])[0]:
            # The GEMVs quantize their input per 32-block (gemv.py): a last-bit difference in a norm's output
            # can move one int8 step, which int4 weights turn into up to ~1% of the logits' range (12 seeds).
            scale = want.abs().max()
            assert (got - want).abs().max() <= 2e-2 * scale
            assert (got - want).abs().median() <= 1e-4 * scale


@pytest.mark.parametrize("head_dim", [24, 64])
def test_bfloat16_follows_torch_rounding(head_dim):
    net = text_net(dtype=torch.bfloat16, attention_bias=True, hidden_size=3 * head_dim)
    pairs, dec, cache_ref, _ = both_steps(net, [5, 8])
    for got, want in pairs:
        # Same rounding points, different summation orders: differences of a few bfloat16 ulps of the logits
        scale = want.abs().max()
        assert (got - want).abs().max() <= 0.03 * scale
        # the native pick is the torch pick or within that rounding of it (random weights give near-ties)
        picked = want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
        assert (picked >= want.max(-1).values - 0.03 * scale).all()
    assert (dec.cache.k.float() - cache_ref.k.float()).abs().max() < 0.05


def test_decoder_uses_it_and_generate_is_unchanged(monkeypatch):
    net = text_net(tie_word_embeddings=True)
    assert Decoder(net, 1, 16).native is not None
    assert Decoder(net, native_decode.MAX_ROWS + 1, 16).native is not None  # used for steps of <= MAX_ROWS rows
    monkeypatch.setenv("LLAVA_FAST_NATIVE_DECODE", "0")  # read when a model is prepared (its plan)
    assert Decoder(net, 1, 16).native is not None
    assert Decoder(text_net(tie_word_embeddings=True), 1, 16).native is None

    def greedy(native):
        dec = Decoder(net, 2, 30)
        dec.native = native_decode.NativeDecodeStep(net) if native else None
        tok = dec.prefill([[5, 6, 7, 8], [9, 10, 11, 12]]).argmax(-1)
        out = [tok]
        for _ in range(12):
            tok = dec.step(tok).argmax(-1)
            out.append(tok)
        return torch.stack(out)

    assert torch.equal(greedy(True), greedy(False))


def test_errors_write_nothing():
    net = text_net()
    dec = prefilled(net, [3, 39], capacity=40)  # row 1 fills the 40-position cache but its last slot
    native = native_decode.for_model(net)
    k, lengths = dec.cache.k.clone(), dec.lengths.clone()
    with pytest.raises(ValueError, match="token id"):
        native(dec.cache, dec.lengths, torch.tensor([1, 301]))
    native(dec.cache, dec.lengths, torch.tensor([1, 2]))  # position 39: the last one
    k, lengths = dec.cache.k.clone(), dec.lengths.clone()
    with pytest.raises(ValueError, match="cache is full"):
        native(dec.cache, dec.lengths, torch.tensor([1, 2]))
    assert torch.equal(dec.cache.k, k) and torch.equal(dec.lengths, lengths)


def test_why_not():
    assert native_decode.why_not(text_net()) is None
    net = text_net(dtype=torch.float16)
    assert "float16" in native_decode.why_not(net) and native_decode.for_model(net) is None


def test_an_odd_k_bfloat16_model_decodes_in_torch():
    """The bfloat16 kernels need an even K: a bfloat16 model with an odd MLP width (down_proj's K = 101) is not the
    native step's (why_not names the layer) and its Decoder runs the torch path instead of raising."""
    net = text_net(dtype=torch.bfloat16, intermediate_size=101)
    assert "odd in_features" in native_decode.why_not(net) and "in_features=101" in native_decode.why_not(net)
    assert native_decode.for_model(net) is None
    dec = Decoder(net, 1, 40)
    assert dec.native is None
    ids = torch.randint(0, 301, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = dec.prefill_slot(0, ids)
    want = net.lm_head(net.decode_hidden(net.language_model.embed_tokens.weight[torch.tensor(ids)][None],
                                         Decoder(net, 1, 40).cache, None, None)[:, -1]).float()
    assert logits.std() > 1e-2 and torch.equal(logits, want)


def test_rebuilt_when_the_weights_move():
    net = text_net()
    first = native_decode.for_model(net)
    assert native_decode.for_model(net) is first
    net.lm_head.weight = torch.nn.Parameter(net.lm_head.weight.detach().clone(), requires_grad=False)
    assert native_decode.for_model(net) is not first
    # a weight in the middle of the model, replaced on its own: the step must follow it, not read the old copy
    second = native_decode.for_model(net)
    o_proj = net.language_model.layers[1].self_attn.o_proj
    o_proj.weight = torch.nn.Parameter(o_proj.weight.detach() * 3, requires_grad=False)
    assert native_decode.for_model(net) is not second
    pairs = both_steps(net, [4, 2], steps=2)[0]
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_long_context_splits_attention_over_the_pool():
    # rows x heads x context x head_dim >= 64k multiply-adds: attention runs on the GEMV pool's threads,
    # with chunk counts changing between calls (the pool's ticket must carry each call's own count).
    net = text_net(max_position_embeddings=700)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pairs, dec, cache_ref, lengths_ref = both_steps(net, [600, 357, 480], steps=3)
        for got, want in pairs:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        native = native_decode.for_model(net)
        for i in range(30):  # 1, 2, 3 rows in turn: 3, 6, 9 attention chunks
            n = i % 3 + 1
            tokens = torch.full((n,), 7)
            lengths = dec.lengths[:n].clone()
            got = native(dec.cache.rows(0, n), lengths, tokens)
            want = decode_step(net, dec.cache.rows(0, n), dec.lengths[:n].clone(), tokens)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_more_rows_than_the_gemv_path():
    # 12 rows: above gemv.MAX_GEMV_ROWS (the torch step's GEMM switch), still one native step (MAX_ROWS)
    assert gemv.MAX_GEMV_ROWS < 12 <= native_decode.MAX_ROWS
    net = text_net(attention_bias=True)
    pairs, dec, cache_ref, lengths_ref = both_steps(net, [3, 9, 1, 14, 6, 2, 11, 5, 8, 4, 7, 10], steps=2)
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(dec.lengths, lengths_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_of_gates_far_from_zero_equals_torch(dtype):
    """SwiGLU's vectorised exp (decode.cpp exp16) takes e^-g of either sign: gates beyond +-88 make e^-g underflow
    or overflow to inf, so silu(g) = g / (1 + e^-g) must come out g or -0 as torch's F.silu gives."""
    net = text_net(dtype=dtype)
    intermediate = net.cfg.text.intermediate_size
    with torch.no_grad():
        for layer in net.language_model.layers:
            layer.mlp.gate_up_proj.weight[:intermediate] *= 300
    gates = []
    hook = net.language_model.layers[0].mlp.gate_up_proj.register_forward_hook(
        lambda module, args, out: gates.append(out[..., :intermediate].float().reshape(-1)))
    try:
        pairs = both_steps(net, [5, 8], steps=2)[0]
    finally:
        hook.remove()
    gates = torch.cat(gates)
    assert gates.max() > 100 and gates.min() < -100 and (gates.abs() < 10).any()
    for got, want in pairs:
        scale = want.abs().max()
        tol = 1e-4 if dtype == torch.float32 else 0.03  # bfloat16: as test_bfloat16_follows_torch_rounding
        assert (got - want).abs().max() <= tol * scale


def _twin_decoders(net, batch, capacity):
    """Two decoders with the same stale cache contents: one prefills natively, the other through torch."""
    native, torch_path = Decoder(net, batch, capacity), Decoder(net, batch, capacity)
    assert native.native is not None and native.plan.prefill == "native"
    torch_path.native = None
    native.cache.k.normal_(), native.cache.v.normal_()
    torch_path.cache.k.copy_(native.cache.k), torch_path.cache.v.copy_(native.cache.v)
    return native, torch_path


def _assert_same_state(a, b):
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.cache.k, b.cache.k, atol=1e-5, rtol=1e-5)  # written rows; the rest untouched
    torch.testing.assert_close(a.cache.v, b.cache.v, atol=1e-5, rtol=1e-5)


@needs_native_prefill
@pytest.mark.parametrize("text", [{}, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
                                  {"num_heads": 4, "num_kv_heads": 2, "hidden_size": 128},  # head_dim 32
                                  {"num_heads": 2, "num_kv_heads": 1, "hidden_size": 192},  # 96: blocks of 2
                                  {"num_heads": 2, "num_kv_heads": 2, "hidden_size": 256}])  # 128
def test_native_prefill_equals_torch_prefill(text):
    """Prompts of 1, 64, 129 and 150 tokens (the native forward takes up to 128 rows at a time, in equal chunks:
    a later chunk attends to the K/V the earlier ones wrote), after cached prefixes, ragged in one batch, and one
    row alone."""
    net = text_net(max_position_embeddings=300, **text)
    native, ref = _twin_decoders(net, 4, 240)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 301, (n,), generator=g).tolist() for n in (1, 64, 129, 150)]
    for start in (None, [0, 5, 17, 80]):
        got, want = native.prefill(rows, start_pos=start), ref.prefill(rows, start_pos=start)
        assert want.std() > 1e-2
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        _assert_same_state(native, ref)
    ids = torch.randint(0, 301, (70,), generator=g).tolist()  # a request joining cache row 2 after 9 cached tokens
    torch.testing.assert_close(native.prefill_slot(2, ids, start_pos=9), ref.prefill_slot(2, ids, start_pos=9),
                               atol=1e-4, rtol=1e-4)
    _assert_same_state(native, ref)
    for _ in range(3):  # and decoding from there agrees
        tokens = torch.randint(0, 301, (4,), generator=g)
        torch.testing.assert_close(native.step(tokens), ref.step(tokens), atol=1e-4, rtol=1e-4)


@needs_native_prefill
@pytest.mark.parametrize("text", [{"sliding_window": 7},  # head_dim 24: the generic per-row loop
                                  {"sliding_window": 1, "num_heads": 2, "num_kv_heads": 1, "hidden_size": 128},  # 64
                                  {"sliding_window": 37, "num_heads": 2, "num_kv_heads": 1, "hidden_size": 192},  # 96
                                  {"sliding_window": 130, "num_heads": 4, "num_kv_heads": 2, "hidden_size": 128}])
def test_sliding_window_prefill_and_steps_equal_torch(text):
    """Mistral's sliding window natively: prompts of 1, 6, 64, 129 and 150 tokens, fresh and after cached prefixes,
    ragged in one batch (a 150-token prompt is two chunks; rows before and past the window's edge in one attention
    block of 4 or 2 rows), then decode steps from there, against the torch path (whose window test_sliding_window.py
    checks against transformers). The window must change the logits: without it the comparison proves nothing."""
    net = text_net(max_position_embeddings=300, **text)
    assert net.language_model.layers[0].self_attn.window == text["sliding_window"]
    native, ref = _twin_decoders(net, 5, 240)
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, 301, (n,), generator=g).tolist() for n in (1, 6, 64, 129, 150)]
    for start in (None, [0, 9, 5, 17, 80]):
        got, want = native.prefill(rows, start_pos=start), ref.prefill(rows, start_pos=start)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        _assert_same_state(native, ref)
    for _ in range(3):
        tokens = torch.randint(0, 301, (5,), generator=g)
        torch.testing.assert_close(native.step(tokens), ref.step(tokens), atol=1e-4, rtol=1e-4)
    for layer in ref.net.language_model.layers:  # the same model without its window: other logits
        layer.self_attn.window = 0
    ref.reset()
    assert (ref.prefill(rows) - native.prefill(rows)).abs().max() > 1e-3


@needs_native_prefill
def test_native_prefill_with_image_features():
    from llava_fast.presets import random_model

    model = random_model("tiny")
    net = model.net
    ids = model.encode_prompt("What is in the image?", 1)
    pixels = torch.randn(1, 3, net.cfg.vision.image_size, net.cfg.vision.image_size,
                         generator=torch.Generator().manual_seed(4))
    native, ref = _twin_decoders(net, 1, len(ids) + 4)
    got, want = native.prefill([ids], pixels), ref.prefill([ids], pixels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    _assert_same_state(native, ref)
    features = net.image_features(model.pixel_values([model_image()]))
    torch.testing.assert_close(native.prefill_slot(0, ids, features), ref.prefill_slot(0, ids, features),
                               atol=1e-4, rtol=1e-4)


def model_image():
    from PIL import Image

    from llava_fast.presets import BUNDLED_IMAGE

    return Image.open(BUNDLED_IMAGE).convert("RGB")


@needs_native_prefill
def test_native_prefill_only_for_float32_int8_int4_and_bfloat16_weights_and_errors_write_nothing():
    bf16 = "native" if native_decode.native_bf16_prefill() else "torch"
    assert plan.for_model(text_net(dtype=torch.bfloat16)).prefill == bf16
    assert plan.for_model(text_net(quantize="int8wo")).prefill == "native"
    assert plan.for_model(text_net(dtype=torch.bfloat16, quantize="int8wo")).prefill == "torch"
    assert plan.for_model(text_net(quantize="int4wo-32", hidden_size=96, intermediate_size=160)).prefill == "native"
    net = text_net()
    dec = Decoder(net, 2, 20)
    dec.prefill_slot(0, [1, 2, 3])
    k, lengths = dec.cache.k.clone(), dec.lengths.clone()
    with pytest.raises(ValueError, match="cache is full"):
        dec.prefill_slot(1, list(range(21)))
    with pytest.raises(ValueError, match="cache is full"):
        dec.prefill_slot(0, list(range(18)), start_pos=3)
    assert torch.equal(dec.cache.k, k) and torch.equal(dec.lengths, lengths)


def test_no_native_prefill_on_the_scalar_gemv():
    """With the scalar kernel table the GEMV has no tiles: SmolLM2 float32 prefill 11 tok/s natively vs the torch
    path's 289. The Decoder then prefills through torch (the bits of a decoder with native=None) and still steps
    natively; switching back to the best table (AVX-512 or AVX2) makes the native prefill run again."""
    net = text_net(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=160)
    ids = torch.randint(0, 301, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    assert gemv._C.gemv_use_kernels("scalar")
    try:
        dec, ref = Decoder(net, 1, 48), Decoder(net, 1, 48)
        assert dec.native is not None and dec.plan.prefill == "torch"
        ref.native = None
        assert torch.equal(dec.prefill([ids]), ref.prefill([ids]))
        assert torch.equal(dec.prefill_slot(0, ids[:20]), ref.prefill_slot(0, ids[:20]))
        assert torch.equal(dec.cache.k, ref.cache.k) and torch.equal(dec.lengths, ref.lengths)
    finally:
        assert gemv._C.gemv_use_kernels("best")
    assert (plan.for_model(net).prefill == "native") is (gemv._C.cpu_isa() in ("avx512", "avx2"))


@needs_native_prefill
@pytest.mark.parametrize("text", [{"num_heads": 4, "num_kv_heads": 2, "hidden_size": 128},  # head_dim 32
                                  {"num_heads": 2, "num_kv_heads": 1, "hidden_size": 128},  # head_dim 64
                                  {"num_heads": 2, "num_kv_heads": 1, "hidden_size": 128, "intermediate_size": 160,
                                   "quantize": "int4wo-32"},  # the int4 prefill GEMM (gemm_q4.cpp)
                                  {"num_heads": 2, "num_kv_heads": 1, "hidden_size": 100, "intermediate_size": 150,
                                   "quantize": "int8wo"}])  # the int8 one (gemm_q8.cpp), K = 100: a partial block
def test_native_prefill_bits_do_not_depend_on_how_the_prompt_is_split(text):
    """The server prefills only what follows a reused prefix (scheduler.py), generate() the whole prompt: the
    K/V and logits must be the same bits, wherever the split falls (attention blocks of 4 rows, 75-row chunks,
    the int4 and int8 GEMMs' micro-tiles of 2-4 rows; float32 on the AVX-512 tables: the whole prompt and a
    149-row part through the prompt GEMM, the other parts through the GEMV tiles)."""
    net = text_net(max_position_embeddings=300, **text)
    ids = torch.randint(0, 301, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    whole = Decoder(net, 1, 160)
    assert whole.plan.prefill == "native"
    want = whole.prefill_slot(0, ids)
    for split in (1, 37, 64, 66, 149):
        part = Decoder(net, 1, 160)
        part.prefill_slot(0, ids[:split])
        got = part.prefill_slot(0, ids[split:], start_pos=split)
        assert torch.equal(got, want), split
        assert torch.equal(part.cache.k[:, :, :, :150], whole.cache.k[:, :, :, :150]), split
        tokens = torch.tensor([7])
        assert torch.equal(part.step(tokens), whole.step(tokens)), split  # and a decode step from there
        whole.lengths.fill_(150)
    planned = plan.for_model(net)
    try:  # nor on the thread count (the pool's row ranges move; vocab 301: the lm_head's do not split evenly)
        for threads in (1, 3):
            plan.use(net, dataclasses.replace(planned, threads=threads))
            assert torch.equal(Decoder(net, 1, 160).prefill_slot(0, ids), want), threads
    finally:
        plan.use(net, planned)


@needs_native_prefill
@pytest.mark.parametrize("quantize", ["int8wo", "int4wo-32"])
def test_quantized_native_prefill_agrees_with_its_decode_steps_and_the_torch_prefill(quantize):
    """The Decoder prefills int8 / int4 models natively through the GEMMs (gemm_q8.cpp, gemm_q4.cpp), decodes
    through the GEMV: two summation orders of the same products (W times x quantized per 32-block), so the logits
    and K/V of a prompt prefilled at once and fed one token at a time agree to float32 rounding, not bit for bit.
    The torch prefill (bfloat16 GEMMs on the dequantized weight, x not quantized) is close."""
    net = text_net(quantize=quantize, hidden_size=96, num_heads=4, num_kv_heads=2, intermediate_size=160)
    ids = torch.randint(0, 301, (71,), generator=torch.Generator().manual_seed(6)).tolist()
    whole, steps, ref = Decoder(net, 1, 80), Decoder(net, 1, 80), Decoder(net, 1, 80)
    assert whole.plan.prefill == "native"
    ref.native = None
    want = whole.prefill([ids])
    steps.native.prefill(steps.cache, 0, 0, net.embed(torch.tensor([ids[:1]]))[0])
    steps.lengths[0] = 1
    for t in ids[1:]:
        got = steps.step(torch.tensor([t]))
    scale = want.abs().max()
    assert want.std() > 1e-2
    # int4: measured > 0 (other bits); int8 at these few 32-blocks can round the same way, so only the bound
    assert (got - want).abs().max() <= 1e-4 * scale and (quantize == "int8wo" or (got - want).abs().max() > 0)
    torch.testing.assert_close(steps.cache.k[:, :, :, :71], whole.cache.k[:, :, :, :71], atol=1e-4, rtol=1e-4)
    assert (ref.prefill([ids]) - want).abs().max() <= 5e-2 * scale
    for _ in range(3):  # decoding on from the GEMM's K/V
        tokens = torch.randint(0, 301, (1,))
        torch.testing.assert_close(whole.step(tokens), ref.step(tokens), atol=5e-2 * scale.item(), rtol=0)


@pytest.mark.parametrize("hidden_size", [192, 72])  # head_dim 64 (the register-resident kernel), 24 (generic)
def test_an_inf_in_the_weights_gives_nan_as_torch_does(hidden_size):
    """An inf in a q projection makes a NaN attention score; torch's softmax (and the generic loop) turn it into
    NaN logits. The vectorised exp clamped it to a weight of ~0 and returned plausible finite logits."""
    net = text_net(hidden_size=hidden_size)
    with torch.no_grad():
        net.language_model.layers[1].self_attn.qkv_proj.weight[0, 0] = float("inf")
    got, want = both_steps(net, [5, 8], steps=1)[0][0]
    assert want.isnan().all(-1).any()
    assert torch.equal(got.isnan(), want.isnan())


# Every table with a multi-row bfloat16 kernel: AMX tiles, the VDPBF16PS tile, AVX2's widening FMA tile.
BF16_TABLES = [t["name"] for t in gemv._C.cpu_isa_tables() if t["usable"] and t["family"] in ("avx512", "avx2")] \
    if gemv.NATIVE else []


@pytest.mark.skipif(not BF16_TABLES, reason="no AVX-512 or AVX2 kernel table on this CPU")
@pytest.mark.parametrize("table", BF16_TABLES)
def test_bfloat16_batched_step_rows_equal_each_row_alone(table):
    """The server's guarantee for bfloat16 weights: a row of a decode step of 7 or 16 rows (AMX tiles of 16
    activation rows, the VDPBF16PS or the AVX2 tile) gets the bits it gets alone, whatever the other rows hold."""
    net = text_net(dtype=torch.bfloat16, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=160)
    assert gemv._C.gemv_use_kernels(table)
    try:
        g = torch.Generator().manual_seed(8)
        for B in (7, 16):
            rows = [torch.randint(0, 301, (n,), generator=g).tolist() for n in torch.randint(1, 30, (B,), generator=g)]
            batch = Decoder(net, B, 40)
            assert batch.native is not None
            for b, ids in enumerate(rows):
                batch.prefill_slot(b, ids)
            tokens = torch.randint(0, 301, (2, B), generator=g)
            got = [batch.step(tokens[0]), batch.step(tokens[1])]
            assert got[1].std() > 1e-2
            for r in (0, B // 2, B - 1):
                alone = Decoder(net, 1, 40)
                alone.prefill_slot(0, rows[r])
                for i in range(2):
                    assert torch.equal(alone.step(tokens[i, r:r + 1]), got[i][r:r + 1]), (table, B, r, i)
    finally:
        assert gemv._C.gemv_use_kernels("best")


@pytest.mark.skipif(not BF16_TABLES, reason="no AVX-512 or AVX2 kernel table on this CPU")
@pytest.mark.parametrize("table", BF16_TABLES)
def test_bfloat16_native_prefill(table):
    """On the AVX-512 and AVX2 tables a bfloat16 model prefills natively: close to the torch prefill (bfloat16
    rounding), and the same bits however the prompt is split into calls (the kernels' sums depend on K alone)."""
    net = text_net(dtype=torch.bfloat16, max_position_embeddings=300, hidden_size=128, num_heads=4, num_kv_heads=2,
                   intermediate_size=160)
    assert gemv._C.gemv_use_kernels(table)
    try:
        ids = torch.randint(0, 301, (150,), generator=torch.Generator().manual_seed(9)).tolist()
        whole, ref = Decoder(net, 1, 160), Decoder(net, 1, 160)
        assert whole.plan.prefill == "native"
        ref.native = None
        want, torch_logits = whole.prefill_slot(0, ids), ref.prefill_slot(0, ids)
        scale = torch_logits.abs().max()
        assert torch_logits.std() > 1e-2 and (want - torch_logits).abs().max() <= 0.03 * scale
        for split in (1, 17, 66, 149):
            part = Decoder(net, 1, 160)
            part.prefill_slot(0, ids[:split])
            assert torch.equal(part.prefill_slot(0, ids[split:], start_pos=split), want), split
            assert torch.equal(part.cache.k[:, :, :, :150], whole.cache.k[:, :, :, :150]), split
    finally:
        assert gemv._C.gemv_use_kernels("best")


@pytest.mark.skipif(not BF16_TABLES, reason="no AVX-512 or AVX2 kernel table on this CPU")
@pytest.mark.parametrize("table", BF16_TABLES)
def test_bfloat16_prompt_chunks_follow_the_table_and_keep_the_bits(table):
    """A bfloat16 prompt goes through the layers in chunks of the table's rows: 512 on the AMX table (its GEMM's
    cost per row falls up to there), 128 elsewhere and for a model with a non-bfloat16 linear. A 1,100-token
    prompt (3 chunks of 367 on AMX, 9 of 123 elsewhere) gives the same logits and K/V wherever it is split."""
    net = text_net(dtype=torch.bfloat16, max_position_embeddings=1200, hidden_size=128, num_heads=4, num_kv_heads=2,
                   intermediate_size=160)
    assert gemv._C.gemv_use_kernels(table)
    try:
        whole, ref = Decoder(net, 1, 1110), Decoder(net, 1, 1110)
        assert whole.plan.prefill == "native"
        assert whole.native.model.prompt_chunk_rows() == (512 if table == "avx512_amx" else 128)
        ref.native = None
        ids = torch.randint(0, 301, (1100,), generator=torch.Generator().manual_seed(10)).tolist()
        want, torch_logits = whole.prefill_slot(0, ids), ref.prefill_slot(0, ids)
        scale = torch_logits.abs().max()
        assert torch_logits.std() > 1e-2 and (want - torch_logits).abs().max() <= 0.03 * scale
        for split in (1, 367, 512, 700, 1099):
            part = Decoder(net, 1, 1110)
            part.prefill_slot(0, ids[:split])
            assert torch.equal(part.prefill_slot(0, ids[split:], start_pos=split), want), split
            assert torch.equal(part.cache.k[:, :, :, :1100], whole.cache.k[:, :, :, :1100]), split
            assert torch.equal(part.cache.v[:, :, :, :1100], whole.cache.v[:, :, :, :1100]), split
    finally:
        assert gemv._C.gemv_use_kernels("best")
    int8 = text_net(dtype=torch.bfloat16, quantize="int8wo", hidden_size=128, num_heads=4, num_kv_heads=2,
                    intermediate_size=160)
    assert Decoder(int8, 1, 16).native.model.prompt_chunk_rows() == 128


# bfloat16 prefills natively (and so mixes) only while an AVX-512 or AVX2 table is the active one: not under
# LLAVA_FAST_CPU_ISA=scalar, which .ci/run forces for this file among others.
MIXED_DTYPES = [torch.float32] + ([torch.bfloat16] if native_decode.native_bf16_prefill() else [])


@needs_native_prefill
@pytest.mark.parametrize("dtype", MIXED_DTYPES)
def test_mixed_step_rows_get_their_bits_alone(dtype):
    """The server's iteration as one call (Decoder.mixed_step): 3 decoding rows and 2 prompt slices (one of 130
    positions after 11 cached ones, so 135 rows split into two chunks mid-slice; one of 5 fresh ones) give each
    row the bits of its decode step alone and each slice the bits of its prefill alone: logits, K/V and lengths.
    The row not named keeps its K/V and length. bfloat16 runs on the AVX-512 and AVX2 tables (plan.py)."""
    net = text_net(dtype=dtype, max_position_embeddings=300, hidden_size=128, num_heads=4, num_kv_heads=2,
                   intermediate_size=160)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 301, (n,), generator=g).tolist() for n in (9, 11, 23, 1, 17, 4)]
    prompts[3] = []  # slot 3 starts empty: its slice is a whole prompt
    mixed = Decoder(net, 6, 160)
    assert mixed.mixes
    mixed.cache.k.normal_(), mixed.cache.v.normal_()  # stale content must never be read
    for slot, ids in enumerate(prompts):
        if ids:
            mixed.prefill_slot(slot, ids)
    before_k, before_v = mixed.cache.k[:, 5].clone(), mixed.cache.v[:, 5].clone()
    lengths = mixed.lengths.clone()
    decoding, tokens = [0, 2, 4], [5, 300, 77]
    slices = [(slot, torch.randint(0, 301, (n,), generator=g).tolist()) for slot, n in ((1, 130), (3, 5))]
    embed = net.language_model.embed_tokens.weight
    step_logits, slice_logits = mixed.mixed_step(decoding, tokens, [
        (slot, embed[torch.tensor(ids)], int(lengths[slot])) for slot, ids in slices])
    assert step_logits.shape == (3, 301) and slice_logits.shape == (2, 301) and step_logits.std() > 1e-2
    for i, slot in enumerate(decoding):
        alone = Decoder(net, 1, 160)
        alone.prefill_slot(0, prompts[slot])
        assert torch.equal(alone.step(torch.tensor([tokens[i]]))[0], step_logits[i]), slot
        n = len(prompts[slot]) + 1
        assert torch.equal(alone.cache.k[:, 0, :, :n], mixed.cache.k[:, slot, :, :n]), slot
        assert int(mixed.lengths[slot]) == n
    for i, (slot, ids) in enumerate(slices):
        alone = Decoder(net, 1, 160)
        if prompts[slot]:
            alone.prefill_slot(0, prompts[slot])
        assert torch.equal(alone.prefill_slot(0, ids, start_pos=len(prompts[slot]))[0], slice_logits[i]), slot
        n = len(prompts[slot]) + len(ids)
        assert torch.equal(alone.cache.v[:, 0, :, :n], mixed.cache.v[:, slot, :, :n]), slot
        assert int(mixed.lengths[slot]) == n
    assert int(mixed.lengths[5]) == int(lengths[5])
    assert torch.equal(mixed.cache.k[:, 5], before_k) and torch.equal(mixed.cache.v[:, 5], before_v)


@needs_native_prefill
@pytest.mark.parametrize("quantize", ["int4wo-32", "int8wo"])
def test_no_mixed_step_with_int4_or_int8_projections(quantize):
    """int4 and int8 projections prefill through their own GEMMs (not the GEMV's bits): the decoder does not mix,
    and the native call refuses rather than give a decode row a prompt row's bits."""
    net = text_net(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=160, quantize=quantize)
    dec = Decoder(net, 2, 40)
    if dec.plan.prefill != "native":  # a table whose plan keeps this format's prefill on torch: nothing mixes
        assert not dec.mixes
        return
    assert not dec.mixes
    with pytest.raises(ValueError, match="int4 and int8"):
        dec.mixed_step([0], [3], [])
    assert Decoder(text_net(), 2, 40).mixes


@needs_native_prefill
def test_native_steps_keep_torch_on_one_thread_and_give_its_count_back():
    """Between and inside native steps torch runs on one thread (gemv.torch_one_thread): an OpenMP region there
    leaves torch's workers spinning through the native step against its pool. The caller's thread count comes
    back after each call, also when the call raises."""
    net = text_net(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=160)
    dec = Decoder(net, 2, 40)
    assert dec.native is not None
    native, seen = dec.native, []

    class Spy:
        def __call__(self, *args):
            seen.append(("step", torch.get_num_threads()))
            return native(*args)

        def mixed(self, *args):
            seen.append(("mixed", torch.get_num_threads()))
            if len(seen) == 3:
                raise RuntimeError("refused")
            return native.mixed(*args)

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        dec.prefill_slot(0, [3, 4]), dec.prefill_slot(1, [5])
        dec.native = Spy()
        assert dec.step(torch.tensor([7, 8])).shape == (2, 301) and torch.get_num_threads() == 3
        assert dec.mixed_step([0, 1], [1, 2], [])[0].shape == (2, 301) and torch.get_num_threads() == 3
        with pytest.raises(RuntimeError, match="refused"):
            dec.mixed_step([0], [1], [])
        assert torch.get_num_threads() == 3
        with dec.host_threads():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert seen == [("step", 1), ("mixed", 1), ("mixed", 1)]
