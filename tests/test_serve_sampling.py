"""vLLM's sampling extensions `ignore_eos` and `min_tokens`, in generate() and through `llava-fast serve`.

Random weights rarely emit EOS, so the tiny preset's tokenizer is given an EOS id that its greedy reply to the
test prompt does emit (its 4th new token): then a plain reply ends there, ignore_eos runs to max_tokens, and
min_tokens pushes the end past it. The reference is a greedy loop over full-sequence forwards (model.logits),
which shares no code with the decoder, the scheduler or sampling.
"""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from serve_helpers import LiveServer, png_data_url, random_image, user  # noqa: E402

from llava_fast.errors import InputError  # noqa: E402
from llava_fast.presets import random_model  # noqa: E402
from llava_fast.serve.app import ServeConfig  # noqa: E402

PROMPT = "Describe the picture in detail, please."
IMAGE = png_data_url(random_image(5, 70, 50))


def text_of(model, ids):
    """The reply's text: an EOS that ended the row is not part of it (with ignore_eos it is a plain token)."""
    eos = model.tokenizer.eos_token_ids
    return model.tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids)


def reference_ids(model, ids, max_tokens, eos, min_tokens=0, ignore_eos=False):
    """Greedy new ids by full forwards: EOS masked for the first min_tokens, EOS kept (and ending) unless ignored."""
    out = []
    for i in range(max_tokens):
        logits = model.logits([ids + out])[0, -1].clone()
        if i < min_tokens:
            logits[list(eos)] = float("-inf")
        token = int(logits.argmax())
        out.append(token)
        if token in eos and not ignore_eos:
            break
    return out


@pytest.fixture(scope="module")
def model():
    model = random_model("tiny")
    ids = model.encode_prompt(PROMPT)
    reply = reference_ids(model, ids, 8, eos=())
    # The first token of the reply after the 3rd that did not occur before it becomes the EOS id.
    index = next(i for i in range(3, 8) if reply[i] not in reply[:i])
    model.tokenizer.eos_token_ids = (reply[index],)
    model.eos_index = index
    return model


@pytest.fixture(scope="module")
def live(model):
    server = LiveServer(model, ServeConfig(model_name="tiny", max_batch=4, max_model_len=512)).start()
    yield server
    server.stop()


def test_generate_ignore_eos_and_min_tokens(model):
    ids, eos = model.encode_prompt(PROMPT), model.tokenizer.eos_token_ids
    plain = reference_ids(model, ids, 12, eos)
    assert len(plain) == model.eos_index + 1 and plain[-1] in eos  # the reply does end at the chosen EOS
    assert model.generate(PROMPT, max_new_tokens=12) == text_of(model, plain)
    assert model.last_stats["new_tokens"] == model.eos_index + 1
    ignored = reference_ids(model, ids, 12, eos, ignore_eos=True)
    assert len(ignored) == 12 and ignored[model.eos_index] in eos  # EOS drawn, and the row goes on
    assert model.generate(PROMPT, max_new_tokens=12, ignore_eos=True) == model.tokenizer.decode(ignored)
    assert model.last_stats["new_tokens"] == 12
    at_least = reference_ids(model, ids, 12, eos, min_tokens=model.eos_index + 2)
    assert at_least[: model.eos_index + 2] != ignored[: model.eos_index + 2]  # the mask changed the reply
    assert "".join(model.stream(PROMPT, max_new_tokens=12, min_tokens=model.eos_index + 2)) == \
        text_of(model, at_least)
    assert model.last_stats["new_tokens"] == len(at_least) >= model.eos_index + 2
    for kwargs, words in [(dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=2.0), "min_tokens"),
                          (dict(min_tokens=13), "min_tokens"), (dict(ignore_eos="yes"), "ignore_eos")]:
        with pytest.raises(InputError, match=words):
            model.generate(PROMPT, max_new_tokens=12, **kwargs)


def _post(live, **body):
    body = {"messages": [user(PROMPT)], "temperature": 0, **body}
    return httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)


def test_serve_ignore_eos_gives_exactly_max_tokens(live, model):
    plain = _post(live, max_tokens=12).json()
    assert plain["usage"]["completion_tokens"] == model.eos_index + 1
    assert plain["choices"][0]["finish_reason"] == "stop"
    for stream in (False, True):
        body = dict(max_tokens=12, ignore_eos=True, stream=stream, stream_options={"include_usage": True}) \
            if stream else dict(max_tokens=12, ignore_eos=True)
        r = _post(live, **body)
        assert r.status_code == 200
        if stream:
            chunks = [line for line in r.text.splitlines() if line.startswith("data: {")]
            assert '"completion_tokens": 12' in chunks[-1] and '"finish_reason": "length"' in chunks[-2]
        else:
            assert r.json()["usage"]["completion_tokens"] == 12
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["choices"][0]["message"]["content"] == model.generate(PROMPT, max_new_tokens=12,
                                                                                   ignore_eos=True)
    # With an image and several rows decoding together, each row still counts its own tokens.
    messages = [user("What is this?", IMAGE)]
    r = httpx.post(live.url + "/v1/chat/completions", timeout=120, json={
        "messages": messages, "temperature": 0, "max_tokens": 9, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 9
    assert r.json()["choices"][0]["message"]["content"] == model.generate(messages, max_new_tokens=9, ignore_eos=True)


def test_serve_min_tokens_suppresses_eos_before_it(live, model):
    ids, eos = model.encode_prompt(PROMPT), model.tokenizer.eos_token_ids
    for min_tokens in (model.eos_index + 1, model.eos_index + 3):
        expected = reference_ids(model, ids, 16, eos, min_tokens=min_tokens)
        r = _post(live, max_tokens=16, min_tokens=min_tokens).json()
        assert r["usage"]["completion_tokens"] == len(expected) >= min_tokens
        assert r["choices"][0]["message"]["content"] == text_of(model, expected)
    # min_tokens at most the EOS's index changes nothing.
    assert _post(live, max_tokens=16, min_tokens=model.eos_index).json()["usage"]["completion_tokens"] == \
        model.eos_index + 1


@pytest.mark.parametrize("field, value, words", [
    ("ignore_eos", "yes", "ignore_eos"), ("ignore_eos", 1, "ignore_eos"), ("min_tokens", -1, "min_tokens"),
    ("min_tokens", 2.5, "min_tokens"), ("min_tokens", "3", "min_tokens"), ("min_tokens", 40, "min_tokens")])
def test_bad_values_are_400_naming_the_field(live, field, value, words):
    r = _post(live, max_tokens=16, **{field: value})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def _first_max(row):
    """The reference argmax of one row (floats): a NaN wins at its first place, else the first of equal maxima."""
    best = 0
    for i, v in enumerate(row):
        if v != v:  # NaN
            return i
        if v > row[best]:
            best = i
    return best


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_is_the_first_maximum_of_each_row(dtype):
    """The scheduler's greedy pick (numpy's argmax on CPU float32, torch's otherwise) against a plain scan: ties
    planted (the first wins, as in generate()'s torch.argmax), a NaN planted (it wins, as torch counts it), a
    row of -inf, an odd vocabulary size, and a non-contiguous view (the decoding rows' logits out of a call's)."""
    import torch

    from llava_fast.generate import greedy_tokens

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 4999, generator=g).to(getattr(torch, dtype))
    logits[1, 17] = logits[1, 4000] = 50.0  # a tie: 17 wins
    logits[2, 4998] = 60.0  # the last column
    logits[3, 12] = float("nan")
    logits[3, 40] = 70.0  # a NaN before the largest number: the NaN wins
    logits[4] = float("-inf")  # all equal: the first
    logits[5, 0] = 80.0
    rows = logits.tolist()
    want = [_first_max(r) for r in rows]
    assert want[1:6] == [17, 4998, 12, 0, 0]
    assert greedy_tokens(logits) == want
    assert greedy_tokens(logits) == logits.argmax(dim=-1).tolist()  # generate()'s pick
    assert greedy_tokens(logits[::2]) == want[::2]  # a strided view
    assert greedy_tokens(logits[:, 1:]) == [_first_max(r[1:]) for r in rows]
