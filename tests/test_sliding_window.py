"""Mistral's sliding-window attention against transformers' MistralForCausalLM (inside its
LlavaForConditionalGeneration) with a window of 7 tokens: full-sequence logits, and greedy text through every
attention path that generate() takes (the torch prefill and decode, the native CPU prefill and decode step, the
Triton kernels), with prompts shorter and longer than the window, of odd lengths, batched and alone, so prefill
and decode both cross the window's edge; the server's replies equal generate()'s.
"""

import checkpoints as ck
import pytest
import torch
from checkpoints import DEVICE

import llava_fast
from llava_fast.cpu import gemv

WINDOW = 7
NEW_TOKENS = 12
IMAGE_ID = 32000


@pytest.fixture(scope="module")
def hf_model():
    return ck.make_hf_model(seed=11, text_model="mistral", mistral={"sliding_window": WINDOW})


@pytest.fixture(scope="module")
def checkpoint_dir(hf_model, tmp_path_factory):
    return ck.write_checkpoint(hf_model, str(tmp_path_factory.mktemp("mistral-window")), "save_pretrained")


def _rows():
    g = torch.Generator().manual_seed(5)

    def text(k):
        return torch.randint(3, 32000, (k,), generator=g).tolist()

    # 4 image positions (28 px, 14-px patches). Lengths 15, 13 and 3: two prompts past the window, one that
    # crosses it while decoding.
    return [[1] + text(3) + [IMAGE_ID] * 4 + text(7), [1] + text(12), [1] + text(2)], [1, 0, 0]


def _unwindowed(model):
    for layer in model.net.language_model.layers:
        layer.self_attn.window = 0


def test_config_carries_the_window(checkpoint_dir):
    model = llava_fast.load(checkpoint_dir, device=DEVICE, dtype="float32")
    assert model.config.text.sliding_window == WINDOW
    assert all(layer.self_attn.window == WINDOW for layer in model.net.language_model.layers)


def test_logits_match_transformers(hf_model, checkpoint_dir, backend):
    model = llava_fast.load(checkpoint_dir, device=DEVICE, dtype="float32")
    rows, images = _rows()
    pixels = ck.random_pixels(1, 28, seed=2)
    for row, n in zip(rows, images):
        pv = pixels if n else None
        ours = model.logits([row], pv).cpu()
        with torch.no_grad():
            ref = hf_model(input_ids=torch.tensor([row]), pixel_values=pv).logits
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        if len(row) > WINDOW:  # the window changes these logits: without it the test would fail
            _unwindowed(model)
            assert (model.logits([row], pv).cpu() - ref).abs().max() > 1e-3
            model = llava_fast.load(checkpoint_dir, device=DEVICE, dtype="float32")


@pytest.mark.parametrize("path", ["torch", "native", "triton"])
def test_greedy_matches_transformers(hf_model, checkpoint_dir, path, monkeypatch):
    """Greedy ids of each prompt alone in transformers; in llava-fast batched (right-padded rows of 15, 13 and 3
    tokens) and alone. torch: the torch prefill and decode; native: csrc/decode.cpp's prefill and step (CPU);
    triton: the Triton prefill and split-KV decode kernels (the interpreter on a CPU)."""
    from llava_fast import ops

    if path == "native" and (DEVICE != "cpu" or not gemv.NATIVE):
        pytest.skip("the native decode step runs on the CPU with llava_fast._C built")
    monkeypatch.setenv("LLAVA_FAST_NATIVE_DECODE", "1" if path == "native" else "0")
    before = ops.BACKEND
    ops.use_backend("triton" if path == "triton" else "torch")
    try:
        model = llava_fast.load(checkpoint_dir, device=DEVICE, dtype="float32")
        rows, images = _rows()
        pixels = ck.random_pixels(1, 28, seed=2)
        batched = model.generate_ids(rows, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        for row, n, got in zip(rows, images, batched):
            pv = pixels if n else None
            with torch.no_grad():
                ref = hf_model.generate(torch.tensor([row]), **({"pixel_values": pv} if n else {}),
                                        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                        pad_token_id=32001)
            expected = ref[0, len(row):].tolist()
            assert len(expected) == NEW_TOKENS
            assert got == expected
            assert model.generate_ids([row], pv, max_new_tokens=NEW_TOKENS, eos_token_id=None)[0] == expected
    finally:
        ops.use_backend(before)


def test_server_replies_equal_generate(checkpoint_dir, monkeypatch):
    """The server decodes its rows with the same attention paths (a slot of the static cache each, prompts entered
    in slices of an odd token budget): concurrent greedy replies, with and without an image, equal generate() of
    each request alone, so the window is applied there too."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
    import concurrent.futures

    from serve_helpers import LiveServer, png_data_url, random_image, user

    from llava_fast.serve.app import ServeConfig

    model = llava_fast.load(checkpoint_dir, device=DEVICE, dtype="float32")
    config = ServeConfig(model_name="window", max_batch=4, max_model_len=512, max_batched_tokens=11)
    server = LiveServer(model, config).start()
    try:
        requests = [[user("Tell me about this picture in some detail please.", png_data_url(random_image(1, 40, 30)))],
                    [user("A question without an image, long enough to pass the window twice over.")],
                    [user("Short?")]]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda m: server.client().chat.completions.create(
                model="window", messages=m, max_tokens=NEW_TOKENS, temperature=0).choices[0].message.content,
                requests))
    finally:
        server.stop()
    expected = [model.generate(m, max_new_tokens=NEW_TOKENS) for m in requests]
    assert replies == expected and len(set(expected)) == len(expected)
