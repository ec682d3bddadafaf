"""ScienceQA (Lu et al. 2022) as LLaVA evaluates it: multiple-choice science questions, some with an image.

answer: ScienceQA's release (problems.json: {pid: {"question", "choices", "answer", "hint", "image",
        "subject", "grade", ...}}, pid_splits.json: {split: [pid, ...]}, images at DIR/<pid>/<image>) ->
        answers JSONL in LLaVA's format (answering.py), greedy. The prompt is LLaVA's "CQM-A" question
        (haotian-liu/LLaVA scripts/convert_sqa_to_llava.py + convert_sqa_to_llava_base_prompt.py, no caption)
        as llava/eval/model_vqa_science.py --single-pred-prompt asks it:
            Context: {hint, or "N/A"}
            Question: {question}
            Options: (A) {choice} (B) {choice} ...
            Answer with the option's letter from the given choices directly.
        with "<image>\\n" in front when the problem has an image; the recorded "prompt" carries that marker too
        (eval_science_qa.py reads its IMG accuracy from it).
score:  problems + split + answers -> accuracy as llava/eval/eval_science_qa.py extracts answers (the text is
        a bare letter of A-E; or starts with a letter and ". "; or has exactly one "The answer is X." match;
        else FAILED; a letter beyond the problem's choices is wrong), by the paper's columns: subject
        NAT/SOC/LAN, context TXT (has a hint) / IMG (has an image) / NO (neither), grade G1-6 / G7-12 (the
        definitions of ScienceQA's tools/evaluate_acc.py). IMG counts every problem with an image;
        eval_science_qa.py's "IMG-Accuracy" looks for "<image>" in each answer's prompt instead, so a problem
        left unanswered drops out of its IMG figure (the two agree when every problem has an answer).
"""

from __future__ import annotations

import os
import re

from llava_fast.errors import InputError
from llava_fast.pipelines.answering import Item, answer_items
from llava_fast.pipelines.records import read_json, read_jsonl

OPTIONS = ["A", "B", "C", "D", "E"]
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # eval_science_qa.py's pattern, its unescaped '.' included
COLUMNS = {
    "NAT": lambda p: p.get("subject") == "natural science",
    "SOC": lambda p: p.get("subject") == "social science",
    "LAN": lambda p: p.get("subject") == "language science",
    "TXT": lambda p: bool(p.get("hint")),
    "IMG": lambda p: bool(p.get("image")),
    "NO": lambda p: not p.get("hint") and not p.get("image"),
    "G1-6": lambda p: p.get("grade") in {f"grade{g}" for g in range(1, 7)},
    "G7-12": lambda p: p.get("grade") in {f"grade{g}" for g in range(7, 13)},
}


def load_split(problems_path, splits_path, split):
    """[(pid, problem), ...] of one split, in pid_splits.json's order."""
    problems = read_json(problems_path, "--problems")
    splits = read_json(splits_path, "--splits")
    if not isinstance(problems, dict):
        raise InputError(f"--problems {problems_path}: expected ScienceQA's problems.json (an object of problems)")
    if not isinstance(splits, dict) or split not in splits:
        names = ", ".join(splits) if isinstance(splits, dict) else "none"
        raise InputError(f"--split {split!r}: not in {splits_path} (splits: {names})")
    if not isinstance(splits[split], list) or not all(isinstance(pid, str) for pid in splits[split]):
        raise InputError(f"--splits {splits_path}: split {split!r} must be a list of problem ids (strings)")
    out = []
    for pid in splits[split]:
        problem = problems.get(pid)
        if not isinstance(problem, dict):
            raise InputError(f"--problems {problems_path}: no problem {pid!r} (listed in split {split!r})")
        choices, answer = problem.get("choices"), problem.get("answer")
        if (not isinstance(problem.get("question"), str) or not isinstance(choices, list)
                or not 2 <= len(choices) <= len(OPTIONS) or not isinstance(answer, int)
                or not 0 <= answer < len(choices)):
            raise InputError(f"--problems {problems_path}: problem {pid!r} needs 'question', 2-5 'choices' and "
                             "an 'answer' index")
        out.append((pid, problem))
    return out


def cqm_prompt(problem) -> str:
    """LLaVA's CQM-A input (double spaces collapsed once and stripped, as create_one_example_chatbot does)."""
    context = (problem.get("hint") or "").strip() or "N/A"
    choices = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {choices}\n"
    return text.replace("  ", " ").strip()


def answer(get_model, *, problems, splits, split, images, output, model_id, batch_size=8, max_new_tokens=128,
           template=None, log=print):
    items = []
    for pid, problem in load_split(problems, splits, split):
        question = cqm_prompt(problem) + "\n" + SINGLE_PRED_PROMPT
        if problem.get("image"):
            image = os.path.join(images, pid, problem["image"])
            items.append(Item(pid, "<image>\n" + question, "<image>\n" + question, image))
        else:
            items.append(Item(pid, question, question, None))
    return answer_items(get_model, items, output, model_id=model_id, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, temperature=0.0, template=template, log=log)


def extract_letter(text) -> str:
    """eval_science_qa.py's rule: the letter, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score(*, problems, splits, split, answers):
    """{"accuracy", "correct", "count", "failed_to_parse", "missing", "by": {column: {"accuracy", "correct",
    "count"}}}; accuracy in percent (None for an empty column). A problem without an answer counts as
    wrong and as missing, as eval_science_qa.py counts it."""
    predictions = {}
    for lineno, a in read_jsonl(answers, "--answers"):
        if "question_id" not in a or not isinstance(a.get("text"), str):
            raise InputError(f"--answers {answers} line {lineno}: an answer needs 'question_id' and 'text'")
        predictions[str(a["question_id"])] = a["text"]
    split_problems = load_split(problems, splits, split)
    correct = failed = missing = 0
    by = {name: [0, 0] for name in COLUMNS}
    for pid, problem in split_problems:
        text = predictions.get(str(pid))
        missing += text is None
        letter = extract_letter("FAILED" if text is None else text)
        failed += letter == "FAILED" and text is not None
        index = OPTIONS.index(letter) if letter in OPTIONS[: len(problem["choices"])] else -1
        right = index == problem["answer"]
        correct += right
        for name, member in COLUMNS.items():
            if member(problem):
                by[name][0] += right
                by[name][1] += 1
    count = len(split_problems)
    return {"accuracy": correct / count * 100 if count else None, "correct": correct, "count": count,
            "failed_to_parse": failed, "missing": missing,
            "by": {name: {"accuracy": c / n * 100 if n else None, "correct": c, "count": n}
                   for name, (c, n) in by.items()}}


def format_score(result) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.2f}"

    head = ["Avg"] + list(COLUMNS)
    values = [pct(result["accuracy"])] + [pct(result["by"][c]["accuracy"]) for c in COLUMNS]
    return ("  ".join(f"{h:>6}" for h in head) + "\n" + "  ".join(f"{v:>6}" for v in values) + "\n"
            f"{result['correct']}/{result['count']} correct; {result['failed_to_parse']} answers without a "
            f"letter; {result['missing']} problems without an answer")
