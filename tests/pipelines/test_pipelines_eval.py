"""eval llava-bench and eval scienceqa against the original LLaVA code (llava-torch 1.2.2.post1 run as plain
scripts: eval_gpt_review_bench.py with a recording fake of its pre-1.0 openai API, summarize_gpt_review.py,
eval_science_qa.py): the same judge messages, the same reviews, the same numbers. Plus answering with a model
(batched = one by one, resumable), the parse rules, and bad input."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
from openai_stub import OpenAIStub

from llava_fast.pipelines import llava_bench, scienceqa

# The judge's scripted reply, shared by the fake openai module the original script imports and by our stub.
REVIEW_REPLY = '''
import hashlib

def review_reply(content):
    h = int(hashlib.sha256(content.encode()).hexdigest(), 16)
    a, b, style = 1 + h % 9, 1 + (h // 10) % 10, (h // 100) % 3  # up to 9.5: in range
    first = [f"{a} {b}", f"{a}, {b}", f"{a}.5 {b}"][style]
    return first + "\\nAssistant 1 was more detailed; assistant 2 was shorter."
'''
FAKE_OPENAI = REVIEW_REPLY + '''
import json, os

class error:
    class RateLimitError(Exception):
        pass

class ChatCompletion:
    @staticmethod
    def create(**kwargs):
        with open(os.environ["FAKE_OPENAI_LOG"], "a") as f:
            f.write(json.dumps(kwargs) + "\\n")
        return {"choices": [{"message": {"content": review_reply(kwargs["messages"][-1]["content"])}}]}
'''
namespace = {}
exec(REVIEW_REPLY, namespace)
review_reply = namespace["review_reply"]

WORDS = "the a dog cat two red large small person table near left right sits holds street image shows".split()


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def run_script(path, *args, env=None):
    r = subprocess.run([sys.executable, path, *map(str, args)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def bench(reference_dir):
    d = os.path.join(reference_dir, "llava_bench_coco")
    return {name: os.path.join(d, f) for name, f in [("questions", "qa90_questions.jsonl"),
                                                     ("reference", "qa90_gpt4_answer.jsonl"),
                                                     ("caps", "caps_boxes_coco2014_val_80.jsonl"),
                                                     ("rule", "rule.json")]}


@pytest.fixture(scope="module")
def our_answers(bench, tmp_path_factory):
    rng = random.Random(0)
    rows = [{"question_id": q["question_id"], "prompt": q["text"],
             "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + ".",
             "answer_id": f"ans{q['question_id']:03d}", "model_id": "tiny", "metadata": {}}
            for q in lines(bench["questions"])]
    return write_lines(tmp_path_factory.mktemp("answers") / "answers.jsonl", rows)


# ------------------------------------------------------------------------------------------------------
# LLaVA-Bench review and summarize
# ------------------------------------------------------------------------------------------------------


def test_review_sends_what_eval_gpt_review_bench_sends_and_writes_the_same_reviews(
        llava_original, bench, our_answers, tmp_path, cli):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "openai.py").write_text(FAKE_OPENAI)
    context = write_lines(tmp_path / "context.jsonl", [{"image": c["image"], "caption": c["captions"]}
                                                       for c in lines(bench["caps"])])  # the field it reads
    log, original_out = tmp_path / "calls.jsonl", tmp_path / "original_reviews.jsonl"
    run_script(os.path.join(llava_original, "eval", "eval_gpt_review_bench.py"), "-q", bench["questions"], "-c",
               context, "-a", bench["reference"], our_answers, "-r", bench["rule"], "-o", original_out,
               env={"PYTHONPATH": str(fake), "FAKE_OPENAI_LOG": str(log)})
    calls = lines(log)
    assert len(calls) == 90

    with OpenAIStub(lambda body, n: review_reply(body["messages"][-1]["content"])) as stub:
        code, _, err = cli("eval", "llava-bench", "review", "--questions", bench["questions"], "--context",
                           bench["caps"], "--reference", bench["reference"], "--answers", our_answers, "--rule",
                           bench["rule"], "--endpoint", stub.url, "--model", "gpt-4-0314", "--output",
                           tmp_path / "reviews.jsonl", "--workers", 4, "--backoff", "0.01")
        assert code == 0, err
        ours = sorted((r["body"] for r in stub.requests), key=lambda b: b["messages"][-1]["content"])
    theirs = sorted(calls, key=lambda c: c["messages"][-1]["content"])
    assert len(ours) == 90
    for a, b in zip(ours, theirs):
        assert a["messages"] == b["messages"]  # system + user, character for character
        assert (a["model"], a["temperature"], a["max_tokens"]) == (b["model"], b["temperature"], b["max_tokens"])
    mine, original = lines(tmp_path / "reviews.jsonl"), lines(original_out)
    assert len(mine) == len(original) == 90
    differ = 0
    for a, b in zip(mine, original):  # ids, categories, content, tuples
        if b["tuple"] == [-1, -1]:  # the original's split(' ') fails on "8, 9" (-> "8  9"); ours reads it
            assert a["content"].split("\n")[0].count(", ") == 1 and a["tuple"] is not None
            a["tuple"], differ = b["tuple"], differ + 1
        assert a == b
    assert 10 < differ < 50  # both kinds of first line were exercised


def make_reviews(seed, n=90, failed=0):
    rng = random.Random(seed)
    categories = ["llava_bench_conv", "llava_bench_detail", "llava_bench_complex"]
    rows = []
    for i in range(n):
        ref = float(rng.choice([6, 7, 8, 8, 9, 9, 10]))
        model = float(rng.choice([2, 3, 4, 5, 6, 6.5, 7, 7.5, 8, 9, 10]))
        rows.append({"id": i + 1, "question_id": i, "answer1_id": i, "answer2_id": f"a{i}",
                     "category": categories[(i + seed) % 3], "content": f"{ref} {model}\n...",
                     "tuple": [ref, model]})
    for row in rng.sample(rows, failed):
        row["tuple"] = None
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_summarize_gives_the_numbers_of_summarize_gpt_review(llava_original, tmp_path, cli, seed):
    path = write_lines(tmp_path / f"reviews_{seed}.jsonl", make_reviews(seed, n=60 + 7 * seed))
    printed = run_script(os.path.join(llava_original, "eval", "summarize_gpt_review.py"), "-f", path)
    theirs = {f[0]: tuple(map(float, f[1:])) for f in (line.split() for line in printed.splitlines())
              if len(f) == 4}
    assert set(theirs) == {"all", "llava_bench_conv", "llava_bench_detail", "llava_bench_complex"}
    code, out, _ = cli("eval", "llava-bench", "summarize", path, "--json", tmp_path / "s.json")
    assert code == 0 and "llava_bench_detail" in out
    ours = json.loads((tmp_path / "s.json").read_text())
    assert set(ours) == set(theirs)
    for key, (relative, reference, model) in theirs.items():
        assert (ours[key]["relative"], ours[key]["reference"], ours[key]["model"]) == (relative, reference, model)
        assert ours[key]["failed"] == 0


def test_failed_reviews_are_counted_and_never_averaged(tmp_path):
    rows = make_reviews(5, n=30, failed=4)
    summary = llava_bench.summarize(write_lines(tmp_path / "r.jsonl", rows))
    good = [r["tuple"] for r in rows if r["tuple"] is not None]
    assert summary["all"]["count"] == 26 and summary["all"]["failed"] == 4
    assert sum(e["failed"] for k, e in summary.items() if k != "all") == 4
    ref, model = (round(sum(t[i] for t in good) / len(good), 3) for i in (0, 1))
    assert summary["all"]["model"] == round(model * 10, 1) and summary["all"]["relative"] == round(model / ref * 100, 1)


@pytest.mark.parametrize("reply, scores", [
    ("8 9\nbecause", [8.0, 9.0]), ("8, 9\n", [8.0, 9.0]), ("7.5,8\nx", [7.5, 8.0]), ("8  9 ", [8.0, 9.0]),
    ("8\n9", None), ("Assistant 1: 8, Assistant 2: 9", None), ("8 9 10", None), ("11 3", None), ("-1 -1", None),
    ("", None), ("eight nine", None), ("nan 3", None),
])
def test_score_line_rules(reply, scores):
    assert llava_bench.parse_scores(reply) == scores


def test_unparsable_judge_replies_are_asked_again_then_recorded_as_null(bench, our_answers, tmp_path, cli):
    questions = write_lines(tmp_path / "q.jsonl", lines(bench["questions"])[:2])
    args = ["eval", "llava-bench", "review", "--questions", questions, "--context", bench["caps"], "--reference",
            bench["reference"], "--answers", our_answers, "--rule", bench["rule"], "--model", "judge", "--output",
            tmp_path / "reviews.jsonl", "--workers", 1, "--retries", 2, "--backoff", "0.01"]

    question_0 = "[Question]\n" + lines(questions)[0]["text"] + "\n"

    def script(body, n):  # question 0: two bad replies, then scores; question 1: never scores
        first = question_0 in body["messages"][-1]["content"]
        return ("7 8\nok" if n == 2 else "Both are fine.") if first else "I prefer the first."

    with OpenAIStub(script) as stub:
        code, _, err = cli(*args, "--endpoint", stub.url)
        assert code == 0, err
        assert len(stub.requests) == 3 + 3
    reviews = lines(tmp_path / "reviews.jsonl")
    assert [r["tuple"] for r in reviews] == [[7.0, 8.0], None]
    assert reviews[1]["content"] == "I prefer the first." and "1 without two scores" in err
    summary = llava_bench.summarize(tmp_path / "reviews.jsonl")
    assert summary["all"]["count"] == 1 and summary["all"]["failed"] == 1
    with OpenAIStub(script) as stub:  # resume: both are already there
        assert cli(*args, "--endpoint", stub.url)[0] == 0 and stub.requests == []


def test_review_stops_at_a_dead_endpoint_keeps_its_reviews_and_resumes(bench, our_answers, tmp_path, cli):
    questions = write_lines(tmp_path / "q.jsonl", lines(bench["questions"])[:20])
    args = ["eval", "llava-bench", "review", "--questions", questions, "--context", bench["caps"], "--reference",
            bench["reference"], "--answers", our_answers, "--rule", bench["rule"], "--model", "judge", "--output",
            tmp_path / "reviews.jsonl", "--workers", 2, "--http-retries", 1, "--backoff", "0.01"]
    with OpenAIStub(lambda body, n: "6 7\nfine" if n < 5 else 502) as stub:
        code, _, err = cli(*args, "--endpoint", stub.url)
        assert code == 2 and "HTTP 502" in err
        assert len(stub.requests) <= 5 + 5 * 2  # queued questions are not sent (all of them: 5 + 15 x 2)
    kept = lines(tmp_path / "reviews.jsonl")
    assert 3 <= len(kept) <= 5 and [r["question_id"] for r in kept] == list(range(len(kept)))
    with OpenAIStub(lambda body, n: "6 7\nfine") as stub:
        assert cli(*args, "--endpoint", stub.url)[0] == 0
        assert len(stub.requests) == 20 - len(kept)
    reviews = lines(tmp_path / "reviews.jsonl")
    assert reviews[: len(kept)] == kept and [r["question_id"] for r in reviews] == list(range(20))


def test_review_bad_input_is_exit_2_before_any_request_and_keeps_the_output(bench, our_answers, tmp_path, cli):
    out = tmp_path / "reviews.jsonl"
    out.write_text('{"question_id": 99, "tuple": [1, 2]}\n')
    qs = lines(bench["questions"])[:3]
    bad_category = write_lines(tmp_path / "q1.jsonl", qs[:2] + [dict(qs[2], category="humor")])
    answers = open(our_answers).read().splitlines()
    broken_answers = tmp_path / "a.jsonl"
    broken_answers.write_text("\n".join(answers[:1] + ['{"question_id": 1, "text": "unterminated'] + answers[2:]))
    cases = [(["--questions", bad_category, "--answers", our_answers], "category 'humor' has no rule "
              "'llava_bench_humor'"),
             (["--questions", bench["questions"], "--answers", broken_answers], "a.jsonl line 2: not valid JSON")]
    with OpenAIStub(lambda body, n: "1 2") as stub:
        for extra, needle in cases:
            code, _, err = cli("eval", "llava-bench", "review", "--context", bench["caps"], "--reference",
                               bench["reference"], "--rule", bench["rule"], "--endpoint", stub.url, "--model", "j",
                               "--output", out, *extra)
            assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
        assert stub.requests == []
    assert out.read_text() == '{"question_id": 99, "tuple": [1, 2]}\n'


# ------------------------------------------------------------------------------------------------------
# ScienceQA score
# ------------------------------------------------------------------------------------------------------


def make_scienceqa(tmp_path, seed, n=260, drop=0.04):
    rng = random.Random(seed)
    subjects = ["natural science", "social science", "language science"]
    problems = {}
    for i in range(n):
        k = rng.randint(2, 5)
        problems[str(3 * i + 1)] = {
            "question": f"Which {rng.choice(WORDS)} is {rng.choice(WORDS)} in case {i}?",
            "choices": [f"{rng.choice(WORDS)} {j}" for j in range(k)], "answer": rng.randrange(k),
            "hint": rng.choice(["", "", f"Read the  text about the  {rng.choice(WORDS)}."]),
            "image": rng.choice([None, None, "image.png"]), "subject": rng.choice(subjects),
            "grade": f"grade{rng.randint(1, 12)}", "lecture": "", "solution": ""}
    pids = list(problems)
    splits = {"train": pids[: n // 5], "test": pids[n // 5:]}
    base = tmp_path / f"sqa{seed}"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps(splits))
    answers = []
    for pid in splits["test"]:
        p = problems[pid]
        if rng.random() < drop:
            continue  # no answer: counts as wrong
        letter = "ABCDE"[p["answer"] if rng.random() < 0.6 else rng.randrange(len(p["choices"]))]
        text = rng.choice([letter, letter, f"{letter}. {p['choices'][0]}", f"The answer is {letter}.",
                           f"Answer: The answer is {letter}. Because.", f"The answer is {letter}. The answer is A.",
                           f"({letter}) {p['choices'][0]}", letter.lower(), "E", "", f"{letter}.", "I think B",
                           f"{letter}.{p['choices'][0]}"])
        prompt = scienceqa.cqm_prompt(p) + "\n" + scienceqa.SINGLE_PRED_PROMPT
        answers.append({"question_id": pid, "prompt": ("<image>\n" if p["image"] else "") + prompt, "text": text,
                        "answer_id": f"x{pid}", "model_id": "m", "metadata": {}})
    return base, write_lines(base / "answers.jsonl", answers)


@pytest.mark.parametrize("seed, drop", [(0, 0.04), (1, 0.0)], ids=["some-unanswered", "all-answered"])
def test_score_gives_the_numbers_of_eval_science_qa(llava_original, tmp_path, cli, seed, drop):
    base, answers = make_scienceqa(tmp_path, seed, drop=drop)
    printed = run_script(os.path.join(llava_original, "eval", "eval_science_qa.py"), "--base-dir", base,
                         "--result-file", answers, "--output-file", base / "o1.json", "--output-result",
                         base / "o2.json", "--split", "test")
    theirs = json.loads((base / "o2.json").read_text())
    img = float(re.search(r"IMG-Accuracy: ([\d.]+)%", printed).group(1))
    code, out, err = cli("eval", "scienceqa", "score", "--problems", base / "problems.json", "--splits",
                         base / "pid_splits.json", "--split", "test", "--answers", answers, "--json", base / "s.json")
    assert code == 0, err
    ours = json.loads((base / "s.json").read_text())
    assert (ours["accuracy"], ours["correct"], ours["count"]) == (theirs["acc"], theirs["correct"], theirs["count"])
    problems = json.loads((base / "problems.json").read_text())
    split = json.loads((base / "pid_splits.json").read_text())["test"]
    assert ours["by"]["IMG"]["count"] == sum(1 for pid in split if problems[pid]["image"])
    if drop == 0:
        assert round(ours["by"]["IMG"]["accuracy"], 2) == img
    else:  # eval_science_qa reads IMG from the answer's prompt: an unanswered problem drops out of its IMG
        assert ours["missing"] > 0 and round(ours["by"]["IMG"]["accuracy"], 2) < img
    failed = sum(1 for pid, idx in theirs["results"].items() if idx == -1)
    assert ours["failed_to_parse"] + ours["missing"] <= failed  # -1 also holds letters beyond the choices
    assert ours["failed_to_parse"] > 0
    assert f"{ours['correct']}/{ours['count']} correct" in out


def test_score_columns_follow_scienceqa(tmp_path):
    rows = [  # (subject, grade, hint, image, answer index, prediction)
        ("natural science", "grade2", "", "image.png", 0, "A"),
        ("natural science", "grade8", "Some text.", None, 1, "A"),
        ("social science", "grade5", "Text.", "image.png", 2, "The answer is C."),
        ("language science", "grade11", "", None, 0, "A. yes"),
        ("language science", "grade1", "", None, 1, "nonsense"),
        ("social science", "grade12", "", "image.png", 1, "B"),
    ]
    problems = {str(i): {"question": "q", "choices": ["x", "y", "z"], "answer": a, "hint": h, "image": im,
                         "subject": s, "grade": g} for i, (s, g, h, im, a, _) in enumerate(rows)}
    (tmp_path / "p.json").write_text(json.dumps(problems))
    (tmp_path / "s.json").write_text(json.dumps({"test": list(problems)}))
    answers = write_lines(tmp_path / "a.jsonl", [{"question_id": str(i), "text": r[5]} for i, r in enumerate(rows)])
    result = scienceqa.score(problems=str(tmp_path / "p.json"), splits=str(tmp_path / "s.json"), split="test",
                             answers=answers)
    by = {k: (v["correct"], v["count"]) for k, v in result["by"].items()}
    assert by == {"NAT": (1, 2), "SOC": (2, 2), "LAN": (1, 2), "TXT": (1, 2), "IMG": (3, 3), "NO": (1, 2),
                  "G1-6": (2, 3), "G7-12": (2, 3)}
    assert (result["correct"], result["count"], result["failed_to_parse"]) == (4, 6, 1)
    assert result["accuracy"] == 4 / 6 * 100


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("E", "E"), ("B. because", "B"), ("B.because", "FAILED"), ("The answer is C.", "C"),
    ("So. The answer is D. Done", "D"), ("The answer is C. The answer is D.", "FAILED"), ("the answer is C.", "FAILED"),
    ("(A) x", "FAILED"), ("a", "FAILED"), ("", "FAILED"), ("The answer is AB", "A"),
])
def test_answer_extraction_is_eval_science_qa_s(text, letter):
    assert scienceqa.extract_letter(text) == letter


def test_cqm_prompt_is_llavas():
    problem = {"question": "Which is  a mammal?", "choices": ["cat", "trout"], "hint": "", "image": None}
    assert scienceqa.cqm_prompt(problem) == "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) trout"
    problem["hint"] = "Animals live in many places."
    assert scienceqa.cqm_prompt(problem).startswith("Context: Animals live in many places.\nQuestion: ")


# ------------------------------------------------------------------------------------------------------
# Answering with a model
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from llava_fast.presets import random_model

    return random_model("tiny", device="cpu", dtype="float32")


@pytest.fixture
def cli_model(tiny_model, monkeypatch):
    """The CLI's model loader hands out the module's tiny model (built once: ~10 s on 2 busy cores)."""
    import llava_fast.cli

    loads = []
    monkeypatch.setattr(llava_fast.cli, "_load", lambda args: loads.append(args.preset) or tiny_model)
    return loads


def test_llava_bench_answer_is_batched_resumable_and_equals_one_by_one(reference_dir, bench, tmp_path, cli,
                                                                       tiny_model, cli_model):
    questions = lines(bench["questions"])[2:6]
    images = tmp_path / "images"
    images.mkdir()
    sources = ["waterview.jpg", "extreme_ironing.jpg", "llama_cute.jpg"]
    for k, name in enumerate(sorted({q["image"] for q in questions})):
        shutil.copy(os.path.join(reference_dir, "images", sources[k % 3]), images / name)
    qfile = write_lines(tmp_path / "q.jsonl", questions)
    out = tmp_path / "answers.jsonl"
    args = ["eval", "llava-bench", "answer", "--questions", qfile, "--images", images, "--output", out,
            "--batch-size", 3, "--max-new-tokens", 2, "--device", "cpu", "--dtype", "float32"]
    code, _, err = cli(*args)
    assert code == 0, err
    answers = lines(out)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for a, q in zip(answers, questions):
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["prompt"] == q["text"] and a["model_id"] == "random-tiny"
        alone = tiny_model.generate("<image>\n" + q["text"], str(images / q["image"]), max_new_tokens=2)
        assert a["text"] == alone.strip()
    assert len({a["answer_id"] for a in answers}) == 4
    out.write_text("".join(json.dumps(a) + "\n" for a in answers[:3]))  # as if stopped after 3
    assert cli(*args)[0] == 0
    again = lines(out)
    assert again[:3] == answers[:3] and again[3]["text"] == answers[3]["text"]
    assert cli(*args)[0] == 0 and lines(out) == again  # nothing left to do
    assert cli_model == ["tiny", "tiny"]  # ... and no model was loaded for it
    os.remove(images / questions[3]["image"])
    out.write_text("".join(json.dumps(a) + "\n" for a in again[:2]))
    code, _, err = cli(*args)
    assert code == 2 and questions[3]["image"] in err and len(err.strip().splitlines()) == 1
    assert len(lines(out)) == 2 and len(cli_model) == 2  # kept, nothing appended, no model loaded
    shutil.copy(os.path.join(reference_dir, "images", "waterview.jpg"), images / questions[3]["image"])
    for bad, needle in ((["--template", "bogus"], "unknown chat template 'bogus'"),
                        (["--temperature", "nan"], "temperature must be a finite number"),
                        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0")):
        code, _, err = cli(*args, *bad)  # the settings every batch uses: refused before the model loads
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert len(lines(out)) == 2 and len(cli_model) == 2


def test_scienceqa_answer_writes_llavas_prompts_and_scores(reference_dir, tmp_path, cli, tiny_model, cli_model):
    problems = {
        "7": {"question": "Which animal is shown?", "choices": ["cat", "dog", "fish"], "answer": 0,
              "hint": "Look at the picture.", "image": "image.png", "subject": "natural science", "grade": "grade3"},
        "9": {"question": "Which word rhymes with cat?", "choices": ["hat", "dog"], "answer": 0, "hint": "",
              "image": None, "subject": "language science", "grade": "grade2"},
        "12": {"question": "Which city is marked?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 3,
               "hint": "", "image": "image.png", "subject": "social science", "grade": "grade9"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["7", "9", "12"], "val": []}))
    for pid, src in (("7", "waterview.jpg"), ("12", "llama_cute.jpg")):
        os.makedirs(tmp_path / "test" / pid)
        shutil.copy(os.path.join(reference_dir, "images", src), tmp_path / "test" / pid / "image.png")
    out = tmp_path / "answers.jsonl"
    common = ["--problems", tmp_path / "problems.json", "--splits", tmp_path / "pid_splits.json"]
    code, _, err = cli("eval", "scienceqa", "answer", *common, "--images", tmp_path / "test", "--output", out,
                       "--batch-size", 3, "--max-new-tokens", 2, "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    answers = {a["question_id"]: a for a in lines(out)}
    assert answers["9"]["prompt"] == ("Context: N/A\nQuestion: Which word rhymes with cat?\nOptions: (A) hat (B) dog"
                                      "\nAnswer with the option's letter from the given choices directly.")
    assert answers["7"]["prompt"].startswith("<image>\nContext: Look at the picture.\nQuestion: Which animal")
    assert answers["12"]["prompt"].startswith("<image>\n")
    for pid, a in answers.items():
        image = str(tmp_path / "test" / pid / "image.png") if problems[pid]["image"] else None
        assert a["text"] == tiny_model.generate(a["prompt"], image, max_new_tokens=2).strip()
    code, out_text, _ = cli("eval", "scienceqa", "score", *common, "--answers", out)
    assert code == 0 and "/3 correct" in out_text
    code, _, err = cli("eval", "scienceqa", "score", *common, "--split", "minitest", "--answers", out)
    assert code == 2 and "'minitest'" in err and "test, val" in err
