"""make-data against a local OpenAI-compatible stub: the messages (against the paper's few-shot files), every
reply rule, retries, resume, rejected replies, bad input; and records that `llava-fast train` accepts."""

import csv
import filecmp
import json
import os
import re
import socket

import numpy as np
import PIL.Image
import pytest
from openai_stub import OpenAIStub

from llava_fast.errors import InputError
from llava_fast.pipelines import instruct
from llava_fast.pipelines.client import ChatClient, EndpointError

TYPE_DIRS = {"conversation": "conversation", "detail": "detail_description", "complex": "complex_reasoning"}
FAST = ["--backoff", "0.01", "--http-retries", "3"]


@pytest.fixture(scope="module")
def caps_boxes(reference_dir):
    return os.path.join(reference_dir, "llava_bench_coco", "caps_boxes_coco2014_val_80.jsonl")


@pytest.fixture(scope="module")
def caps_rows(caps_boxes):
    with open(caps_boxes) as f:
        return [json.loads(line) for line in f]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def few_shot(reference_dir, kind):
    directory = os.path.join(reference_dir, "instruct_prompts", TYPE_DIRS[kind])
    names = sorted(n for n in os.listdir(directory) if n.endswith("_caps.txt"))
    return (read(os.path.join(directory, "system_message.txt")),
            [(read(os.path.join(directory, n)), read(os.path.join(directory, n.replace("_caps", "_conv"))))
             for n in names])


def expected_context(row, with_boxes):
    """The test's own rendering of a record in the few-shot inputs' layout."""
    text = "\n".join(row["captions"])
    if with_boxes and row["instances"]:
        text += "\n\n" + "\n".join("{}: [{}]".format(i["category"], ", ".join(str(round(v, 3)) for v in i["bbox"]))
                                   for i in row["instances"])
    return text


def good_reply(kind, index=0):
    if kind == "detail":
        return f"A detailed description number {index}.\n\nIt has two paragraphs."
    if kind == "complex":
        return f"Question:\nWhy is scene {index} unusual?\n===\nAnswer:\nBecause of reason {index}."
    return (f"Question:\nWhat is in image {index}?\n===\nAnswer:\nA thing.\n===\nQuestion:\nHow many?\n===\n"
            f"Answer:\nThree, in image {index}.")


def record_index(body, caps_rows):
    """Which input record a request is about (its first caption opens the last user message)."""
    last = body["messages"][-1]["content"]
    return next(i for i, r in enumerate(caps_rows) if last.startswith(r["captions"][0] + "\n"))


# ------------------------------------------------------------------------------------------------------
# Prompts and messages
# ------------------------------------------------------------------------------------------------------


def test_packaged_prompts_are_the_papers(reference_dir):
    ref = os.path.join(reference_dir, "instruct_prompts")
    for directory in TYPE_DIRS.values():
        names = sorted(os.listdir(os.path.join(ref, directory)))
        assert sorted(n for n in os.listdir(os.path.join(instruct.PROMPTS_DIR, directory))
                      if n.endswith(".txt")) == names
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(ref, directory),
                                                   os.path.join(instruct.PROMPTS_DIR, directory), names,
                                                   shallow=False)
        assert match == names and not mismatch and not errors


@pytest.mark.parametrize("kind", list(TYPE_DIRS))
def test_context_is_written_exactly_as_the_few_shot_inputs(reference_dir, kind):
    """Each few-shot input, read back into a record, renders to the same characters."""
    _, examples = few_shot(reference_dir, kind)
    _, _, uses_boxes = instruct.load_prompts(None, kind)
    assert uses_boxes == (kind != "conversation")
    box = re.compile(r"^(.+): \[(.+)\]$")
    for caps, _ in examples:
        head, _, tail = caps.partition("\n\n")
        instances = [{"category": m.group(1), "bbox": [float(v) for v in m.group(2).split(", ")]}
                     for m in map(box.match, tail.split("\n")) if m]
        record = {"captions": head.split("\n"), "instances": instances}
        assert instruct.format_context(record, uses_boxes) == caps


@pytest.mark.parametrize("kind", list(TYPE_DIRS))
def test_requests_carry_system_few_shot_and_context(reference_dir, caps_boxes, caps_rows, tmp_path, cli, kind):
    system, examples = few_shot(reference_dir, kind)
    with OpenAIStub(lambda body, n: good_reply(kind, n)) as stub:
        code, _, err = cli("make-data", "instruct", "--type", kind, "--captions-boxes", caps_boxes, "--endpoint",
                           stub.url, "--model", "judge-model", "--output", tmp_path / "out.json", "--limit", 3,
                           "--workers", 2, "--temperature", 0.7, "--max-tokens", 777, *FAST)
    assert code == 0, err
    assert len(stub.requests) == 3
    seen = set()
    for request in stub.requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions"
        assert body["model"] == "judge-model" and body["temperature"] == 0.7 and body["max_tokens"] == 777
        messages = body["messages"]
        assert messages[0] == {"role": "system", "content": system}
        assert len(messages) == 2 + 2 * len(examples)
        for k, (caps, conv) in enumerate(examples):
            assert messages[1 + 2 * k] == {"role": "user", "content": caps}
            assert messages[2 + 2 * k] == {"role": "assistant", "content": conv}
        i = record_index(body, caps_rows)
        seen.add(i)
        assert messages[-1] == {"role": "user", "content": expected_context(caps_rows[i], kind != "conversation")}
    assert seen == {0, 1, 2}


# ------------------------------------------------------------------------------------------------------
# Reply rules
# ------------------------------------------------------------------------------------------------------


def test_the_few_shot_replies_parse_as_their_type(reference_dir):
    _, examples = few_shot(reference_dir, "conversation")
    pairs = instruct.parse_qa_blocks(examples[0][1])
    assert len(pairs) == 4
    assert pairs[0] == ("What color is the fire hydrant in the image?", "The fire hydrant in the image is red.")
    assert pairs[3][1].startswith("The image suggests") and pairs[3][1].endswith("residents and infrastructure.")
    assert "\n\nFor instance" in pairs[3][1]  # paragraphs inside an answer survive
    assert len(instruct.parse_qa_blocks(examples[1][1])) == 4
    for _, conv in few_shot(reference_dir, "complex")[1]:
        record = instruct.reply_to_record("complex", {"id": "x", "image": "x.jpg"}, conv, "stop", seed=0)
        assert len(record["conversations"]) == 2


@pytest.mark.parametrize("reply, accepted", [
    ("Question: What is it?\n===\nAnswer: A cat.", 1),  # label and text on one line
    ("Question:\nQ1?\n===\nAnswer:\nA1\n===\n", 1),  # a trailing separator
    ("  Question:\nQ1?\n  ===  \nanswer:\nA1", 1),  # spaces around the separator, lower-case label
])
def test_tolerated_layouts(reply, accepted):
    assert len(instruct.parse_qa_blocks(reply)) == accepted


@pytest.mark.parametrize("kind, reply, finish, reason", [
    ("conversation", "", "stop", "empty reply"),
    ("conversation", "   \n", "stop", "empty reply"),
    ("conversation", "The image shows a cat.", "stop", "neither 'Question:' nor 'Answer:'"),
    ("conversation", "Answer:\nA1", "stop", "'Answer' where 'Question' was expected"),
    ("conversation", "Question:\nQ1?\n===\nQuestion:\nQ2?\n===\nAnswer:\nA", "stop", "must alternate"),
    ("conversation", "Question:\nQ1?\n===\nAnswer:\nA1\n===\nQuestion:\nQ2?", "stop", "no answer"),
    ("conversation", "Question:\n\n===\nAnswer:\nA1", "stop", "is empty"),
    ("conversation", "Question:\nQ1?\n===\nAnswer:\nA1", "length", "token limit"),
    ("complex", "Question:\nQ1?\n===\nAnswer:\nA1\n===\nQuestion:\nQ2?\n===\nAnswer:\nA2", "stop",
     "one question-answer pair, got 2"),
    ("complex", "Why? Because.", "stop", "neither"),
    ("detail", "Question:\nDescribe it.\n===\nAnswer:\nIt is a cat.", "stop", "Question/Answer layout"),
    ("detail", "", "stop", "empty reply"),
    ("detail", "A long description that got cu", "length", "token limit"),
])
def test_malformed_replies_are_rejected_with_the_reason(kind, reply, finish, reason):
    with pytest.raises(instruct.RejectedReply, match=re.escape(reason)):
        instruct.reply_to_record(kind, {"id": "1", "image": "1.jpg"}, reply, finish, seed=0)


def test_records_place_the_image_both_ways_and_depend_only_on_seed_and_id():
    reply = good_reply("conversation")
    records = [instruct.reply_to_record("conversation", {"id": str(i), "image": f"{i}.jpg"}, reply, "stop", seed=3)
               for i in range(40)]
    firsts = [r["conversations"][0]["value"] for r in records]
    before = sum(v.startswith("<image>\n") for v in firsts)
    after = sum(v.endswith("\n<image>") for v in firsts)
    assert before + after == 40 and 8 < before < 32
    assert all(v.replace("<image>", "").strip() == "What is in image 0?" for v in firsts)
    for r in records:  # only the first human turn has the image; turns alternate human / gpt
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt", "human", "gpt"]
        assert sum("<image>" in t["value"] for t in r["conversations"]) == 1
    again = instruct.reply_to_record("conversation", {"id": "7", "image": "7.jpg"}, reply, "stop", seed=3)
    assert again == records[7]
    other_seed = [instruct.reply_to_record("conversation", {"id": str(i), "image": "x"}, reply, "stop", seed=4)
                  for i in range(40)]
    assert [r["conversations"][0]["value"] for r in other_seed] != firsts
    details = {instruct.reply_to_record("detail", {"id": str(i), "image": "x"}, "A scene.", "stop", seed=0)
               ["conversations"][0]["value"].replace("<image>", "").strip() for i in range(60)}
    assert details <= set(instruct.DETAILED_DESCRIPTION_INSTRUCTIONS) and len(details) > 8


# ------------------------------------------------------------------------------------------------------
# Retries, resume, rejected replies, errors
# ------------------------------------------------------------------------------------------------------


def test_429_5xx_and_time_outs_are_retried_with_backoff():
    script = [429, 500, 503, ("sleep", 1.5), "fine"]
    with OpenAIStub(lambda body, n: script[n]) as stub:
        client = ChatClient("m", stub.url, timeout=0.5, retries=5, backoff=0.01)
        assert client.chat([{"role": "user", "content": "hi"}]).text == "fine"
        assert len(stub.requests) == 5
    with OpenAIStub(lambda body, n: 500) as stub:
        client = ChatClient("m", stub.url, retries=2, backoff=0.01)
        with pytest.raises(EndpointError, match="kept failing with HTTP 500 .* after 3 attempts"):
            client.chat([{"role": "user", "content": "hi"}])
        assert len(stub.requests) == 3
    with OpenAIStub(lambda body, n: 404) as stub:  # a wrong model name is not retried
        client = ChatClient("m", stub.url, retries=5, backoff=0.01)
        with pytest.raises(EndpointError, match="HTTP 404"):
            client.chat([{"role": "user", "content": "hi"}])
        assert len(stub.requests) == 1


def test_openai_without_a_key_is_refused_before_any_request(monkeypatch):
    """Offline, the default endpoint without a key was retried for a minute, then "cannot be reached"."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(InputError, match="no API key for https://api.openai.com/v1: set OPENAI_API_KEY or pass "
                       "--api-key, or point --endpoint at another"):
        ChatClient("gpt-4-0314")
    assert ChatClient("gpt-4-0314", api_key="sk-test").endpoint == "https://api.openai.com/v1"
    assert ChatClient("m", "http://127.0.0.1:8000/v1").endpoint == "http://127.0.0.1:8000/v1"  # a local server


def test_resume_skips_done_records_and_keeps_them_unchanged(caps_boxes, caps_rows, tmp_path, cli):
    out = tmp_path / "conv.json"
    args = ["make-data", "instruct", "--type", "conversation", "--captions-boxes", caps_boxes, "--model", "m",
            "--output", out, "--seed", 5, *FAST]
    with OpenAIStub(lambda body, n: good_reply("conversation", record_index(body, caps_rows))) as stub:
        assert cli(*args, "--endpoint", stub.url, "--limit", 3)[0] == 0
        first = json.loads(out.read_text())
        assert cli(*args, "--endpoint", stub.url, "--limit", 5, "--workers", 3)[0] == 0
        assert len(stub.requests) == 5  # 3 + only the 2 new ones
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == [r["id"] for r in caps_rows[:5]]  # input order
    assert records[:3] == first
    assert all(r["image"] == c["image"] for r, c in zip(records, caps_rows))


def test_unparsable_replies_go_to_the_rejected_file_and_are_retried_on_resume(caps_boxes, caps_rows, tmp_path, cli):
    out = tmp_path / "complex.json"
    rejected = tmp_path / "complex.rejected.jsonl"
    args = ["make-data", "instruct", "--type", "complex", "--captions-boxes", caps_boxes, "--model", "m",
            "--output", out, "--limit", 4, *FAST]

    def flaky(body, n):
        i = record_index(body, caps_rows)
        return "I cannot do that." if i in (1, 3) else good_reply("complex", i)

    with OpenAIStub(flaky) as stub:
        code, _, err = cli(*args, "--endpoint", stub.url)
    assert code == 0
    assert "2 replies could not be parsed" in err and str(rejected) in err
    assert [r["id"] for r in json.loads(out.read_text())] == [caps_rows[0]["id"], caps_rows[2]["id"]]
    bad = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert sorted(b["id"] for b in bad) == sorted([caps_rows[1]["id"], caps_rows[3]["id"]])
    assert all(b["reply"] == "I cannot do that." and "neither 'Question:'" in b["reason"] for b in bad)
    with OpenAIStub(lambda body, n: good_reply("complex", record_index(body, caps_rows))) as stub:
        assert cli(*args, "--endpoint", stub.url)[0] == 0
        assert len(stub.requests) == 2  # only the rejected ones are asked again
    assert len(json.loads(out.read_text())) == 4
    assert rejected.read_text() == ""


def test_a_dead_endpoint_stops_with_exit_2_and_keeps_what_was_written(caps_boxes, caps_rows, tmp_path, cli):
    out = tmp_path / "detail.json"
    args = ["make-data", "instruct", "--type", "detail", "--captions-boxes", caps_boxes, "--model", "m",
            "--output", out, "--workers", 1, *FAST]
    with OpenAIStub(lambda body, n: good_reply("detail", n) if n < 2 else 503) as stub:
        code, _, err = cli(*args, "--endpoint", stub.url, "--limit", 4)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("llava-fast: error: the endpoint") and "HTTP 503" in err
    assert [r["id"] for r in json.loads(out.read_text())] == [caps_rows[0]["id"], caps_rows[1]["id"]]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = cli(*args, "--endpoint", f"http://127.0.0.1:{port}/v1", "--limit", 4)
    assert code == 2 and "cannot be reached" in err
    assert len(json.loads(out.read_text())) == 2  # kept


def test_bad_input_is_exit_2_naming_the_line_and_keeps_the_output(caps_boxes, tmp_path, cli):
    out = tmp_path / "x.json"
    out.write_text('[{"id": "kept", "image": "k.jpg", "conversations": []}]\n')
    before = out.read_text()
    lines = open(caps_boxes).read().splitlines()
    cases = {"json": lines[:2] + ['{"id": "3", "image": "3.jpg", "captions": ['] + lines[3:5],
             "captions": lines[:4] + ['{"id": "5", "image": "5.jpg", "captions": []}'],
             "bbox": lines[:1] + ['{"id": 2, "image": "2.jpg", "captions": ["c"], "instances": [{"category": "dog", '
                                  '"bbox": [0.1, 0.2]}]}']}
    expected = {"json": "line 3: not valid JSON", "captions": "line 5: 'captions' must be a non-empty list",
                "bbox": "line 2: each instance needs a 'category' and a 'bbox' of 4 numbers"}
    with OpenAIStub(lambda body, n: good_reply("detail")) as stub:
        for name, content in cases.items():
            path = tmp_path / f"{name}.jsonl"
            path.write_text("\n".join(content) + "\n")
            code, _, err = cli("make-data", "instruct", "--type", "detail", "--captions-boxes", path, "--endpoint",
                               stub.url, "--model", "m", "--output", out)
            assert code == 2 and len(err.strip().splitlines()) == 1 and expected[name] in err, err
        assert stub.requests == []
    assert out.read_text() == before


# ------------------------------------------------------------------------------------------------------
# make-data captions
# ------------------------------------------------------------------------------------------------------


def test_captions_expand_pairs_from_jsonl_csv_and_llava_json(tmp_path, cli):
    pairs = [{"image": f"cc/{i:05d}.jpg", "caption": f"caption number {i}"} for i in range(30)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(pairs)
    chat = [{"id": f"{i:05d}", "image": p["image"], "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": p["caption"]}]} for i, p in enumerate(pairs)]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    outputs = []
    for name in ("pairs.jsonl", "pairs.csv", "chat.json"):
        code, _, err = cli("make-data", "captions", "--input", tmp_path / name, "--output", tmp_path / f"{name}.out",
                           "--seed", 1)
        assert code == 0, err
        outputs.append(json.loads((tmp_path / f"{name}.out").read_text()))
    assert outputs[0] == outputs[1] == outputs[2]  # same ids (the image stem) -> same draws
    questions = set()
    for record, pair in zip(outputs[0], pairs):
        human, gpt = record["conversations"]
        assert gpt == {"from": "gpt", "value": pair["caption"]} and record["image"] == pair["image"]
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        questions.add(human["value"].replace("<image>", "").strip())
    assert questions <= set(instruct.BRIEF_DESCRIPTION_INSTRUCTIONS) and len(questions) > 5
    (tmp_path / "bad.csv").write_text("image,caption\na.jpg,fine\nb.jpg,\n")
    code, _, err = cli("make-data", "captions", "--input", tmp_path / "bad.csv", "--output", tmp_path / "bad.json")
    assert code == 2 and "line 3: no 'caption'" in err


def test_captions_refuses_a_bad_limit_an_empty_input_and_an_existing_output(cli, tmp_path):
    (tmp_path / "pairs.csv").write_text("image,caption\na.jpg,a cat\nb.jpg,a dog\n")
    (tmp_path / "empty.csv").write_text("image,caption\n")
    out = tmp_path / "out.json"
    code, _, err = cli("make-data", "captions", "--input", tmp_path / "pairs.csv", "--output", out, "--limit", "-1")
    assert code == 2 and "expected a positive integer, got '-1'" in err and not out.exists()
    code, _, err = cli("make-data", "captions", "--input", tmp_path / "empty.csv", "--output", out)
    assert code == 2 and "no (image, caption) pairs" in err and not out.exists()
    assert cli("make-data", "captions", "--input", tmp_path / "pairs.csv", "--output", out, "--limit", "1")[0] == 0
    assert len(json.loads(out.read_text())) == 1
    code, _, err = cli("make-data", "captions", "--input", tmp_path / "pairs.csv", "--output", out)
    assert code == 2 and "already exists; pass --overwrite" in err and len(json.loads(out.read_text())) == 1
    assert cli("make-data", "captions", "--input", tmp_path / "pairs.csv", "--output", out, "--overwrite")[0] == 0
    assert len(json.loads(out.read_text())) == 2


# ------------------------------------------------------------------------------------------------------
# End to end: generated records train
# ------------------------------------------------------------------------------------------------------


def test_generated_records_load_and_train_in_llava_fast_train(reference_dir, caps_boxes, caps_rows, tmp_path, cli):
    import checkpoints as ck

    from llava_fast.train import TrainArgs, train

    outputs = []
    for kind in TYPE_DIRS:  # replies in the few-shot layout of each type
        _, examples = few_shot(reference_dir, kind)
        with OpenAIStub(lambda body, n, ex=examples: ex[n % len(ex)][1]) as stub:
            out = tmp_path / f"{kind}.json"
            code, _, err = cli("make-data", "instruct", "--type", kind, "--captions-boxes", caps_boxes,
                               "--endpoint", stub.url, "--model", "m", "--output", out, "--limit", 3, *FAST)
            assert code == 0, err
        outputs += json.loads(out.read_text())
    assert len(outputs) == 9
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for record in outputs:
        PIL.Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(images / record["image"])
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(outputs))
    model = ck.write_checkpoint(ck.make_hf_model(seed=0), str(tmp_path / "tiny"), "hub")
    result = train(TrainArgs(stage=2, model=model, data=str(data), image_folder=str(images),
                             output=str(tmp_path / "run"), batch_size=9, max_steps=1, strict=True,
                             gradient_checkpointing=False, log_every=1000))
    assert not result.skipped and len(result.losses) == 1 and np.isfinite(result.losses[0][1])


def test_a_prompts_directory_of_ones_own_is_used(caps_boxes, caps_rows, tmp_path, cli):
    import shutil

    prompts = tmp_path / "prompts"
    shutil.copytree(instruct.PROMPTS_DIR, prompts)
    (prompts / "detail_description" / "system_message.txt").write_text("Describe scenes for a museum audio guide.")
    os.remove(prompts / "detail_description" / "002_caps.txt")
    os.remove(prompts / "detail_description" / "002_conv.txt")
    args = ["make-data", "instruct", "--type", "detail", "--captions-boxes", caps_boxes, "--model", "m",
            "--limit", 1, *FAST]
    with OpenAIStub(lambda body, n: "A room.") as stub:
        code, _, err = cli(*args, "--endpoint", stub.url, "--prompts", prompts, "--output", tmp_path / "a.json")
        assert code == 0, err
        messages = stub.requests[0]["body"]["messages"]
        assert messages[0]["content"] == "Describe scenes for a museum audio guide." and len(messages) == 6
        os.remove(prompts / "detail_description" / "001_conv.txt")
        code, _, err = cli(*args, "--endpoint", stub.url, "--prompts", prompts, "--output", tmp_path / "b.json")
        assert code == 2 and "001_caps.txt has no matching 001_conv.txt" in err
        code, _, err = cli(*args, "--endpoint", stub.url, "--prompts", tmp_path, "--output", tmp_path / "c.json")
        assert code == 2 and "no detail_description/system_message.txt" in err
        assert len(stub.requests) == 1
