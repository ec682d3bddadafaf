"""The CPU scheduler's measured token budget (serve/budget.py): the least-squares fit of the mixed calls' costs,
the budget it sets, the vision tower charged at its measured cost (so a new image's tower and its first prompt
slice share an iteration), and replies that still equal `generate()` alone."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from serve_helpers import LiveServer, png_data_url, random_image, user  # noqa: E402

from llava_fast.generate import Sampling  # noqa: E402
from llava_fast.presets import random_model  # noqa: E402
from llava_fast.serve import budget  # noqa: E402
from llava_fast.serve import scheduler as scheduler_module  # noqa: E402
from llava_fast.serve.app import ServeConfig  # noqa: E402
from llava_fast.serve.scheduler import MAX_MEASURED_BUDGET, Request, Scheduler  # noqa: E402


def _calls(cost, a, b, c, n=200, seed=0, noise=0.01):
    """n synthetic calls: rows 1..max_batch, a third decode-only, the rest with 1..300 prompt tokens, each
    call's seconds a + b rows + c tokens times (1 +- noise)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        rows = int(rng.integers(1, cost.max_batch + 1))
        tokens = 0 if rng.random() < 1 / 3 else int(rng.integers(1, 301))
        cost.add(rows, tokens, (a + b * rows + c * tokens) * (1 + noise * rng.uniform(-1, 1)))


def test_the_fit_recovers_the_costs_and_sets_slice_and_tower_tokens():
    cost = budget.IterationCost(max_batch=13)
    a, b, c = 0.0173, 0.00091, 0.000137
    _calls(cost, a, b, c)
    fa, fb, fc = cost.fit()
    assert fa == pytest.approx(a, rel=0.05) and fb == pytest.approx(b, rel=0.1) and fc == pytest.approx(c, rel=0.03)
    assert cost.slice_tokens() == int(budget.SLICE_STEPS * (fa + fb * 13) / fc)
    assert cost.slice_tokens() == pytest.approx(budget.SLICE_STEPS * (a + 13 * b) / c, rel=0.05)
    assert cost.tower_tokens(257) is None  # no tower run seen yet
    cost.add_tower(257, 0.0219)
    cost.add_tower(514, 0.0401)
    assert cost.tower_tokens(257) == math.ceil(257 * (0.0219 + 0.0401) / 771 / fc)


def test_the_fit_waits_for_calls_that_tell_the_costs_apart():
    cost = budget.IterationCost(max_batch=8)
    _calls(cost, 0.01, 0.001, 0.0001, n=budget.MIN_CALLS - 1)
    assert cost.fit() is None and cost.slice_tokens() is None  # too few calls
    only_decode = budget.IterationCost(max_batch=8)
    for i in range(100):
        only_decode.add(1 + i % 8, 0, 0.01 + 0.001 * (1 + i % 8))
    assert only_decode.fit() is None  # a prompt token's cost is unknown
    one_row_count = budget.IterationCost(max_batch=8)
    for i in range(100):
        one_row_count.add(5, 7 * (i % 9), 0.01 + 0.0001 * 7 * (i % 9))
    assert one_row_count.fit() is None  # the pass and a row's cost cannot be told apart
    cost = budget.IterationCost(max_batch=8)
    _calls(cost, 0.01, 0.001, 0.0001)
    kept = cost.fit()
    for i in range(budget.WINDOW):  # prompt tokens that make calls cheaper: not a cost, the last fit stays
        cost.add(1 + i % 8, 10 * (i % 5), 0.05 - 0.001 * (i % 5))
    assert cost.fit() is None and cost.coef == kept


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


def _scheduler(model, **kwargs):
    scheduler = Scheduler(model, max_batch=4, max_model_len=1024, **kwargs)
    if scheduler.cost is None:
        pytest.skip(f"this decoder does not mix steps and slices ({scheduler.decoder.plan})")
    return scheduler


def test_the_measured_budget_is_bounded_by_the_floor_and_the_cap(model):
    assert Scheduler(model, max_batch=4, max_model_len=64, max_batched_tokens=40).cost is None  # given: kept
    scheduler = _scheduler(model)
    assert scheduler.max_batched_tokens == 96  # the start value, until a fit
    assert scheduler.min_budget == 4 + scheduler_module.MIN_SLICE_TOKENS
    _calls(scheduler.cost, 0.0173, 0.00091, 0.000137)
    scheduler._retune()
    expected = 4 + scheduler.cost.slice_tokens()
    assert 96 < expected < MAX_MEASURED_BUDGET and scheduler.max_batched_tokens == expected
    assert scheduler.metrics.max_batched_tokens._value.get() == expected
    cheap_steps = _scheduler(model)  # a prompt token worth a whole step: the floor
    _calls(cheap_steps.cost, 0.001, 0.0001, 0.001)
    cheap_steps._retune()
    assert cheap_steps.max_batched_tokens == 4 + scheduler_module.MIN_SLICE_TOKENS
    cheap_tokens = _scheduler(model)
    _calls(cheap_tokens.cost, 0.5, 0.01, 1e-6)
    cheap_tokens._retune()
    assert cheap_tokens.max_batched_tokens == MAX_MEASURED_BUDGET


def test_a_new_images_tower_and_its_first_slice_share_an_iteration(model):
    """With the tower charged at its measured cost (here well under the budget), the iteration that runs a new
    image's tower also prefills the start of its prompt beside a decoding row; charged one token per image
    position (256 > the budget), the tower took an iteration of its own. Replies still equal generate() alone."""
    scheduler = _scheduler(model)
    _calls(scheduler.cost, 0.8, 0.1, 0.016)  # a prompt token costs 1/75 of a 4-row step: budget 4 + ~75
    scheduler._retune()
    assert scheduler.min_budget < scheduler.max_batched_tokens == 4 + scheduler.cost.slice_tokens() < 256
    image = random_image(5, 71, 53)
    messages = [user("What is in this picture, in a few words?", png_data_url(image))]
    ids = model.encode_prompt([("user", "<image>\nWhat is in this picture, in a few words?")], 1)
    events = []
    req = Request(ids=ids, images=[image], image_keys=["k5"], image_tokens=model.image_token_counts([(53, 71)]),
                  max_tokens=7, sampling=Sampling(), stop=[], emit=events.append)
    text_req, text_messages, text_events = _request(model, "Name three colours.", max_tokens=30)
    with torch.inference_mode():
        assert scheduler._admit(text_req)
        scheduler._mixed(scheduler._plan_slices())  # its whole prompt: it decodes from now on
        assert scheduler._prompt_budget(1) < 256  # one token per image position would not fit beside it
        assert scheduler._admit(req)
        slices = scheduler._plan_slices()
        assert len(scheduler.cost.tower) == 1  # the tower ran in this iteration ...
        assert [(row.req, n > 0) for row, n in slices] == [(req, True)]  # ... and so did the prompt's first slice
        scheduler._mixed(slices)
        _run_to_the_end(scheduler, [events, text_events])
    assert events[-1].kind == "done"
    assert "".join(e.text for e in events) == model.generate(messages, max_new_tokens=7)
    assert "".join(e.text for e in text_events) == model.generate(text_messages, max_new_tokens=30)


def test_replies_under_the_measured_budget_match_generate(model):
    """A server with no budget given: after enough calls the fit sets the budget (reported on /metrics), and
    every reply, text or image, equals generate() of that request alone."""
    live = LiveServer(model, ServeConfig(model_name="tiny", max_batch=4, max_model_len=1024)).start()
    try:
        if live.scheduler.cost is None:
            pytest.skip("this decoder does not mix steps and slices")
        images = [png_data_url(random_image(60 + i, 40 + 9 * i, 30 + 11 * i)) for i in range(3)]
        requests = []
        for i in range(12):
            text = " ".join(["sea"] * (2 + 13 * i)) + f" {i}?"
            requests.append(([user(text, images[i % 3])] if i % 2 else [user(text)], 4 + (5 * i) % 13))
        client = live.client()

        def ask(request):
            messages, max_tokens = request
            reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                   max_tokens=max_tokens)
            return reply.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, requests))
        for (messages, max_tokens), text in zip(requests, got):
            assert text == model.generate(messages, max_new_tokens=max_tokens)
        cost = live.scheduler.cost
        assert cost.added >= budget.MIN_CALLS
        if cost.coef is not None:  # the calls told the costs apart: the budget follows the fit
            assert live.scheduler.max_batched_tokens >= live.scheduler.min_budget
            assert live.metric("llava_fast_max_batched_tokens") == live.scheduler.max_batched_tokens
    finally:
        live.stop()


def _request(model, text, image=None, key=None, max_tokens=5):
    """(Request, its messages, its events) for a greedy chat turn, with one image or none."""
    events = []
    if image is None:
        ids, images, keys, counts = model.encode_prompt([("user", text)], 0), [], [], []
        messages = [user(text)]
    else:
        ids = model.encode_prompt([("user", "<image>\n" + text)], 1)
        images, keys, counts = [image], [key], model.image_token_counts([(image.height, image.width)])
        messages = [user(text, png_data_url(image))]
    req = Request(ids=ids, images=images, image_keys=keys, image_tokens=counts, max_tokens=max_tokens,
                  sampling=Sampling(), stop=[], emit=events.append)
    return req, messages, events


def _run_to_the_end(scheduler, events, calls=200):
    for _ in range(calls):
        if all(e and e[-1].kind != "token" for e in events):
            return
        scheduler._iterate()
    raise AssertionError("the requests did not finish")


def test_while_no_row_decodes_whole_prompts_go_in_one_call_up_to_the_cap(model, monkeypatch):
    """No row decodes: the measured budget's first iteration takes whole prompts, in admission order, up to
    IDLE_PREFILL_TOKENS (here lowered so the third prompt is cut), not the 96-token start value; once rows
    decode, the third prompt's next slice is back within the budget. Replies equal generate() alone."""
    scheduler = _scheduler(model)
    assert scheduler.cost.coef is None and scheduler.max_batched_tokens == 96  # no fit yet: the start value
    image = random_image(9, 83, 61)
    asked = [_request(model, "Say what you see here, " + "and why " * 23, image, "k9"),
             _request(model, "Tell me a story about the sea " + "and the waves " * 31),
             _request(model, "Count the stars: " + "one star, " * 57, max_tokens=6)]
    lengths = [len(req.ids) for req, _, _ in asked]
    assert min(lengths) > 96
    towered = asked[0][0].image_tokens[0]  # before a fit the tower is charged one token per position
    cap = towered + lengths[0] + lengths[1] + 41
    monkeypatch.setattr(scheduler_module, "IDLE_PREFILL_TOKENS", cap)
    with torch.inference_mode():
        for req, _, _ in asked:
            assert scheduler._admit(req)
        slices = scheduler._plan_slices()
        assert [(row.req, n) for row, n in slices] == [(asked[0][0], lengths[0]), (asked[1][0], lengths[1]),
                                                         (asked[2][0], 41)]
        scheduler._mixed(slices)
        assert [bool(e) for _, _, e in asked] == [True, True, False]  # the two whole prompts have their first token
        slices = scheduler._plan_slices()  # two rows decode now: the budget again
        assert [(row.req, n) for row, n in slices] == [(asked[2][0], 96 - 2)]
        scheduler._mixed(slices)
        _run_to_the_end(scheduler, [e for _, _, e in asked])
    for req, messages, events in asked:
        assert events[-1].kind == "done"
        assert "".join(e.text for e in events) == model.generate(messages, max_new_tokens=req.max_tokens)


def test_rows_not_decoding_leave_their_time_to_the_prompt(model):
    """Measured budget: beside k < max_batch decoding rows, a slice may take the prompt tokens that cost what
    the max_batch - k missing rows would have, plus the SPREAD_STEPS allowance spread over the k + 1 rows that
    wait on it: its time times max_batch, over the k + 1 rows; beside max_batch - 1 rows the iteration is a full
    batch's with its one-step slice (the ITL's worst case), at a full batch the budget is unchanged, and where a
    row costs less than a prompt token only the spread allowance is added. A budget given stays a hard cap, idle
    or not."""
    scheduler = _scheduler(model)
    _calls(scheduler.cost, 0.012, 0.001, 0.0001)  # a row is worth 10 prompt tokens
    scheduler._retune()
    budget_tokens = scheduler.max_batched_tokens
    assert budget_tokens > 96
    a, b, c = scheduler.cost.coef
    full_step = a + 4 * b
    spread_slice = budget.SPREAD_STEPS * full_step  # the allowance whose delay the rows waiting share, seconds
    for k in (1, 2, 3):
        left = scheduler._prompt_budget(k)
        room = budget_tokens - k + int((4 - k) * (b / c - 1))  # a missing row leaves ~10 - 1 tokens
        assert 8 * (4 - k) < room - budget_tokens + k <= 9 * (4 - k)
        shared = left - room  # the spread allowance's share beyond a full batch's, in tokens
        assert (k + 1) * c * shared <= 4 * spread_slice - (k + 1) * spread_slice + 1e-12
        assert 4 * spread_slice - (k + 1) * spread_slice <= (k + 1) * c * (shared + 2)  # whole tokens
    assert full_step * 2 - c * 2 <= a + b * 3 + c * scheduler._prompt_budget(3) <= full_step * 2 + b
    assert scheduler._prompt_budget(4) == budget_tokens - 4
    assert scheduler._prompt_budget(0) == scheduler_module.IDLE_PREFILL_TOKENS
    cheap_rows = _scheduler(model)
    _calls(cheap_rows.cost, 0.012, 0.0001, 0.0002)
    cheap_rows._retune()
    spread = cheap_rows.cost.slice_tokens(budget.SPREAD_STEPS)
    assert [cheap_rows._prompt_budget(k) for k in (1, 3)] == [
        cheap_rows.max_batched_tokens - 1 + spread, cheap_rows.max_batched_tokens - 3]
    given = Scheduler(model, max_batch=4, max_model_len=64, max_batched_tokens=40)
    assert [given._prompt_budget(k) for k in (0, 1, 4)] == [40, 39, 36]


def test_start_measures_the_budget_before_the_first_request(model, monkeypatch):
    """start() times a few mixed calls on scratch rows, so the first requests get a measured budget (and a
    tower charge from the tower's FLOPs, with no scratch tower run), not the 96-token start value; the scratch
    rows' K/V is given back and their lengths reset, and a reply after it equals generate() alone."""
    scheduler = _scheduler(model)
    assert scheduler.cost.coef is None and scheduler.max_batched_tokens == 96
    towers = []
    image_features = model.net.image_features
    monkeypatch.setattr(model.net, "image_features", lambda *args: towers.append(1) or image_features(*args))
    scheduler.start()
    try:
        assert scheduler.cost.coef is not None and towers == []
        assert len(scheduler.cost.calls) == 3  # each call's median over a tiny model's rounds
        assert sorted({(rows, tokens > 0) for rows, tokens, _ in scheduler.cost.calls}) == [
            (1, False), (3, False), (3, True)]
        expected = min(max(4 + scheduler.cost.slice_tokens(), scheduler.min_budget), MAX_MEASURED_BUDGET)
        assert scheduler.max_batched_tokens == expected
        assert scheduler.cost.tower_tokens(model.num_image_tokens) is not None
        assert scheduler.kv.held == [0] * 4 and scheduler.decoder.lengths.tolist() == [0] * 4
        assert scheduler.slot_keys == [[]] * 4
        req, messages, events = _request(model, "Which colour is the sky at dusk?", random_image(3, 45, 37),
                                         "k3", max_tokens=9)
        scheduler.submit(req)
        for _ in range(600):
            if events and events[-1].kind != "token":
                break
            threading.Event().wait(0.05)
    finally:
        scheduler.stop(timeout=10)
    assert events[-1].kind == "done"
    assert "".join(e.text for e in events) == model.generate(messages, max_new_tokens=9)


def test_prompts_arriving_together_finish_one_call_apart(model):
    """No row decodes and the costs are measured: a prompt joins the call beside the ones already in it only
    when (prompts in it) x its work costs less than a call's fixed cost a; otherwise the prompts go in one
    call each, in admission order, so the first gets its first token after its own work, not after all of
    theirs. With a large a they join as before. Replies equal generate() alone."""
    for a, joined in ((0.002, False), (0.5, True)):
        scheduler = _scheduler(model)
        _calls(scheduler.cost, a, 0.0002, 0.0001)
        scheduler._retune()
        asked = [_request(model, "Describe the harbour " + "and its boats " * (5 + 3 * i), max_tokens=4 + i)
                 for i in range(3)]
        with torch.inference_mode():
            for req, _, _ in asked:
                assert scheduler._admit(req)
            slices = scheduler._plan_slices()
            whole = [(req, len(req.ids)) for req, _, _ in asked]
            assert [(row.req, n) for row, n in slices] == (whole if joined else whole[:1])
            scheduler._mixed(slices)
            assert [bool(e) for _, _, e in asked] == ([True] * 3 if joined else [True, False, False])
            _run_to_the_end(scheduler, [e for _, _, e in asked])
        for req, messages, events in asked:
            assert events[-1].kind == "done"
            assert "".join(e.text for e in events) == model.generate(messages, max_new_tokens=req.max_tokens)


def _weights(module, prefixes):
    """The multiply-adds per row of the 2-D weights under `prefixes` (module parameter names)."""
    return sum(p.numel() for name, p in module.named_parameters()
               if p.dim() == 2 and any(name.startswith(prefix) for prefix in prefixes))


@pytest.mark.parametrize("a, b, c, slow, rounds", [
    (0.61, 0.011, 0.0096, None, 1),  # LLaVA-1.5-7B-like: a call re-reads 13 GB; one round is the measurement
    (0.61, 0.011, 0.0096, 2, 3),  # the same, its 1-row call 30x slower: an unphysical fit, until a median drops it
    (0.0039, 0.00096, 0.00013, None, None),  # tiny LLaVA-1.5-like: a warm-up round, then rounds for 0.5 s
    (0.0039, 0.00096, 0.00013, 5, None),  # the same, the host's other work landing on one call
])
def test_the_start_up_measurement_is_one_round_where_calls_are_costly(model, monkeypatch, a, b, c, slow, rounds):
    """The start-up measurement on a known cost model (each mixed call takes a + b rows + c tokens on a clock
    that only the calls advance): where a round of calls takes CALIBRATION_SECONDS or more it is one round of
    three calls (at the 7B-like costs under 3 s of calls in all, where two rounds of four, a warm-up call and
    the tower took 11-12 s), else a warm-up round and timed rounds for CALIBRATION_SECONDS, each call's median
    fitted, so a call slowed 3x by other work does not move the fit (nor, in up to three rounds, one that made
    the one round's fit unphysical); the fit is the cost model and the budget one full-batch step's tokens. No
    scratch tower run: the tower's charge is its FLOPs' worth of prompt tokens (the tower's encoder layers run
    and the projector against the decoder's layers, counted from the weights) until a run is measured."""
    scheduler = Scheduler(model, max_batch=13, max_model_len=1024)
    if scheduler.cost is None:
        pytest.skip(f"this decoder does not mix steps and slices ({scheduler.decoder.plan})")
    now = [0.0]
    made = []

    def mixed_step(slots, tokens, slices):
        made.append((len(slots), sum(x.shape[0] for _, x, _ in slices)))
        now[0] += (a + b * made[-1][0] + c * made[-1][1]) * ((3 if a < 0.5 else 30) if len(made) == slow else 1)

    monkeypatch.setattr(scheduler.decoder, "mixed_step", mixed_step)
    monkeypatch.setattr(scheduler_module.time, "perf_counter", lambda: now[0])
    towers = []
    monkeypatch.setattr(model.net, "image_features", lambda *args: towers.append(args))
    scheduler._calibrate()
    tokens = scheduler_module.CALIBRATION_TOKENS
    shapes = [(12, 0), (1, 0), (12, tokens)]  # rows, slice tokens: they determine a, b, c
    round_seconds = sum(a + b * rows + c * n for rows, n in shapes)
    rounds = rounds or 1 + math.ceil(0.5 / round_seconds)
    assert scheduler_module.CALIBRATION_SECONDS == 0.5 and made == shapes * rounds and towers == []
    assert [(rows, n) for rows, n, _ in scheduler.cost.calls] == shapes
    if slow is None and round_seconds >= 0.5:
        assert now[0] < 3.0
    assert scheduler.cost.coef == pytest.approx((a, b, c), rel=1e-6)
    fa, fb, fc = scheduler.cost.coef
    assert scheduler.max_batched_tokens == 13 + int((fa + 13 * fb) / fc)  # one full-batch step's tokens
    assert a + 12 * b + c * scheduler._prompt_budget(12) <= 2 * (a + 13 * b) + b  # a slice beside 12 rows
    run = model.config.num_vision_layers_run
    tower = _weights(model.net, [f"vision_tower.encoder.layers.{i}." for i in range(run)] + ["multi_modal_projector."])
    token = _weights(model.net, ["language_model.layers."])
    assert scheduler.cost.tower_tokens(257) == math.ceil(257 * tower / token)
    scheduler.cost.add_tower(257, 0.0213)  # a measured run replaces the prior
    assert scheduler.cost.tower_tokens(257) == math.ceil(0.0213 / c)


def test_the_start_up_measurement_tells_the_costs_apart_at_two_rows(model, monkeypatch, caplog):
    """At --max-batch 2 the full batch's one decoding row is also the 1-row call's: three calls of one row
    cannot tell a row's cost from the call's fixed cost, so the start-up fit failed, three rounds were spent on
    it and the budget stayed at the start value. The slice alone (no decoding row) tells them apart."""
    scheduler = Scheduler(model, max_batch=2, max_model_len=1024)
    if scheduler.cost is None:
        pytest.skip(f"this decoder does not mix steps and slices ({scheduler.decoder.plan})")
    a, b, c = 0.0117, 0.00143, 0.000327
    now = [0.0]
    made = []

    def mixed_step(slots, tokens, slices):
        made.append((len(slots), sum(x.shape[0] for _, x, _ in slices)))
        now[0] += a + b * made[-1][0] + c * made[-1][1]

    monkeypatch.setattr(scheduler.decoder, "mixed_step", mixed_step)
    monkeypatch.setattr(scheduler_module.time, "perf_counter", lambda: now[0])
    with caplog.at_level(logging.INFO, logger=scheduler_module.log.name):
        scheduler._calibrate()
    assert len({rows for rows, _ in made}) == 2 and {n for _, n in made} == {0, scheduler_module.CALIBRATION_TOKENS}
    assert scheduler.cost.coef == pytest.approx((a, b, c), rel=1e-6)
    assert scheduler.max_batched_tokens == max(2 + int((a + 2 * b) / c), scheduler.min_budget)
    # The operator sees what was measured: the budget and the three costs, as fitted.
    assert (f"token budget: {scheduler.max_batched_tokens} per call, measured in {now[0]:.1f} s (a call "
            f"{a * 1e3:.2f} ms + {b * 1e3:.3f} ms a decoding row + {c * 1e3:.3f} ms a prompt token") in caplog.text


def test_a_slice_beside_a_nearly_full_batch_costs_at_most_its_step(model):
    """The measured budget at SmolLM2-135M bfloat16's costs as a traced 16-client run on the 2-core VM had them
    (a 1-row call 13.5 ms, a 16-row one 22.8 ms, an ~86-token slice beside it +21.7 ms): beside 15 of 16
    decoding rows a slice's arithmetic is at most one full-batch step, so the iteration costs at most ~2x a
    plain step (a 4/3-step slice made it 2.3x: the ITL p99 at 16 clients), and beside 14 rows the spread adds
    ~7% of a step; beside 7 rows (8 clients) the slice keeps the room the 9 missing rows and the 4/3-step
    allowance spread over the 8 rows waiting give it, more than a full batch's 4/3-step slice."""
    scheduler = Scheduler(model, max_batch=16, max_model_len=1024)
    if scheduler.cost is None:
        pytest.skip(f"this decoder does not mix steps and slices ({scheduler.decoder.plan})")
    _calls(scheduler.cost, 0.0129, 0.00062, 0.00025)
    scheduler._retune()
    a, b, c = scheduler.cost.coef
    step = a + 16 * b  # a full batch's plain step
    for k, most in ((15, 2.0), (14, 2.1)):
        iteration = a + b * k + c * scheduler._prompt_budget(k)
        assert 1.9 * step < iteration <= most * step + b
    old_slice = int(4 / 3 * step / c)  # a full batch's 4/3-step slice, in tokens
    assert scheduler._prompt_budget(7) > old_slice + int(9 * (b / c - 1))


@pytest.mark.parametrize("a, b, c, binds", [
    (0.61, 0.011, 0.0096, True),  # LLaVA-1.5-7B-like, 2 cores: a call re-reads 13 GB, a prompt token ~9.6 ms
    (0.0039, 0.00096, 0.00013, False),  # tiny LLaVA-1.5-like
    (0.0129, 0.00062, 0.00025, False),  # SmolLM2-135M-like
])
def test_a_slice_beside_fewer_rows_adds_at_most_a_second(model, monkeypatch, a, b, c, binds):
    """Beside k of 16 decoding rows the slice's room grows with the missing rows and the spread allowance; on a
    clock that only the calls advance (a + b rows + c tokens each), the iteration's prompt arithmetic beside
    any k is at most MAX_SLICE_SECONDS (1 s) or the full batch's own slice, whichever is more. At 7B-like costs
    the uncapped room beside 1-3 rows is 4-8 s of slice (one row's tokens stalled 5-10 s, the ITL p99 of a
    4-client run), so there the cap binds; at the tiny and SmolLM2 costs it does not change any budget."""
    scheduler = Scheduler(model, max_batch=16, max_model_len=1024)
    if scheduler.cost is None:
        pytest.skip(f"this decoder does not mix steps and slices ({scheduler.decoder.plan})")
    now = [0.0]

    def mixed_step(slots, tokens, slices):
        now[0] += a + b * len(slots) + c * sum(x.shape[0] for _, x, _ in slices)

    monkeypatch.setattr(scheduler.decoder, "mixed_step", mixed_step)
    monkeypatch.setattr(scheduler_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(model.net, "image_features", lambda *args: None)
    scheduler._calibrate()
    assert scheduler.cost.coef == pytest.approx((a, b, c), rel=1e-6)
    full = scheduler.max_batched_tokens - 15  # the slice beside 15 rows: a full batch's one-step slice
    capped = [scheduler._prompt_budget(k) for k in range(1, 16)]
    monkeypatch.setattr(scheduler_module, "MAX_SLICE_SECONDS", 1e9, raising=False)  # no cap
    uncapped = [scheduler._prompt_budget(k) for k in range(1, 16)]
    for k, tokens in enumerate(capped, start=1):
        assert c * tokens <= max(1.0, c * (full + 15 - k)) + c  # whole tokens
        assert tokens >= scheduler.max_batched_tokens - k  # never below the full batch's budget
    if binds:
        assert c * uncapped[0] > 8.0 and c * uncapped[2] > 4.0  # k = 1, 3: the stalls the cap removes
        assert [c * t for t in capped[:3]] == pytest.approx([1.0] * 3, abs=c)
        assert capped[14] == uncapped[14] == full  # beside 15 rows nothing changes
    else:
        assert capped == uncapped
