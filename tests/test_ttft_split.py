"""The time to first token of an image request in parts: image preprocessing, vision tower + projector, and
prefill, in `generate()`'s last_stats and in the server's /metrics. Each part must be there and positive where
its work ran, and the parts must lie inside the TTFT they split (their sum at most the TTFT)."""

import re

import httpx
import pytest
from serve_helpers import LiveServer, png_data_url, random_image, user

from llava_fast.presets import random_model


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


def test_generate_reports_the_three_parts(model):
    image = random_image(3, 90, 70)
    text = "".join(model.stream("What is in the picture?", image, max_new_tokens=3, ignore_eos=True))
    st = model.last_stats
    assert text and st["new_tokens"] == 3
    assert st["image_preprocess_s"] > 0 and st["vision_s"] > 0 and st["prefill_s"] > 0
    assert st["vision_s"] + st["prefill_s"] <= st["time_to_first_token_s"]
    with_image = st["vision_s"]
    # A text request: no preprocessing; its "vision" part is only the token-embedding lookup, far below a
    # tower's 4 layers x 257 patches (tiny preset).
    list(model.stream("What is in the picture?", max_new_tokens=2, ignore_eos=True))
    st = model.last_stats
    assert st["image_preprocess_s"] == 0.0 and 0 <= st["vision_s"] < with_image / 3
    assert st["vision_s"] + st["prefill_s"] <= st["time_to_first_token_s"]


def _histograms(text):
    """{name: (count, sum)} of every *_seconds histogram in a Prometheus exposition."""
    out = {}
    for name, kind, value in re.findall(r"^(llava_fast_\w+_seconds)_(count|sum) (\S+)$", text, re.M):
        count, total = out.get(name, (0.0, 0.0))
        out[name] = (float(value), total) if kind == "count" else (count, float(value))
    return out


def test_server_metrics_split_the_first_token(model):
    from llava_fast.serve.app import ServeConfig

    live = LiveServer(model, ServeConfig(model_name="tiny", max_batch=2)).start()
    try:
        client = live.client()
        url = png_data_url(random_image(11, 120, 80))
        client.chat.completions.create(model="tiny", messages=[user("Describe it.", url)], max_tokens=2,
                                       temperature=0)
        h = _histograms(httpx.get(live.url + "/metrics", timeout=30).text)
        parts = ("llava_fast_image_preprocess_seconds", "llava_fast_vision_encode_seconds",
                 "llava_fast_prefill_seconds")
        for name in parts:
            assert h[name][0] == 1 and h[name][1] > 0, name
        ttft = h["llava_fast_time_to_first_token_seconds"]
        assert ttft[0] == 1 and sum(h[name][1] for name in parts) <= ttft[1]

        # The same image again: the feature cache (or a kept prefix) skips preprocessing and the tower, so only
        # the prefill histogram and the TTFT count it; a text request adds a prefill too.
        client.chat.completions.create(model="tiny", messages=[user("Describe it again.", url)], max_tokens=2,
                                       temperature=0)
        client.chat.completions.create(model="tiny", messages=[user("Hello there")], max_tokens=2, temperature=0)
        h2 = _histograms(httpx.get(live.url + "/metrics", timeout=30).text)
        assert h2["llava_fast_image_preprocess_seconds"] == h["llava_fast_image_preprocess_seconds"]
        assert h2["llava_fast_vision_encode_seconds"] == h["llava_fast_vision_encode_seconds"]
        assert h2["llava_fast_prefill_seconds"][0] == 3 and h2["llava_fast_time_to_first_token_seconds"][0] == 3
        assert sum(h2[name][1] for name in parts) <= h2["llava_fast_time_to_first_token_seconds"][1]
    finally:
        live.stop()
