"""The paper's instruction data (Liu et al., "Visual Instruction Tuning", Section 3): captions and boxes ->
a language-only chat model -> LLaVA training records; and stage 1's naive expansion of (image, caption) pairs.

In (`make-data instruct`): one JSON object per line, {"id", "image", "captions": [str], "instances":
[{"category", "bbox": [x1, y1, x2, y2] normalised to 0..1}]} (haotian-liu/LLaVA's
llava/eval/table/caps_boxes_coco2014_val_80.jsonl format), a prompts directory (the paper's, packaged in
`prompts/`), an OpenAI-compatible endpoint.
Out: a JSON list of LLaVA records {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}
(what `llava-fast train --data` reads), rewritten atomically as replies arrive; replies that cannot be parsed
go to OUTPUT.rejected.jsonl with the reason.

Messages, as the paper's Appendix (Table 10) builds them: the type's system message; each few-shot pair as a
user turn (NNN_caps.txt) and an assistant turn (NNN_conv.txt); the record's context as the last user turn:
its captions one per line, then (for types whose few-shot inputs carry boxes: detail, complex) a blank line
and one `category: [x1, y1, x2, y2]` line per box, numbers as in the few-shot inputs (3 decimals at most).

Replies -> turns:
- conversation: `Question:` / `===` / `Answer:` blocks (the layout of the few-shot replies) -> alternating
  human / gpt turns, at least one pair;
- complex: the same layout with exactly one pair;
- detail: the reply is the description; the question is drawn from DETAILED_DESCRIPTION_INSTRUCTIONS.
A reply is rejected (never dropped silently) if it is empty, was cut at the token limit, or does not follow
its layout. `<image>` goes into the first human turn, before or after its text (the paper's Eq. 2: randomly
[X_q, X_v] or [X_v, X_q]). Every random choice is drawn from (seed, record id), so a record's output does not
depend on --workers or on resuming.
"""

from __future__ import annotations

import glob
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from llava_fast.errors import InputError
from llava_fast.pipelines.records import read_json, read_jsonl, read_table, write_json_atomic, write_jsonl_atomic

PROMPTS_DIR = os.path.join(os.path.dirname(__file__), "prompts")
TYPES = {"conversation": "conversation", "detail": "detail_description", "complex": "complex_reasoning"}
IMAGE_MARKER = "<image>"

# The paper's Appendix, Table 9 ("The list of instructions for detailed image description"); the same 16
# strings as `detail_describe_instructions` in haotian-liu/LLaVA's first release (commit 8959d5c,
# llava/eval/model_vqa.py). Apache-2.0.
DETAILED_DESCRIPTION_INSTRUCTIONS = [
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
]

# The paper's Appendix, Table 8 ("The list of instructions for brief image description"), in the wording of
# the released stage-1 data (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json questions). haotian-liu/LLaVA's
# first release (commit 8959d5c, llava/eval/model_vqa.py, `concise_describe_instructions`) has an earlier
# wording of four of them ("Describe the following image concisely.", "... of the following image.",
# "... of the photo below.", "... of the following picture.").
BRIEF_DESCRIPTION_INSTRUCTIONS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]

_BOX_LINE = re.compile(r"^[^:\n]+: \[-?[\d.]+, -?[\d.]+, -?[\d.]+, -?[\d.]+\]$", re.M)
_SEPARATOR = re.compile(r"^\s*===\s*$", re.M)
_LABEL = re.compile(r"^\s*(Question|Answer)\s*:\s*", re.I)


class RejectedReply(Exception):
    """A reply that does not follow its type's layout; the message is the reason recorded."""


# ------------------------------------------------------------------------------------------------------
# Prompts and messages
# ------------------------------------------------------------------------------------------------------


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_prompts(prompts_dir, kind):
    """(system message, [(few-shot input, few-shot reply), ...], uses_boxes) of one type's directory."""
    if kind not in TYPES:
        raise InputError(f"--type {kind!r}: expected one of {', '.join(TYPES)}")
    directory = os.path.join(prompts_dir or PROMPTS_DIR, TYPES[kind])
    system_path = os.path.join(directory, "system_message.txt")
    if not os.path.isfile(system_path):
        raise InputError(f"--prompts {prompts_dir}: no {TYPES[kind]}/system_message.txt (expected the layout of "
                         "haotian-liu/LLaVA playground/data/prompts)")
    examples = []
    for caps in sorted(glob.glob(os.path.join(directory, "*_caps.txt"))):
        conv = caps[: -len("_caps.txt")] + "_conv.txt"
        if not os.path.isfile(conv):
            raise InputError(f"--prompts: {caps} has no matching {os.path.basename(conv)}")
        examples.append((_read_text(caps), _read_text(conv)))
    uses_boxes = any(_BOX_LINE.search(caps) for caps, _ in examples)
    return _read_text(system_path), examples, uses_boxes


def _number(value):
    return repr(round(float(value), 3))


def format_context(record, uses_boxes) -> str:
    """The record as the few-shot inputs are written: captions one per line; then a blank line and one
    `category: [x1, y1, x2, y2]` line per box when the type uses boxes (and the record has any)."""
    text = "\n".join(record["captions"])
    if uses_boxes and record.get("instances"):
        boxes = [f"{inst['category']}: [{', '.join(_number(v) for v in inst['bbox'])}]"
                 for inst in record["instances"]]
        text += "\n\n" + "\n".join(boxes)
    return text


def build_messages(system_message, examples, context):
    messages = [{"role": "system", "content": system_message}]
    for caps, conv in examples:
        messages.append({"role": "user", "content": caps})
        messages.append({"role": "assistant", "content": conv})
    messages.append({"role": "user", "content": context})
    return messages


def check_captions_boxes(lineno, obj, path):
    where = f"--captions-boxes {path} line {lineno}"
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
        raise InputError(f"{where}: 'id' must be a string or an integer")
    if not isinstance(obj.get("image"), str):
        raise InputError(f"{where}: 'image' must be a file name")
    captions = obj.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise InputError(f"{where}: 'captions' must be a non-empty list of strings")
    for inst in obj.get("instances") or []:
        bbox = inst.get("bbox") if isinstance(inst, dict) else None
        if (not isinstance(inst, dict) or not isinstance(inst.get("category"), str) or not isinstance(bbox, list)
                or len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise InputError(f"{where}: each instance needs a 'category' and a 'bbox' of 4 numbers")


# ------------------------------------------------------------------------------------------------------
# Replies -> conversations
# ------------------------------------------------------------------------------------------------------


def parse_qa_blocks(reply):
    """`Question:\\n...\\n===\\nAnswer:\\n...` (blocks separated by lines of '===') -> [(question, answer), ...].
    Raises RejectedReply with the reason when the reply does not have that layout."""
    blocks = [b.strip() for b in _SEPARATOR.split(reply)]
    blocks = [b for b in blocks if b]
    if not blocks:
        raise RejectedReply("empty reply")
    turns = []
    for index, block in enumerate(blocks):
        match = _LABEL.match(block)
        if match is None:
            raise RejectedReply(f"block {index + 1} starts with neither 'Question:' nor 'Answer:'")
        label = match.group(1).capitalize()
        text = block[match.end():].strip()
        if not text:
            raise RejectedReply(f"block {index + 1} ('{label}:') is empty")
        expected = "Question" if index % 2 == 0 else "Answer"
        if label != expected:
            raise RejectedReply(f"block {index + 1} is {label!r} where {expected!r} was expected "
                                "(questions and answers must alternate)")
        turns.append(text)
    if len(turns) % 2:
        raise RejectedReply("the last question has no answer")
    return list(zip(turns[0::2], turns[1::2]))


def place_image(question, rng):
    return f"{IMAGE_MARKER}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_MARKER}"


def conversations_from_pairs(pairs, rng):
    conversations = []
    for index, (question, answer) in enumerate(pairs):
        value = place_image(question, rng) if index == 0 else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return conversations


def record_rng(seed, kind, record_id):
    return random.Random(f"{seed}:{kind}:{record_id}")


def reply_to_record(kind, record, reply, finish_reason, seed):
    """The LLaVA training record of one reply, or RejectedReply."""
    if finish_reason == "length":
        raise RejectedReply("the reply was cut at the token limit (finish_reason 'length')")
    if not reply.strip():
        raise RejectedReply("empty reply")
    rng = record_rng(seed, kind, record["id"])
    if kind == "detail":
        if _LABEL.match(reply) or _SEPARATOR.search(reply):
            raise RejectedReply("a detailed description came back in the Question/Answer layout")
        pairs = [(rng.choice(DETAILED_DESCRIPTION_INSTRUCTIONS), reply.strip())]
    else:
        pairs = parse_qa_blocks(reply)
        if kind == "complex" and len(pairs) != 1:
            raise RejectedReply(f"expected one question-answer pair, got {len(pairs)}")
    return {"id": record["id"], "image": record["image"], "conversations": conversations_from_pairs(pairs, rng)}


# ------------------------------------------------------------------------------------------------------
# make-data instruct
# ------------------------------------------------------------------------------------------------------


def rejected_path(output):
    return os.path.splitext(output)[0] + ".rejected.jsonl"


def _existing_records(output):
    if not os.path.exists(output):
        return []
    records = read_json(output, InputError, "--output (resuming)")
    if not isinstance(records, list):
        raise InputError(f"--output {output} exists and is not a JSON list of records; move it away or pick "
                         "another --output")
    return records


def make_instruct(client, *, kind, captions_boxes, output, prompts=None, workers=4, seed=0, limit=None,
                  temperature=None, max_tokens=None, save_every_s=5.0, log=print):
    """Run the pipeline; returns {"written", "skipped", "rejected"} for this run."""
    system_message, examples, uses_boxes = load_prompts(prompts, kind)
    rows = read_jsonl(captions_boxes, "--captions-boxes")
    for lineno, obj in rows:
        check_captions_boxes(lineno, obj, captions_boxes)
    inputs = [obj for _, obj in rows][: limit if limit is not None else None]

    done = {r.get("id"): r for r in _existing_records(output) if isinstance(r, dict)}
    reject_file = rejected_path(output)
    old_rejected = {}
    if os.path.exists(reject_file):
        old_rejected = {r.get("id"): r for _, r in read_jsonl(reject_file, "rejected file (resuming)")}
    todo = [obj for obj in inputs if obj["id"] not in done]
    order = {obj["id"]: i for i, obj in enumerate(inputs)}
    new_rejected = {}
    lock = threading.Lock()
    last_save = [time.monotonic()]

    def save():
        records = sorted(done.values(), key=lambda r: order.get(r.get("id"), len(order)))
        write_json_atomic(output, records)
        rejected = {k: v for k, v in old_rejected.items() if k not in done and k not in new_rejected}
        rejected.update(new_rejected)
        if rejected or os.path.exists(reject_file):
            write_jsonl_atomic(reject_file, rejected.values())

    def work(record):
        context = format_context(record, uses_boxes)
        reply = client.chat(build_messages(system_message, examples, context), temperature=temperature,
                            max_tokens=max_tokens)
        try:
            result = reply_to_record(kind, record, reply.text, reply.finish_reason, seed)
        except RejectedReply as e:
            result = {"id": record["id"], "image": record["image"], "type": kind, "reason": str(e),
                      "finish_reason": reply.finish_reason, "reply": reply.text}
            with lock:
                new_rejected[record["id"]] = result
            return
        with lock:
            done[record["id"]] = result
            if time.monotonic() - last_save[0] > save_every_s:
                save()
                last_save[0] = time.monotonic()

    log(f"make-data instruct: {len(inputs)} records, {len(inputs) - len(todo)} already in {output}, "
        f"{len(todo)} to generate ({kind}, {len(examples)} few-shot examples, {workers} workers)")
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(work, record) for record in todo]
        for future in futures:
            future.result()  # the first EndpointError stops the run; finally saves what is done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        with lock:
            save()
    stats = {"written": len(todo) - len(new_rejected), "skipped": len(inputs) - len(todo),
             "rejected": len(new_rejected)}
    log(f"make-data instruct: {stats['written']} new records -> {output}; {stats['rejected']} replies could not "
        f"be parsed" + (f" -> {reject_file}" if new_rejected else ""))
    return stats


# ------------------------------------------------------------------------------------------------------
# make-data captions (stage 1's naive expansion)
# ------------------------------------------------------------------------------------------------------


def _pair_of(lineno, row, path):
    """(id, image, caption) of a JSONL/CSV row ({image, caption[, id]}) or of a LLaVA record whose gpt turn is
    the caption (LLaVA's CC-595K chat.json)."""
    where = f"--input {path} line {lineno}"
    if "conversations" in row:
        replies = [t.get("value") for t in row["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
        caption = replies[0] if replies else None
    else:
        caption = row.get("caption")
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise InputError(f"{where}: no 'image'")
    if not isinstance(caption, str) or not caption.strip():
        raise InputError(f"{where}: no 'caption'")
    record_id = row.get("id") or os.path.splitext(os.path.basename(image))[0]
    return str(record_id), image, caption.strip()


def make_captions(*, input_path, output, seed=0, limit=None, log=print):
    rows = read_table(input_path, "--input")[: limit if limit is not None else None]
    if not rows:
        raise InputError(f"--input {input_path}: no (image, caption) pairs in it")
    records = []
    for lineno, row in rows:
        record_id, image, caption = _pair_of(lineno, row, input_path)
        rng = record_rng(seed, "captions", record_id)
        question = place_image(rng.choice(BRIEF_DESCRIPTION_INSTRUCTIONS), rng)
        records.append({"id": record_id, "image": image, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": caption}]})
    write_json_atomic(output, records)
    log(f"make-data captions: {len(records)} records -> {output}")
    return len(records)
