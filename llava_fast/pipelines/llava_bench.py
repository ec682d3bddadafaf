"""LLaVA-Bench (Liu et al. 2023, Section 5.1): the model answers, a text-only judge reviews each answer
beside a reference answer, and the relative score is the ratio of their means.

answer:    questions JSONL {"question_id", "image", "text", "category"} + images -> answers JSONL (LLaVA's
           answer format; see answering.py).
review:    questions + context JSONL (captions per image: "caption" as in eval_gpt_review_bench, or
           "captions" as in caps_boxes_coco2014_val_80.jsonl) + reference answers + our answers + rule.json
           -> reviews JSONL {"id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple"},
           exactly the user message, system message and temperature (0.2) of haotian-liu/LLaVA
           llava/eval/eval_gpt_review_bench.py.
summarize: reviews JSONL -> per category and "all": relative score (model mean / reference mean x 100, one
           decimal), reference mean x 10, model mean x 10, computed as llava/eval/summarize_gpt_review.py does
           (numpy means rounded to 3 decimals first), plus the number of reviews used and failed.

Differences from the original, on purpose: answers are matched to questions by question_id, not by line;
a reply whose first line is not two scores (0-10) is asked again up to --retries times and then recorded with
"tuple": null, which summarize counts as failed and leaves out of the means (the original records [-1, -1]
and averages it in); the scores may be separated by any whitespace or commas.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llava_fast.errors import InputError
from llava_fast.pipelines.answering import Item, answer_items
from llava_fast.pipelines.records import JsonlAppender, done_keys, read_json, read_jsonl

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPERATURE = 0.2


def read_questions(path):
    questions = []
    for lineno, q in read_jsonl(path, "--questions"):
        for field in ("question_id", "text"):
            if field not in q:
                raise InputError(f"--questions {path} line {lineno}: no '{field}'")
        questions.append((lineno, q))
    return questions


# ------------------------------------------------------------------------------------------------------
# answer
# ------------------------------------------------------------------------------------------------------


def answer(get_model, *, questions, images, output, model_id, batch_size=8, max_new_tokens=1024, temperature=0.0,
           template=None, log=print):
    """As llava/eval/model_vqa.py: the question text, the image first ("<image>\\n" + text)."""
    items = []
    for lineno, q in read_questions(questions):
        if not isinstance(q.get("image"), str):
            raise InputError(f"--questions {questions} line {lineno}: no 'image'")
        items.append(Item(q["question_id"], "<image>\n" + q["text"], q["text"], os.path.join(images, q["image"])))
    return answer_items(get_model, items, output, model_id=model_id, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, temperature=temperature, template=template, log=log)


# ------------------------------------------------------------------------------------------------------
# review
# ------------------------------------------------------------------------------------------------------


def review_content(context, question, answer1, answer2, rule) -> str:
    """The judge's user message, character for character as eval_gpt_review_bench.py builds it."""
    role, prompt = rule["role"], rule["prompt"]
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{prompt}\n\n")


def review_messages(content):
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_scores(reply):
    """The two scores on the reply's first line ("8 9", "8, 9", "8.5,9"), or None."""
    fields = reply.split("\n")[0].replace(",", " ").split()
    if len(fields) != 2:
        return None
    try:
        scores = [float(f) for f in fields]
    except ValueError:
        return None
    if not all(math.isfinite(s) and 0 <= s <= 10 for s in scores):
        return None
    return scores


def _context_text(lineno, inst, path):
    caption = inst.get("caption", inst.get("captions"))
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return "\n".join(caption)
    if isinstance(caption, str):
        return caption
    raise InputError(f"--context {path} line {lineno}: no 'caption' (a string or a list of strings)")


def _by_question_id(path, flag):
    answers = {}
    for lineno, a in read_jsonl(path, flag):
        if "question_id" not in a or not isinstance(a.get("text"), str):
            raise InputError(f"{flag} {path} line {lineno}: an answer needs 'question_id' and 'text'")
        answers[a["question_id"]] = a
    return answers


def review(client, *, questions, context, reference, answers, rule, output, workers=4, retries=3,
           max_tokens=1024, log=print):
    """Judge every question not yet in `output`; returns {"reviewed", "failed", "skipped"}."""
    rules = read_json(rule, "--rule")
    if not isinstance(rules, dict):
        raise InputError(f"--rule {rule}: expected a JSON object of rules")
    contexts = {}
    for lineno, inst in read_jsonl(context, "--context"):
        if not isinstance(inst.get("image"), str):
            raise InputError(f"--context {context} line {lineno}: no 'image'")
        contexts[inst["image"]] = _context_text(lineno, inst, context)
    ref, ours = _by_question_id(reference, "--reference"), _by_question_id(answers, "--answers")

    jobs = []  # everything is checked before the first request, so a bad input costs no judge calls
    for index, (lineno, q) in enumerate(read_questions(questions)):
        where = f"--questions {questions} line {lineno}"
        category = "llava_bench_" + str(q.get("category"))
        if category not in rules:
            raise InputError(f"{where}: category {q.get('category')!r} has no rule '{category}' in {rule}")
        rule_entry = rules[category]
        if not isinstance(rule_entry, dict) or "role" not in rule_entry or "prompt" not in rule_entry:
            raise InputError(f"--rule {rule}: '{category}' needs 'role' and 'prompt'")
        if q.get("image") not in contexts:
            raise InputError(f"{where}: image {q.get('image')!r} has no captions in --context {context}")
        qid = q["question_id"]
        if qid not in ref:
            raise InputError(f"--reference {reference}: no answer to question_id {qid!r}")
        if qid not in ours:
            raise InputError(f"--answers {answers}: no answer to question_id {qid!r}")
        a1, a2 = ref[qid], ours[qid]
        record = {"id": index + 1, "question_id": qid, "answer1_id": a1.get("answer_id", qid),
                  "answer2_id": a2.get("answer_id", qid), "category": category}
        jobs.append((record, review_content(contexts[q["image"]], q["text"], a1["text"], a2["text"], rule_entry)))

    done = done_keys(output, "question_id", "--output (resuming)")
    todo = [(record, content) for record, content in jobs if record["question_id"] not in done]
    log(f"review: {len(jobs)} questions, {len(jobs) - len(todo)} already in {output}, {len(todo)} to judge")

    def judge(job):
        record, content = job
        for _ in range(retries + 1):
            reply = client.chat(review_messages(content), temperature=JUDGE_TEMPERATURE, max_tokens=max_tokens)
            scores = parse_scores(reply.text)
            if scores is not None:
                break
        return dict(record, content=reply.text, tuple=scores)

    failed = 0
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with JsonlAppender(output) as out:
            for result in pool.map(judge, todo):  # in question order; an EndpointError stops here, earlier kept
                out.write(result)
                failed += result["tuple"] is None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error, the queued questions are not sent
    log(f"review: {len(todo)} reviews -> {output}" + (f"; {failed} without two scores after {retries} retries "
                                                      "(recorded with tuple null)" if failed else ""))
    return {"reviewed": len(todo), "failed": failed, "skipped": len(jobs) - len(todo)}


# ------------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------------


def summarize(reviews_path):
    """{category: {"relative", "reference", "model", "count", "failed"}} plus "all"; categories sorted."""
    scores, failed = {}, {}
    for lineno, r in read_jsonl(reviews_path, "reviews"):
        if "tuple" not in r:
            raise InputError(f"reviews {reviews_path} line {lineno}: no 'tuple'")
        keys = ["all"] + ([r["category"]] if "category" in r else [])
        t = r["tuple"]
        ok = isinstance(t, list) and len(t) == 2 and all(isinstance(s, (int, float)) and s >= 0 for s in t)
        for key in keys:
            scores.setdefault(key, [])
            failed[key] = failed.get(key, 0) + (not ok)
            if ok:
                scores[key].append(t)
    summary = {}
    for key in sorted(scores):
        entry = {"relative": None, "reference": None, "model": None, "count": len(scores[key]),
                 "failed": failed[key]}
        if scores[key]:
            stats = [round(x, 3) for x in np.asarray(scores[key]).mean(0).tolist()]  # as summarize_gpt_review
            entry["relative"] = round(stats[1] / stats[0] * 100, 1) if stats[0] else None
            entry["reference"], entry["model"] = round(stats[0] * 10, 1), round(stats[1] * 10, 1)
        summary[key] = entry
    return summary


def format_summary(summary) -> str:
    lines = [f"{'category':<22} {'relative':>8} {'reference':>9} {'model':>6} {'count':>6} {'failed':>6}"]
    for key, e in summary.items():
        cells = ["-" if e[k] is None else f"{e[k]:.1f}" for k in ("relative", "reference", "model")]
        lines.append(f"{key:<22} {cells[0]:>8} {cells[1]:>9} {cells[2]:>6} {e['count']:>6} {e['failed']:>6}")
    return "\n".join(lines)


def write_summary_json(path, summary):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
