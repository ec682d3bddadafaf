"""`llava-fast serve` on the tiny preset, live on 127.0.0.1, driven by the official openai client.

Every answer is checked against `model.generate()` of the same request alone (greedy), which shares no code
with the scheduler's slot prefill, decode loop and caches; logprobs against a full-sequence forward.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import PIL.Image
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")

from serve_helpers import LiveServer, free_port, png_data_url, random_image, user  # noqa: E402

from llava_fast.errors import InputError  # noqa: E402
from llava_fast.presets import BUNDLED_IMAGE, random_model  # noqa: E402
from llava_fast.prompts.messages import split_openai_messages  # noqa: E402
from llava_fast.serve.app import ServeConfig  # noqa: E402

with open(BUNDLED_IMAGE, "rb") as _f:
    JPEG_URL = "data:image/jpeg;base64," + base64.b64encode(_f.read()).decode()
IMAGES = [JPEG_URL, png_data_url(random_image(1)), png_data_url(random_image(2, 40, 90))]


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.fixture(scope="module")
def live(model, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    shutil.copy(BUNDLED_IMAGE, media / "ironing.jpg")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(BUNDLED_IMAGE, outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", media / "link.jpg")
    config = ServeConfig(model_name="tiny", max_batch=8, max_model_len=1024, max_waiting=64, image_cache_mb=16,
                         max_image_pixels=1 << 20, max_images_per_request=2, allowed_local_media_path=str(media),
                         max_body_bytes=2 << 20)
    server = LiveServer(model, config).start()
    server.media, server.outside = media, outside
    yield server
    server.stop()


def alone(model, messages, max_tokens, **kw):
    return model.generate(messages, max_new_tokens=max_tokens, **kw)


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "llava_fast.cli", "--help"], capture_output=True, text=True).stdout
    for name in ("generate", "chat", "serve", "train", "merge-lora", "bench"):
        assert name in out.split("positional arguments")[1], name


def test_generate_takes_openai_messages(model):
    messages = [{"role": "system", "content": "Be brief."}, user("What is shown?", JPEG_URL)]
    turns, urls, system = split_openai_messages(messages)
    assert turns == [("user", "<image>\nWhat is shown?")] and urls == [JPEG_URL] and system == "Be brief."
    as_messages = model.generate(messages, max_new_tokens=6)
    as_prompt = model.generate("What is shown?", images=BUNDLED_IMAGE, max_new_tokens=6, system="Be brief.")
    assert as_messages == as_prompt and len(as_messages) > 0
    # An image may sit in a later user turn: its marker stays where its part was.
    later = [user("Hello."), {"role": "assistant", "content": "Hi."}, user("And this?", JPEG_URL)]
    as_pairs = model.generate([("user", "Hello."), ("assistant", "Hi."), ("user", "<image>\nAnd this?")],
                              images=BUNDLED_IMAGE, max_new_tokens=4)
    assert model.generate(later, max_new_tokens=4) == as_pairs
    with pytest.raises(InputError, match="end with a user message"):
        model.generate([{"role": "assistant", "content": "hi"}])
    with pytest.raises(InputError, match=r"messages\[0\].role"):
        model.generate([{"role": "robot", "content": "hi"}])


def test_answers_equal_generate(live, model):
    client = live.client()
    messages = [{"role": "system", "content": "You answer."}, user("Describe it.", JPEG_URL),
                {"role": "assistant", "content": "A man ironing."}, user("Where is he?")]
    expected = alone(model, messages, 12)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(model.encode_prompt([("user", "<image>\nDescribe it."),
                                                             ("assistant", "A man ironing."), ("user", "Where is he?")],
                                                            1, system="You answer."))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1
    # Seeded sampling draws what generate() draws; a stop string cuts the reply there, as generate() does.
    sampled = dict(temperature=0.9, top_p=0.9, top_k=50, seed=7)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **{
        k: v for k, v in sampled.items() if k != "top_k"}, extra_body={"top_k": 50})
    assert r.choices[0].message.content == alone(model, messages, 8, **sampled)
    # No temperature: OpenAI's default 1.0 (a sampled reply), not generate()'s greedy 0.
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=11)
    assert r.choices[0].message.content == alone(model, messages, 8, temperature=1.0, seed=11)
    assert r.choices[0].message.content != alone(model, messages, 8)
    stop = expected[len(expected) // 2:][:3]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == alone(model, messages, 12, stop=[stop]) == expected[:expected.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_match_full_forward(live, model):
    messages = [user("Name a colour.")]
    r = live.client().chat.completions.create(messages=messages, model="tiny", max_tokens=3, temperature=0,
                                              logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 5 for e in content)
    ids = model.encode_prompt("Name a colour.")
    reference = torch.log_softmax(model.logits([ids])[0, -1], -1)
    top = reference.topk(5)
    assert content[0].logprob == pytest.approx(float(top.values[0]), abs=1e-3)  # greedy: the top token
    assert [e.logprob for e in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert content[0].top_logprobs[0].token == content[0].token
    assert all(set(t.to_dict()) == {"token", "logprob", "bytes"} for e in content for t in e.top_logprobs)
    r = live.client().chat.completions.create(messages=messages, model="tiny", max_tokens=2, temperature=0,
                                              logprobs=True)
    assert ([set(e.to_dict()) for e in r.choices[0].logprobs.content]
            == [{"token", "logprob", "bytes", "top_logprobs"}] * 2)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)


def test_sixteen_concurrent_clients_get_their_alone_results(live, model):
    requests = []
    for i in range(16):
        images = [IMAGES[i % 3]] if i % 4 != 3 else []
        text = " ".join(["word"] * (2 + 5 * i)) + f" question {i}?"
        requests.append(([user(text, *images)], 2 + (i * 5) % 13, i % 2 == 0))

    def run(req):
        messages, max_tokens, stream = req
        client = live.client()
        if stream:
            chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                              temperature=0).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, requests))
    for (messages, max_tokens, _), text in zip(requests, got):
        assert text == alone(model, messages, max_tokens)


def _health(live):
    return httpx.get(live.url + "/health", timeout=30).json()


def test_cancelled_stream_frees_its_slot(live, model):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live.url + "/v1/chat/completions",
                         json={"messages": [user("Tell a long story.")], "max_tokens": 900, "stream": True,
                               "temperature": 0}) as r:
            lines = r.iter_lines()
            while "content" not in next(lines):
                pass
            assert _health(live)["running"] == 1
    deadline = time.monotonic() + 30
    while _health(live)["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _health(live)["running"] == 0
    r = live.client().chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=4, temperature=0)
    assert r.choices[0].message.content == alone(model, [user("Hi")], 4)


def test_disconnected_non_streaming_request_is_cancelled(live, model):
    """A non-streaming client that goes away mid-generation (a 1 s read timeout here) cancels its request: the
    handler sees the disconnect, the row is freed long before its 1000 tokens, the answer is counted as 499,
    and the next request completes."""
    cancelled = 'llava_fast_requests_total{route="/v1/chat/completions",status="499"}'

    def metric(name):
        return _metric(httpx.get(live.url + "/metrics", timeout=30).text, name)

    generated, cancelled_before = metric("llava_fast_generation_tokens_total"), metric(cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json={"messages": [user("Tell a long story.")],
                                                           "max_tokens": 1000, "temperature": 0},
                   timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 30
    while (_health(live)["running"] or metric(cancelled) == cancelled_before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _health(live)["running"] == 0 and metric(cancelled) == cancelled_before + 1
    assert 0 < metric("llava_fast_generation_tokens_total") - generated < 1000
    r = live.client().chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=4, temperature=0)
    assert r.choices[0].message.content == alone(model, [user("Hi")], 4)


def _bad_inputs(live):
    big = png_data_url(PIL.Image.new("RGB", (1100, 1000), (9, 99, 199)))  # 1.1 M pixels > the limit of 1 M
    not_image = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()
    ok = [user("Hi")]
    return [
        ("malformed JSON", b'{"messages": [', None, "not valid JSON"),
        ("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff"}]}', None, "not valid JSON: it is not UTF-8"),
        ("nested too deeply", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", None, "nests too deeply"),
        ("unpaired surrogate", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', None,
         "lone UTF-16 surrogate U+D800"),
        ("missing messages", {"model": "tiny"}, "messages", "messages"),
        ("wrong content type", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
         "must be a string or a non-empty array of content parts"),
        ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                       {"type": "audio", "audio": "a"}]}]},
         "messages.0.content", 'part 1 must be {"type": "text"'),
        ("image part without url", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"detail": "low"}}]}]}, "messages.0.content",
         'part 0 has type "image_url" but no URL'),
        ("text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages.0.content", 'part 0 has type "text" but its "text" is null'),
        ("stop of a number", {"messages": ok, "stop": ["a", 5]}, "stop", 'up to 4 strings, got ["a", 5]'),
        ("temperature NaN", json.dumps({"messages": ok, "temperature": float("nan")}).encode(), "temperature",
         "temperature: must be a number from 0 to 2 (0 = greedy), got nan"),
        ("top_p 0", {"messages": ok, "top_p": 0}, "top_p", "above 0 and at most 1, got 0"),
        ("temperature of a boolean", {"messages": ok, "temperature": True}, "temperature",
         "temperature: Input should be a valid number, got true"),
        ("top_p of a string", {"messages": ok, "top_p": "0.5"}, "top_p",
         'top_p: Input should be a valid number, got "0.5"'),
        ("detail of a number", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": JPEG_URL, "detail": 3}}]}]},
         "messages.0.content.0.image_url.detail", "Input should be a valid string, got 3"),
        ("seed out of range", {"messages": ok, "seed": 2**70}, "seed", "got 1180591620717411303424"),
        ("max_tokens of a string", {"messages": ok, "max_tokens": "ten"}, "max_tokens",
         'max_tokens: Input should be a valid integer, got "ten"'),
        ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "role"),
        ("unknown model", {"messages": ok, "model": "gpt-9"}, "model", "unknown model"),
        ("bad base64", {"messages": [user("x", "data:image/png;base64,@@@")]}, None, "not valid base64"),
        ("not an image", {"messages": [user("x", not_image)]}, None, "20 bytes (starting b'this is not an i')"),
        ("empty image", {"messages": [user("x", "data:image/png;base64,")]}, None, "empty (0 bytes)"),
        ("too many pixels", {"messages": [user("x", big)]}, None, "more than the limit"),
        ("too many images", {"messages": [user("x", *IMAGES)]}, None, "has 3 images; at most 2"),
        ("over the context", {"messages": ok, "max_tokens": 1020}, None, "context"),
        ("n > 1", {"messages": ok, "n": 2}, "n", "n=1"),
        ("http URL", {"messages": [user("x", "https://example.com/a.jpg")]}, None, "not fetched"),
        ("outside media dir", {"messages": [user("x", str(live.outside / "secret.jpg"))]}, None, "outside"),
        (".. escape", {"messages": [user("x", str(live.media / ".." / live.outside.name / "secret.jpg"))]},
         None, "outside"),
        ("symlink escape", {"messages": [user("x", f"file://{live.media / 'link.jpg'}")]}, None, "outside"),
        ("top_logprobs > 20", {"messages": ok, "logprobs": True, "top_logprobs": 30}, "top_logprobs", "20"),
        ("temperature < 0", {"messages": ok, "temperature": -1}, "temperature", "temperature"),
        ("image in assistant turn", {"messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": JPEG_URL}}]}, user("x")]}, None, "user messages"),
    ]


def test_every_bad_input_is_a_400_naming_it(live, model):
    with httpx.Client(timeout=60) as http:
        for name, body, param, words in _bad_inputs(live):
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = http.post(live.url + "/v1/chat/completions", **kw)
            assert r.status_code == 400, (name, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert words.lower() in error["message"].lower(), (name, error)
            assert "object at 0x" not in error["message"], (name, error)  # no Python reprs
            assert "--" not in error["message"], (name, error)  # no server flags: the client cannot pass them
            if param:
                assert error["param"] == param, (name, error)
        r = http.post(live.url + "/v1/chat/completions", content=b"x" * (3 << 20),
                      headers={"content-type": "application/json"})
        assert r.status_code == 413 and "body" in r.json()["error"]["message"]
        # The same body in chunks (no Content-Length: the limit counts it as it comes) was a 400 saying the body
        # "is not UTF-8 text, or it nests too deeply": FastAPI's body parsing wrapped the count's stop in its own.
        r = http.post(live.url + "/v1/chat/completions", content=iter([b"x" * (1 << 20)] * 3),
                      headers={"content-type": "application/json"})
        assert r.status_code == 413 and "request body over" in r.json()["error"]["message"], r.text
        assert http.get(live.url + "/v1/nothing").status_code == 404
    # Good requests right after, one of them naming an image inside the allowed directory.
    for url in (str(live.media / "ironing.jpg"), f"file://{live.media / 'ironing.jpg'}"):
        r = live.client().chat.completions.create(model="tiny", messages=[user("What?", url)], max_tokens=3,
                                                  temperature=0)
        assert r.choices[0].message.content == alone(model, [user("What?", JPEG_URL)], 3)


def test_null_optional_fields_mean_their_defaults(live, model):
    """OpenAI's API types temperature, top_p, n, stream, logprobs and the penalties as "... or null": a client
    built on its schema sends null for a field it leaves unset. Each null was a 400 ("Input should be a valid
    number, got null"); it now means the field's default, as leaving the field out does."""
    messages = [user("Name three colours.")]
    nulls = dict.fromkeys(("top_p", "top_k", "n", "stream", "logprobs", "presence_penalty", "frequency_penalty",
                           "seed", "stop", "max_tokens", "top_logprobs"))
    with httpx.Client(timeout=120) as http:
        def reply(**fields):
            r = http.post(live.url + "/v1/chat/completions", json={"messages": messages, **fields})
            assert r.status_code == 200, (fields, r.text)
            body = r.json()
            assert body["object"] == "chat.completion" and body["choices"][0]["logprobs"] is None, body
            return body["choices"][0]["message"]["content"]

        assert reply(temperature=0, max_completion_tokens=5, **nulls) == alone(model, messages, 5)
        # temperature null is 1.0, its default: the same seeded draws as 1.0 given, and as generate() at 1.0
        sampled = reply(temperature=None, seed=11, max_tokens=6)
        assert sampled == reply(temperature=1.0, seed=11, max_tokens=6)
        assert sampled == alone(model, messages, 6, temperature=1.0, seed=11)


def test_fields_the_server_cannot_honour_are_refused_by_name(live, model):
    """A JSON schema, a tool call, a penalty, a logit bias, an audio reply or a web search that were ignored gave
    free text as if it obeyed them; each is a 400 naming the field, and its neutral value is accepted and answers
    as without it."""
    ok = [user("Hi")]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    refused = [
        ({"response_format": {"type": "json_object"}}, "response_format", "json_object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, "response_format",
         "json_schema"),
        ({"tools": [tool]}, "tools", "1 tool and no tool_choice"),
        ({"tools": [tool, tool], "tool_choice": "auto"}, "tools", '2 tools and tool_choice "auto"'),
        ({"tools": [tool], "tool_choice": "required"}, "tool_choice", '"required"'),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "get_weather"),
        ({"functions": [tool["function"]]}, "functions", "1 tool"),
        ({"presence_penalty": 0.5}, "presence_penalty", "got 0.5"),
        ({"frequency_penalty": -1}, "frequency_penalty", "got -1"),
        ({"logit_bias": {"42": 100}}, "logit_bias", '{"42": 100}'),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities",
         '["text", "audio"]'),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "no audio"),
        ({"web_search_options": {}}, "web_search_options", "searches nothing"),
    ]
    with httpx.Client(timeout=60) as http:
        for fields, param, words in refused:
            r = http.post(live.url + "/v1/chat/completions", json={"messages": ok, "max_tokens": 2, **fields})
            assert r.status_code == 400, (fields, r.text)
            error = r.json()["error"]
            assert error["param"] == param and words in error["message"], (fields, error)
    expected = alone(model, ok, 3)
    neutral = dict(response_format={"type": "text"}, tools=[tool], tool_choice="none", presence_penalty=0,
                   frequency_penalty=0.0, logit_bias={}, modalities=["text"])
    r = live.client().chat.completions.create(model="tiny", messages=ok, max_tokens=3, temperature=0, **neutral)
    assert r.choices[0].message.content == expected


def test_developer_role_is_a_system_message(live, model):
    """OpenAI's newer clients send `developer` where older ones sent `system`; both set the system prompt."""
    as_system = [{"role": "system", "content": "Answer in French."}, user("What is shown?", JPEG_URL)]
    as_developer = [{"role": "developer", "content": "Answer in French."}, user("What is shown?", JPEG_URL)]
    assert split_openai_messages(as_developer) == split_openai_messages(as_system)
    expected = alone(model, as_system, 5)
    assert expected != alone(model, [user("What is shown?", JPEG_URL)], 5)  # the system prompt changes the reply
    assert alone(model, as_developer, 5) == expected
    r = live.client().chat.completions.create(model="tiny", messages=as_developer, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == expected
    with pytest.raises(InputError, match="user messages, not developer messages"):
        split_openai_messages([{"role": "developer", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                               user("Hi")])


def test_consecutive_messages_of_one_role_are_one_turn(live, model):
    """OpenAI's clients send an image and its question as two user messages (OpenAI's API takes them); they are one
    user turn, their texts joined by "\\n" as a message's parts are, in-process and over HTTP."""
    split = [user("", JPEG_URL), {"role": "system", "content": "Be brief."}, user("What is shown?"),
             {"role": "assistant", "content": "An iron."}, {"role": "assistant", "content": "On a taxi."},
             user("Why?"), user("Say more.")]
    assert split_openai_messages(split) == ([("user", "<image>\n\nWhat is shown?"),
                                             ("assistant", "An iron.\nOn a taxi."), ("user", "Why?\nSay more.")],
                                            [JPEG_URL], "Be brief.")
    joined = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "image_url", "image_url": {"url": JPEG_URL}},
                                           {"type": "text", "text": ""}, {"type": "text", "text": "What is shown?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "An iron."},
                                                {"type": "text", "text": "On a taxi."}]},
              {"role": "user", "content": [{"type": "text", "text": "Why?"}, {"type": "text", "text": "Say more."}]}]
    expected = alone(model, joined, 5)
    assert alone(model, split, 5) == expected
    r = live.client().chat.completions.create(model="tiny", messages=split, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == expected
    with httpx.Client(timeout=60) as http:
        r = http.post(live.url + "/v1/chat/completions", json={"messages": [
            {"role": "assistant", "content": "Hello."}, user("Hi")], "max_tokens": 2})
    assert r.status_code == 400 and "first message" in r.json()["error"]["message"], r.text


def test_image_written_as_text_is_text(live, model):
    """"<image>" typed in a message is text: only image_url parts place images, so it neither counts as a
    missing image nor moves the real one."""
    question = "Is <image> an HTML tag?"
    messages = [{"role": "system", "content": "Never write <image>."},
                {"role": "user", "content": [{"type": "text", "text": question},
                                             {"type": "image_url", "image_url": {"url": JPEG_URL}}]}]
    turns, urls, system = split_openai_messages(messages)
    ids = model.encode_prompt(turns, len(urls), system=system)
    image_at = [i for i, t in enumerate(ids) if t == model.image_token_id]
    assert len(image_at) == model.num_image_tokens and image_at[-1] - image_at[0] == len(image_at) - 1
    before, after = model.tokenizer.decode(ids[:image_at[0]]), model.tokenizer.decode(ids[image_at[-1] + 1:])
    assert before.endswith(question + "\n") and after.strip() == "ASSISTANT:"  # the image where its part was
    assert before.startswith("Never write <image>. USER:")
    expected = alone(model, messages, 4)
    r = live.client().chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == expected
    text_only = [user("What does <image> do in LLaVA's prompts?")]
    r = live.client().chat.completions.create(model="tiny", messages=text_only, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == alone(model, text_only, 4)
    assert model.encode_prompt(split_openai_messages(text_only)[0]).count(model.image_token_id) == 0


def test_server_errors_speak_to_the_client_not_the_operator():
    """A client cannot pass the server's command-line flags: its errors say what the request can change."""
    from llava_fast.errors import ImageError
    from llava_fast.prompts.messages import load_image_url

    with pytest.raises(ImageError) as err:
        load_image_url("/tmp/cat.jpg")  # a server started without --allowed-local-media-path
    assert "--" not in str(err.value) and "data:image/" in str(err.value)


def test_a_body_sent_as_another_content_type_is_a_415_naming_it(live):
    """`curl -d '{...}'` without -H sends application/x-www-form-urlencoded: the JSON is right, the header is
    not, and the client learns which."""
    body = json.dumps({"messages": [user("Hi")], "max_tokens": 2})
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        r = httpx.post(live.url + "/v1/chat/completions", content=body, headers={"content-type": content_type},
                       timeout=30)
        assert r.status_code == 415, (content_type, r.text)
        assert r.json()["error"]["message"] == ("the request body must be JSON sent with Content-Type: "
                                                f"application/json, got Content-Type: {content_type}")


def test_full_queue_is_503_with_retry_after(live):
    saved, live.scheduler.max_waiting = live.scheduler.max_waiting, 0
    try:
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [user("Hi")], "max_tokens": 2}, timeout=30)
    finally:
        live.scheduler.max_waiting = saved
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_busy"


def test_unexpected_error_is_a_generic_500_and_serving_goes_on(live, model, caplog):
    def fault():
        live.scheduler.fault = None
        raise RuntimeError("injected fault 1234")

    live.scheduler.fault = fault
    with caplog.at_level(logging.ERROR, logger="llava_fast.serve"):
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [user("Hi")], "max_tokens": 2},
                       timeout=30)
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error"
    assert "1234" not in r.text and "injected fault 1234" in caplog.text and "Traceback" in caplog.text
    r = live.client().chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=3, temperature=0)
    assert r.choices[0].message.content == alone(model, [user("Hi")], 3)


def _metric(text, name):
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_repeated_image_is_a_cache_hit(live, model):
    client = live.client()
    image = png_data_url(random_image(77))
    before = httpx.get(live.url + "/metrics").text
    # Different system prompts: the second request shares no prefix, so only the feature cache can help.
    for system in ("First.", "Second, longer system prompt."):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "system", "content": system}, user("What?", image)])
    after = httpx.get(live.url + "/metrics").text
    # The first system prompt + image again, with another question: its K/V prefix is reused (copied from the
    # row that still holds it, which the second request did not overwrite), and the answer is still exact.
    messages = [{"role": "system", "content": "First."}, user("Another question?", image)]
    r = client.chat.completions.create(model="tiny", max_tokens=4, messages=messages, temperature=0)
    assert r.choices[0].message.content == alone(model, messages, 4)
    reused = _metric(httpx.get(live.url + "/metrics").text, "llava_fast_cached_prompt_tokens_total")
    assert reused - _metric(after, "llava_fast_cached_prompt_tokens_total") > model.num_image_tokens
    for counter in ("llava_fast_image_cache_misses_total", "llava_fast_image_cache_hits_total"):
        assert _metric(after, counter) - _metric(before, counter) == 1, counter
    for name in ("llava_fast_requests_total", "llava_fast_running_rows", "llava_fast_waiting_requests",
                 "llava_fast_prompt_tokens_total", "llava_fast_generation_tokens_total",
                 "llava_fast_time_to_first_token_seconds_bucket", "llava_fast_inter_token_latency_seconds_bucket"):
        assert name in after, name
    assert 'route="/v1/chat/completions",status="400"' in after or "status" in after


def test_image_prefix_outlives_its_row(live, model):
    """System prompt + image K/V is kept past its row: after every row has been taken by other requests, the
    same system prompt + image with another question still prefills only the question, and answers exactly."""
    image = png_data_url(random_image(79, 90, 30))
    client = live.client()

    def ask(messages, max_tokens):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                              temperature=0).choices[0].message.content

    def cached():
        return _metric(httpx.get(live.url + "/metrics", timeout=30).text, "llava_fast_cached_prompt_tokens_total")

    ask([{"role": "system", "content": "Look."}, user("What is it?", image)], 2)
    others = [[user(f"Other request {i}: " + "words " * (5 + i))] for i in range(live.config.max_batch)]
    with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:  # together: every row is taken
        list(pool.map(lambda m: ask(m, 12), others))
    before = cached()
    messages = [{"role": "system", "content": "Look."}, user("And its colour?", image)]
    assert ask(messages, 4) == alone(model, messages, 4)
    assert cached() - before > model.num_image_tokens


def test_prefix_of_a_running_row_is_reused(live, model):
    """A request whose system prompt + image a *running* row holds copies that row's prompt K/V (it never
    changes while the row decodes) instead of prefilling the image again; both answers stay exact."""
    image = png_data_url(random_image(78, 50, 70))
    first = [{"role": "system", "content": "Be brief."}, user("Tell a long story about it.", image)]
    second = [{"role": "system", "content": "Be brief."}, user("What colour?", image)]

    def cached():
        return _metric(httpx.get(live.url + "/metrics", timeout=30).text, "llava_fast_cached_prompt_tokens_total")

    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live.url + "/v1/chat/completions",
                         json={"messages": first, "max_tokens": 40, "stream": True, "temperature": 0}) as r:
            lines, text = r.iter_lines(), []
            while '"content": "' not in (line := next(lines)) or '"content": ""' in line:
                pass  # the first chunk with text: the row has its whole prompt in and decodes
            before = cached()
            reply = live.client().chat.completions.create(model="tiny", messages=second, max_tokens=5, temperature=0)
            assert cached() - before > model.num_image_tokens
            assert reply.choices[0].message.content == alone(model, second, 5)
            text.append(line)
            text += list(lines)
    chunks = [json.loads(x[6:]) for x in text if x.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == alone(
        model, first, 40)


def test_models_health_api_key(live):
    assert [m.id for m in live.client().models.list()] == ["tiny"]
    # OpenAI's retrieve (GET /v1/models/ID) was a bare 404 "Not Found" for the served model too.
    assert live.client().models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="unknown model 'gpt-4o'"):
        live.client().models.retrieve("gpt-4o")
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 404 and "no route POST /v1/completions" in r.json()["error"]["message"]
    assert "POST /v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "method GET is not allowed on /v1/chat/completions"
    assert _health(live)["status"] == "ok"
    live.config.api_key = "sekret"
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client().models.list()
        assert [m.id for m in live.client(api_key="sekret").models.list()] == ["tiny"]
        assert httpx.get(live.url + "/health").status_code == 200  # only /v1/* needs the key
    finally:
        live.config.api_key = None


@contextlib.contextmanager
def _cli_server(*flags):
    """`llava-fast serve --preset tiny FLAGS` in a subprocess on a free port, from when /health answers:
    (process, url). Killed at the end if still running."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llava_fast.cli", "serve", "--preset", "tiny", "--port", str(port),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _sigterm_mid_stream(proc, url, **body):
    """A streamed reply to "Go on." with `body`'s fields; SIGTERM to the server at its first text. Returns the
    stream's remaining non-empty lines."""
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      json={"messages": [user("Go on.")], "stream": True, **body}) as r:
        lines = r.iter_lines()
        while "content" not in next(lines):
            pass
        proc.send_signal(signal.SIGTERM)
        return [line for line in lines if line]


def test_a_reply_past_the_shutdown_timeout_ends_with_an_error_event():
    """A stream still running when --shutdown-timeout runs out gets the scheduler's error ("the server shut down
    before this request finished"), then [DONE]: uvicorn's own cut-off at the same time closed its connection
    mid-stream, with neither. A plain request running beside it gets that error as a 503: nothing failed in the
    server, it stopped."""
    long = dict(max_tokens=2000, ignore_eos=True)
    with _cli_server("--max-model-len", "2048", "--max-batch", "2", "--shutdown-timeout", "1") as (proc, url), \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        plain = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=120,
                            json={"messages": [user("Go on.")], **long})
        while httpx.get(url + "/health", timeout=5).json()["running"] < 1:  # running before the signal
            assert not plain.done(), plain.result().text
            time.sleep(0.05)
        rest = _sigterm_mid_stream(proc, url, **long)
        assert rest[-1] == "data: [DONE]", rest[-3:]
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert "shut down before this request finished" in error["message"], error
        assert error["type"] == "server_shutdown", error
        assert sum('"content"' in line for line in rest) < 1500  # cut short, not run to its end
        r = plain.result(timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_shutdown", r.text
        assert "shut down before this request finished" in r.json()["error"]["message"], r.text
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output


def test_sigterm_drains_running_requests_and_exits_0():
    with _cli_server("--max-model-len", "512", "--max-batch", "2", "--shutdown-timeout", "60") as (proc, url):
        rest = _sigterm_mid_stream(proc, url, max_tokens=24)
        assert '"finish_reason": "length"' in "".join(rest) and rest[-1] == "data: [DONE]"
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output
        # A quiet exit: the last line is our own, with no extension's leak report after it.
        assert "nanobind" not in output and "leaked" not in output, output[-2000:]
        assert "llava-fast serve: stopped after" in output.rstrip().splitlines()[-1], output[-2000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=5)


def _chromium():
    """Debian's chromium and chromedriver (CI installs them: apt-get install chromium chromium-driver)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_chat_page_in_a_headless_browser(live, model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium()
    try:
        browser.get(live.url + "/")
        WebDriverWait(browser, 30).until(lambda b: "tiny" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "image").send_keys(os.path.abspath(BUNDLED_IMAGE))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "preview").is_displayed())
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("6")
        messages = []
        for turn, question in enumerate(["What is unusual here?", "And the colours?"]):
            browser.find_element(By.ID, "question").send_keys(question)
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 120).until(
                lambda b, turn=turn: b.execute_script(f"const a = document.getElementById('answer-{2 * turn}');"
                                           "return a && a.parentElement.dataset.done;"))
            answer = browser.find_element(By.ID, f"answer-{2 * turn}")
            assert answer.get_attribute("class") != "error", answer.text
            messages.append(user(question, JPEG_URL) if turn == 0 else user(question))
            expected = alone(model, messages, 6)
            assert answer.get_property("textContent") == expected and expected
            messages.append({"role": "assistant", "content": expected})
    finally:
        browser.quit()


def test_feature_cache_is_an_lru_bounded_in_bytes():
    from llava_fast.serve.scheduler import FeatureCache

    cache = FeatureCache(max_bytes=2 * 4 * 300)  # two (300,) float32 tensors
    a, b, c = (torch.randn(300) for _ in range(3))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "a" is now the most recent
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c and cache.bytes == 2400
    cache.put("huge", torch.randn(1000))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and cache.bytes == 2400
