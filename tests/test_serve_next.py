"""`llava-fast serve` with LLaVA-NeXT (AnyRes) images and several images per request, live on 127.0.0.1.

A NeXT image fills a number of prompt positions that depends on its size (base tile, unpadded grid, one newline
per grid row), so the server counts each image's own. The oracle is `generate()` of the same request alone: each
greedy reply (wide, tall and small images, two images in one request, several clients at once so rows with
different tile counts batch together, prompts sliced by a token budget that ends slices mid-image) equals it; the
first token's log-probabilities equal a full forward pass (`logits()`, itself checked against transformers in
test_next_parity.py). A repeated image does not run the vision tower again (its calls are counted), and more
images than --max-images-per-request is a 400 naming the limit. LLaVA-1.5 (the tiny preset) with two images
interleaved with text equals `generate()` too.
"""

from __future__ import annotations

import concurrent.futures

import checkpoints as ck
import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from serve_helpers import LiveServer, png_data_url, random_image  # noqa: E402

import llava_fast  # noqa: E402
from llava_fast.presets import random_model  # noqa: E402
from llava_fast.serve.app import ServeConfig  # noqa: E402

# Odd, so slices end mid-image and mid-word; far below one NeXT image (1,100-2,200 positions here).
BUDGET = 251
# (width, height), as PIL takes them: wide (a 1 x 3 grid: 4 tiles, 2,182 positions), tall (3 x 1: 4 tiles, 2,376),
# small (upscaled onto 1 x 2: 3 tiles, 1,320), odd (2 x 2, unpadded on both sides: 5 tiles, 2,046).
SIZES = {"wide": (1000, 300), "tall": (300, 900), "small": (50, 40), "odd": (700, 450)}
NEW_TOKENS = 10


def image_url(name, seed=0):
    width, height = SIZES[name]
    return png_data_url(random_image(seed * 10 + len(name), width, height))


def user(*parts):
    """A user message of text (str) and image (data URL) parts, in order."""
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") else {"type": "text", "text": p}
               for p in parts]
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    hf = ck.make_hf_next_model(seed=5, vision_layers=2, text_layers=2)
    path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("next")), "save_pretrained")
    return llava_fast.load(path, device=ck.DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def tower_calls(next_model):
    calls = []
    handle = next_model.net.vision_tower.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    yield calls  # tiles per call
    handle.remove()


@pytest.fixture(scope="module")
def live(next_model, tower_calls):
    config = ServeConfig(model_name="next", max_batch=4, max_model_len=4096, max_batched_tokens=BUDGET,
                         max_images_per_request=2, image_cache_mb=64)
    server = LiveServer(next_model, config).start()
    yield server
    server.stop()


def ask(live, messages, max_tokens=NEW_TOKENS, **kw):
    return live.client().chat.completions.create(model=live.config.model_name, messages=messages,
                                                 max_tokens=max_tokens, temperature=0, **kw)


def alone(model, messages, max_tokens=NEW_TOKENS):
    return model.generate(messages, max_new_tokens=max_tokens)


def test_image_positions_depend_on_the_size(next_model):
    counts = next_model.image_token_counts([(h, w) for w, h in SIZES.values()])
    assert counts == [2182, 2376, 1320, 2046] and min(counts) > 2 * BUDGET  # each image spans several slices


def test_concurrent_clients_with_different_tile_counts_get_their_alone_results(live, next_model):
    requests = [
        [user(image_url("wide"), "What is this?")],
        [user("Describe", image_url("tall"), "briefly.")],
        [{"role": "system", "content": "Be short."}, user(image_url("small"), "And this?")],
        [user("Compare", image_url("small", 1), "with", image_url("wide", 1), "please.")],
        [user("Only text, no image at all, " * 3)],
        [user("First", image_url("tall", 2)), {"role": "assistant", "content": "A picture."},
         user("Now", image_url("small", 2), "?")],
        [user(image_url("odd"), "Odd size?")],
    ]
    chunks_before = live.metric("llava_fast_prefill_chunks_total")
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda m: ask(live, m), requests))
    expected = [alone(next_model, m) for m in requests]
    assert [r.choices[0].message.content for r in replies] == expected
    assert len(set(expected)) > 3  # the replies depend on the images, so equal replies are not a coincidence
    # Every image prompt went in as several slices of the budget (4 rows decoding leave it 247 tokens at least).
    prompt_tokens = sum(r.usage.prompt_tokens for r in replies)
    assert prompt_tokens > 12000
    assert live.metric("llava_fast_prefill_chunks_total") - chunks_before >= prompt_tokens / BUDGET


def test_two_images_first_token_logprobs_equal_a_full_forward(live, next_model):
    messages = [user("Compare", image_url("small", 3), "with", image_url("odd", 3), "now.")]
    r = ask(live, messages, max_tokens=1, logprobs=True, top_logprobs=5)
    images = [random_image(30 + len(n), *SIZES[n]) for n in ("small", "odd")]
    ids = next_model.encode_prompt([("user", "Compare\n<image>\nwith\n<image>\nnow.")], 2,
                                   image_sizes=[(im.height, im.width) for im in images])
    assert r.usage.prompt_tokens == len(ids)
    pixel_values, image_sizes = next_model.image_inputs(images)
    reference = torch.log_softmax(next_model.logits([ids], pixel_values, image_sizes)[0, -1], -1).topk(5)
    entry = r.choices[0].logprobs.content[0]
    assert [e.logprob for e in entry.top_logprobs] == pytest.approx(reference.values.tolist(), abs=1e-4)


def test_repeated_image_skips_the_tower(live, next_model, tower_calls):
    url = image_url("wide", 4)
    first = [{"role": "system", "content": "One."}, user(url, "What?")]
    # Another system prompt and question: no K/V prefix is shared, only the image features can be reused.
    second = [{"role": "system", "content": "Another, longer system prompt."}, user("Tell me:", url, "what?")]
    before = len(tower_calls)
    replies = [ask(live, first).choices[0].message.content]
    assert tower_calls[before:] == [4]  # the wide image's base tile + 1 x 3 grid, in one batch
    replies.append(ask(live, second).choices[0].message.content)
    assert tower_calls[before:] == [4]  # not run again
    assert replies == [alone(next_model, first), alone(next_model, second)]
    assert tower_calls[before:] == [4, 4, 4]  # generate() runs it each time: the hook counts every call


def test_too_many_images_is_a_400_naming_the_limit(live):
    body = {"messages": [user(image_url("small", 5), image_url("small", 6), image_url("tall", 5), "All three?")]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert "has 3 images; at most 2 are allowed per request" in r.json()["error"]["message"]


def test_prompt_length_counts_each_images_positions(live, next_model):
    # Two images within the limit whose 2,182 + 2,376 positions overflow the 4,096-token rows.
    body = {"messages": [user(image_url("wide", 6), image_url("tall", 6), "Both?")], "max_tokens": 4}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    ids = next_model.encode_prompt([("user", "<image>\n<image>\nBoth?")], 2, image_sizes=[(300, 1000), (900, 300)])
    assert r.status_code == 400
    assert f"the prompt has {len(ids)} tokens and max_tokens is 4" in r.json()["error"]["message"]
    assert len(ids) > 2182 + 2376


def test_llava_1_5_serves_two_images_interleaved_with_text():
    model = random_model("tiny")
    tower_batches = []  # images per vision-tower call
    model.net.vision_tower.register_forward_hook(lambda module, args, out: tower_batches.append(len(args[0])))
    config = ServeConfig(model_name="tiny", max_batch=2, max_model_len=2048, max_batched_tokens=97,
                         max_images_per_request=3)
    server = LiveServer(model, config).start()
    try:
        a, b = png_data_url(random_image(41, 70, 50)), png_data_url(random_image(42, 40, 90))
        twice = [user(a, "twice:", a)]
        got = [ask(server, twice).choices[0].message.content]
        assert tower_batches == [1]  # an image repeated within a request runs once
        requests = [[user("First", a, "then", b, "which is brighter?")], [user(b, "and", a, "?")]]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            got += list(pool.map(lambda m: ask(server, m).choices[0].message.content, requests))
        assert tower_batches == [1, 1]  # then only b is new
        assert got == [alone(model, m) for m in [twice] + requests]
    finally:
        server.stop()
