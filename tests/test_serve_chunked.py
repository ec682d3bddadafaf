"""Chunked prefill in `llava-fast serve`: a prompt enters its KV-cache row in slices of the iteration's token
budget, between the decode steps of the rows already running, and every row's greedy reply still equals
`generate()` of that request alone (which prefills the whole prompt in one call, with no scheduler)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from serve_helpers import LiveServer, png_data_url, random_image, user  # noqa: E402

from llava_fast.errors import InputError  # noqa: E402
from llava_fast.presets import random_model  # noqa: E402
from llava_fast.serve.app import ServeConfig  # noqa: E402
from llava_fast.serve.scheduler import Scheduler  # noqa: E402

BUDGET = 37  # odd, so slices end mid-image and mid-word: 4 rows decoding leave 33 tokens per slice
TEXT_TOKENS = 200


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.fixture(scope="module")
def live(model):
    config = ServeConfig(model_name="tiny", max_batch=4, max_model_len=1024, max_batched_tokens=BUDGET)
    server = LiveServer(model, config).start()
    yield server
    server.stop()


def _stream(live, messages, max_tokens, first_chunk=None, ignore_eos=False):
    """(text, time sent, times of the content chunks) of one streamed greedy request; `first_chunk` (an Event) is
    set when its first text arrives."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": ignore_eos}
    text, times, sent = [], [], time.perf_counter()
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if content:
                    text.append(content)
                    times.append(time.perf_counter())
                    if first_chunk is not None:
                        first_chunk.set()
    return "".join(text), sent, times


def test_image_prompt_enters_in_slices_while_others_decode(live, model):
    texts = [[user("Tell me a long story about the sea, " + "and the waves " * i)] for i in range(3)]
    image = png_data_url(random_image(31, 120, 80))
    image_request = [{"role": "system", "content": "Answer."}, user("What is in this image? " * 3, image)]
    prompt_tokens = len(model.encode_prompt([("user", "<image>\n" + "What is in this image? " * 3)], 1,
                                            system="Answer."))
    assert prompt_tokens > 6 * BUDGET  # the image prompt needs many slices
    chunks_before = live.metric("llava_fast_prefill_chunks_total")
    # The text rows run long enough (200 tokens, EOS ignored) to still be decoding through every slice of the
    # image prompt, which is sent once each of them has its first text: on a quiet machine the tiny preset
    # decodes 60 tokens of 3 rows in ~0.3 s, so a fixed wait could see them finished before the image arrived.
    decoding = [threading.Event() for _ in texts]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_stream, live, m, TEXT_TOKENS, e, True) for m, e in zip(texts, decoding)]
        for event in decoding:
            assert event.wait(120)
        image_text, image_sent, image_times = pool.submit(_stream, live, image_request, 12).result()
        rows = [f.result() for f in running]
    assert image_text == model.generate(image_request, max_new_tokens=12)
    for messages, (text, _, _) in zip(texts, rows):
        assert text == model.generate(messages, max_new_tokens=TEXT_TOKENS, ignore_eos=True)
    # The image prompt went in as several slices, and the text rows kept receiving tokens meanwhile.
    slices = live.metric("llava_fast_prefill_chunks_total") - chunks_before
    assert slices >= 3 + prompt_tokens // BUDGET
    during = [sum(image_sent < t < image_times[0] for t in times) for _, _, times in rows]
    assert max(during) >= 3, during
    # /metrics reports exact recent ITL quantiles and the budget.
    text = httpx.get(live.url + "/metrics", timeout=30).text
    itl = "llava_fast_recent_inter_token_latency_seconds"
    p50 = float(next(x for x in text.splitlines() if x.startswith(itl + '{quantile="0.5"}')).split()[-1])
    p99 = float(next(x for x in text.splitlines() if x.startswith(itl + '{quantile="0.99"}')).split()[-1])
    assert 0 < p50 <= p99
    assert f"llava_fast_max_batched_tokens {float(BUDGET)}" in text


def test_many_clients_with_odd_prompts_match_generate(live, model):
    images = [png_data_url(random_image(40 + i, 50 + 13 * i, 40 + 7 * i)) for i in range(3)]
    requests = []
    for i in range(10):
        content = " ".join(["word"] * (1 + 9 * i)) + f" number {i}?"
        messages = [user(content, images[i % 3])] if i % 3 != 2 else [user(content)]
        requests.append((messages, 3 + (7 * i) % 11))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: _stream(live, *r)[0], requests))
    for (messages, max_tokens), text in zip(requests, got):
        assert text == model.generate(messages, max_new_tokens=max_tokens)


def test_an_iteration_is_one_call_of_the_decoding_rows_and_slices_within_the_budget(live, model):
    """Where the decoder mixes (the native CPU step), each iteration is one call: the decoding rows, each once,
    then prompt slices of rows that are not decoding, each continuing where its last slice ended, all within
    the token budget; and the replies still equal generate() alone."""
    decoder = live.scheduler.decoder
    if not decoder.mixes:
        pytest.skip(f"this decoder does not mix steps and slices ({decoder.plan})")
    calls, inner = [], decoder.mixed_step

    def record(slots, tokens, slices):
        rows = live.scheduler.rows  # a slot's row: a request that ends early frees its slot for another
        calls.append((list(slots), [(id(rows[slot]), x.shape[0], start) for slot, x, start in slices]))
        return inner(slots, tokens, slices)

    requests = [([user(" ".join(["wave"] * (5 + 31 * i)) + "?")], 6 + 5 * i) for i in range(4)]
    decoder.mixed_step = record
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda r: _stream(live, *r)[0], requests))
    finally:
        del decoder.mixed_step
    for (messages, max_tokens), text in zip(requests, got):
        assert text == model.generate(messages, max_new_tokens=max_tokens)
    ends = {}  # request's row -> where its last slice ended
    for slots, slices in calls:
        assert len(set(slots)) == len(slots) and len(slots) + sum(n for _, n, _ in slices) <= BUDGET
        assert len({row for row, _, _ in slices}) == len(slices)
        for row, n, start in slices:
            assert start == ends.get(row, start), (row, start, ends)  # the first starts after a reused prefix
            ends[row] = start + n
    # Every request prefilled through the mixed call. How many slices each took depends on the prefix it reused
    # (the prompts share their first words) and so on which request the threads' timing admitted first; a prompt
    # entering in several slices is test_image_prompt_enters_in_slices_while_others_decode's check.
    assert len(ends) == 4
    assert any(slots and slices for slots, slices in calls)  # slices did ride along with decode steps
    assert sum(len(slots) for slots, _ in calls) >= sum(t for _, t in requests) - len(requests)


def test_max_model_len_past_the_context_is_refused(model):
    """It was capped to the context length without a word (the operator believed in a longer context)."""
    for bad in (model.context_length + 1, 0, -5):
        with pytest.raises(InputError, match=f"from 1 to the model's context length of 2048 tokens, got {bad}$"):
            Scheduler(model, max_batch=2, max_model_len=bad)
    assert Scheduler(model, max_batch=2, max_model_len=model.context_length).max_model_len == 2048
    assert Scheduler(model, max_batch=2).max_model_len == 2048


def test_budget_must_exceed_the_rows(model):
    with pytest.raises(InputError, match="max_batched_tokens"):
        Scheduler(model, max_batch=8, max_model_len=64, max_batched_tokens=8)
    scheduler = Scheduler(model, max_batch=8, max_model_len=64)
    assert scheduler.max_batched_tokens == (96 if scheduler.decoder.mixes else 128)  # the CPU defaults
    assert Scheduler(model, max_batch=100, max_model_len=64).max_batched_tokens == 200  # room beside 100 rows


def test_bfloat16_replies_under_the_measured_budget_match_generate():
    """A bfloat16 model on the CPU's native step (the matrix-unit GEMMs and attention where the CPU has them),
    with the budget measured rather than given: prompts go in whole while no row decodes and in slices beside
    decoding rows, and every greedy reply still equals generate() of that request alone."""
    import torch

    model = random_model("tiny", dtype=torch.bfloat16, seed=3)
    config = ServeConfig(model_name="tiny", max_batch=4, max_model_len=1024)
    server = LiveServer(model, config).start()
    try:
        images = [png_data_url(random_image(60 + i, 45 + 11 * i, 70 - 9 * i)) for i in range(2)]
        requests = []
        for i in range(7):
            content = " ".join(["tile"] * (2 + 23 * i)) + f" case {i}?"
            messages = [user(content, images[i % 2])] if i % 3 else [user(content)]
            requests.append((messages, 4 + (5 * i) % 9))
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            got = list(pool.map(lambda r: _stream(server, *r)[0], requests))
    finally:
        server.stop()
    assert any(got)
    for (messages, max_tokens), text in zip(requests, got):
        assert text == model.generate(messages, max_new_tokens=max_tokens)
