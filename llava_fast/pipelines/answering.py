"""Run a LLaVA model over a benchmark's questions, batched and resumable, writing LLaVA's answer format.

In: a function returning a `llava_fast.LlavaModel` (called only when there is something to answer, after
every image was found, so bad input never waits for a 7B checkpoint to load), items (question_id, prompt
shown to the model, prompt recorded, image path or None), sampling settings.
Out: one JSON line per question, appended and flushed after every batch: {"question_id", "prompt", "text",
"answer_id", "model_id", "metadata": {}} (haotian-liu/LLaVA
llava/eval/model_vqa.py and model_vqa_science.py write the same fields). Questions already in the output
are skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from llava_fast.errors import ImageError, InputError
from llava_fast.pipelines.records import JsonlAppender, done_keys


@dataclass
class Item:
    question_id: object
    prompt: str  # what the model reads (with "<image>\n" when it has an image)
    recorded_prompt: str  # what the answer file records as "prompt" (LLaVA's cur_prompt)
    image: str | None


def check_images(items, flag="--images"):
    """Every image must exist before the model starts: a missing one stops the run with nothing lost."""
    for item in items:
        if item.image is not None and not os.path.isfile(item.image):
            raise ImageError(f"question {item.question_id!r}: image {item.image} not found (under {flag})")


def answer_items(get_model, items, output, *, model_id, batch_size=8, max_new_tokens=1024, temperature=0.0,
                 template=None, log=print):
    """Answer the items not yet in `output`; returns the number answered now."""
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    done = done_keys(output, "question_id", "--output (resuming)")
    todo = [item for item in items if item.question_id not in done]
    check_images(todo)
    log(f"answering {len(todo)} questions ({len(items) - len(todo)} already in {output}), batch {batch_size}")
    if not todo:
        return 0
    model = get_model()
    with JsonlAppender(output) as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            texts = model.generate([item.prompt for item in batch], [item.image for item in batch],
                                   max_new_tokens=max_new_tokens, temperature=temperature, template=template)
            for item, text in zip(batch, texts):
                out.write({"question_id": item.question_id, "prompt": item.recorded_prompt, "text": text.strip(),
                           "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}})
            log(f"  {min(start + batch_size, len(todo))}/{len(todo)}")
    return len(todo)


def model_id_of(args):
    return os.path.basename(os.path.normpath(args.model)) if args.model else f"random-{args.preset}"
