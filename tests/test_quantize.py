"""Weight-only quantization (llava_fast/cpu/quantize.py) and the native CPU GEMV it runs on (csrc/gemv.cpp).

The GEMV kernels themselves are tested in tests/test_gemv.py. Quantized models: load, generate, stream and CLI on
the tiny preset and a llava-hf checkpoint; error bounds on real weights (SmolLM2-135M-Instruct, fetched once via
pip) against the float32 model.
"""

import os
import subprocess
import sys

import checkpoints as ck
import pytest
import torch

import llava_fast
from llava_fast.cpu import gemv as G
from llava_fast.cpu.quantize import quantize_weight
from llava_fast.errors import InputError
from llava_fast.presets import random_model

pytest.importorskip("torchao", reason="quantization tests need torchao (pip install torchao)")


def test_q4_packing_round_trips():
    q = torch.randint(0, 16, (5, 64))
    packed, _, _ = G.pack_q4(q, torch.ones(5, 2), torch.zeros(5, 2))
    assert packed.shape == (5, 32) and torch.equal(G.unpack_q4(packed), q.to(torch.uint8))


def test_quantized_weights_are_close_to_the_float_weight():
    from llava_fast.cpu.quantize import quantize_weight

    w = torch.randn(64, 128) * 0.05
    for bits, group, bound in ((8, None, 0.01), (4, 32, 0.15), (4, 128, 0.2)):
        layer = quantize_weight(w, bits, group)
        err = (layer.dequantized() - w).abs().max() / w.abs().max()
        assert 0 < err < bound, (bits, group, err)


@pytest.mark.parametrize("scheme,needle", [("int3", "unknown quantization scheme"), ("int4wo-48", "group size 48"),
                                           ("int4wo-64", "use int4wo-32"), ("", "unknown")])
def test_bad_schemes_raise_input_error(scheme, needle):
    with pytest.raises(InputError, match=needle):
        random_model("tiny", device="cpu", quantize=scheme)  # tiny's MLP is 1376 wide: 32 fits, 64 does not


def test_missing_torchao_names_the_pip_command(monkeypatch):
    from llava_fast.cpu.quantize import quantize_language_model

    net = random_model("tiny", device="cpu").net
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(InputError, match="pip install torchao"):
        quantize_language_model(net, "int8wo")


@pytest.mark.parametrize("scheme,bound", [("int8wo", 0.05), ("int4wo-32", 0.4)])  # random weights: loose
def test_quantized_tiny_model_generates_and_streams(scheme, bound):
    ids = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = random_model("tiny", device="cpu").logits(ids)
    model = random_model("tiny", device="cpu", quantize=scheme)
    assert isinstance(model.net.lm_head, G.GemvLinear) and model.net.lm_head.format in (G.Q8, G.Q4)
    assert model.net.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32  # vision untouched
    err = (model.logits(ids) - ref).abs().max() / ref.abs().max()
    assert 0 < err < bound
    text = model.generate("Hello", max_new_tokens=6, template="llava_v1")
    assert "".join(model.stream("Hello", max_new_tokens=6, template="llava_v1")) == text
    assert model.last_stats["new_tokens"] == 6


def test_int4_schemes_keep_lm_head_int8():
    """As llama.cpp's Q4_0/Q4_1 files keep output.weight at Q8_0: the decoder's projections int4, lm_head int8, whose
    error on the same weight is far below int4's."""
    model = random_model("tiny", device="cpu", quantize="int4wo-32")
    layer = model.net.language_model.layers[0]
    assert layer.self_attn.qkv_proj.format == G.Q4 and layer.mlp.down_proj.format == G.Q4
    assert model.net.lm_head.format == G.Q8
    w = random_model("tiny", device="cpu").net.lm_head.weight
    err8 = (model.net.lm_head.dequantized() - w).abs().mean()
    err4 = (quantize_weight(w, 4, 32).dequantized() - w).abs().mean()
    assert 0 < err8 < err4 / 8


def test_quantized_checkpoint_loads_and_matches_float_greedy_closely(tmp_path):
    path = ck.write_checkpoint(ck.make_hf_model(seed=3), str(tmp_path), "hub")
    full = llava_fast.load(path, device="cpu", dtype="float32")
    q = llava_fast.load(path, device="cpu", dtype="float32", quantize="int8wo")
    assert q.net.quantization == "int8wo"
    rows = [[1, 450, 4996, 17354, 1701, 432]]
    a = full.generate_ids(rows, max_new_tokens=8, eos_token_id=None)
    b = q.generate_ids(rows, max_new_tokens=8, eos_token_id=None)
    assert sum(x == y for x, y in zip(a[0], b[0])) >= 6  # random weights: near-ties may flip a token or two
    with pytest.raises(InputError, match="not a multiple of the group size 32"):  # the MLP is 136 wide
        llava_fast.load(path, device="cpu", quantize="int4wo-32")


def test_cli_quantize_flag():
    def run(*a):
        return subprocess.run([sys.executable, "-m", "llava_fast", *a], capture_output=True, text=True, timeout=300)

    r = run("generate", "--quantize", "int4wo-32", "--no-image", "--prompt", "Hi", "--max-new-tokens", "3",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    r = run("generate", "--quantize", "int5", "--no-image", "--device", "cpu")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "int5" in last and last.startswith("llava-fast: error")


# ------------------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct (bench/real_model.py builds its llava-hf checkpoint once, cached)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir():
    pytest.importorskip("gguf", reason="needs the gguf package (pip install gguf)")
    pytest.importorskip("accelerate", reason="transformers loads GGUF through accelerate (pip install accelerate)")
    os.environ.setdefault("LLAVA_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llava-fast-tests"))
    from llava_fast.bench import real_model

    try:
        return real_model.llava_dir()
    except InputError as e:
        if "package registry" in str(e):
            pytest.skip(f"registry unreachable: {e}")
        raise


@pytest.mark.slow
def test_quantization_error_on_real_weights(smollm2_dir):
    """Perplexity on 256 tokens of the GPL text and top-1 agreement with float32: int8 within 2% / 93%,
    int4 (group 32) within 25% / 70% (measured at 2,048 tokens: bench/RESULTS.md)."""
    from llava_fast.bench.real_bench import load_text_ids

    stats = {}
    for scheme in (None, "int8wo", "int4wo-32"):
        model = llava_fast.load(smollm2_dir, device="cpu", dtype="float32", quantize=scheme)
        ids = load_text_ids(model.tokenizer, 256)
        logits = model.logits(torch.tensor([ids]))[0, :-1]
        ppl = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp().item()
        stats[scheme] = ppl, logits.argmax(-1)
    ppl32, top32 = stats[None]
    assert 2 < ppl32 < 40, ppl32  # a real model reads a licence text easily; random weights give ~50,000
    for scheme, (ppl_bound, agree_bound) in {"int8wo": (1.02, 0.93), "int4wo-32": (1.25, 0.70)}.items():
        ppl, top = stats[scheme]
        agree = (top == top32).float().mean().item()
        assert ppl / ppl32 < ppl_bound and agree > agree_bound, (scheme, ppl, ppl32, agree)
