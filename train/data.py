"""LLaVA training data: JSON records -> (input_ids, labels) rows with exact label masking, image tensors, and
the batch plan (grouped by modality and length, identical for any number of processes).

Record format (LLaVA's, for both stages):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",          # optional: text-only without
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

Ids. A row's ids are exactly those of the original LLaVA's preprocessing (llava/train/train.py, pinned against
llava-torch 1.2.2.post1 in tests/train/test_train_original.py), for every template:

    vicuna_v1, llava_v1, llava_llama_2   conv.get_prompt() (= Template.segments), as preprocess_v1 / _llama_2
    plain (stage 1, preprocess_plain)    "<image>" + caption + "\\n": no separator after the image, so the
                                         caption's first word keeps its word-start piece ("▁a" 263, not "a")
    llava_v0 (preprocess's default path) "{system}\\n\\n### Human: {q}\\n### Assistant: {a}\\n### ...### "

and tokenized as its tokenizer_image_token does: each text chunk between images on its own (each gets the
dummy-prefix "▁"), whatever the checkpoint's layout. So a llava-hf checkpoint trains on the format the
LLaVA-1.5 weights were trained on ("USER: ▁<image>▁\\n..."), not on the one llava-hf's processor builds at
inference (no "▁" after the image); the plain and llava_v0 training formats also differ from their inference
templates, as they do in the original.

Labels. Each token is labelled with its own id when the character it starts at lies in a reply piece (reply
text plus its closing separator: "</s>" for vicuna_v1 / llava_v1, " </s>" for llava_llama_2, "\\n" for
plain, "\\n###" for llava_v0), and IGNORE_INDEX otherwise; the spans come from the tokenizer's character
offsets, so no length is re-derived by tokenizing pieces apart (the original does that and drops samples on a
"tokenization mismatch"). These equal the original's labels for every template but llava_v0, whose original
masking (_mask_targets) is off by the BOS each tokenized piece carries and labels "### Assistant:" headers.

Reference: haotian-liu/LLaVA llava/train/train.py (preprocess_multimodal, preprocess_v1, preprocess_plain,
preprocess, LengthGroupedSampler with group_by_modality_length).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import PIL.Image
import torch

from llava_fast.checkpoints.config import read_json
from llava_fast.errors import ImageError, InputError
from llava_fast.prompts.templates import IMAGE_MARKER, Template, get_template

IGNORE_INDEX = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# ------------------------------------------------------------------------------------------------------
# One conversation -> input_ids, labels
# ------------------------------------------------------------------------------------------------------


def conversation_messages(conversations) -> list[tuple[str, str]]:
    """LLaVA's [{"from", "value"}, ...] (or (role, text) pairs) -> alternating (role, text) messages that
    start with the user and end with a reply. As LLaVA does, a leading non-human turn is dropped; a trailing
    user turn has no reply to learn and is dropped too. Raises InputError for anything else."""
    if not isinstance(conversations, list) or not conversations:
        raise InputError("'conversations' must be a non-empty list")
    messages = []
    for turn in conversations:
        if isinstance(turn, dict):
            role, text = turn.get("from"), turn.get("value")
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            role, text = turn
        else:
            raise InputError(f"a conversation turn must be {{'from', 'value'}}, got {turn!r:.80}")
        if _ROLES.get(str(role).lower()) is None:
            raise InputError(f"a conversation turn has role {role!r} (expected human/gpt)")
        if not isinstance(text, str):  # the type, not the value: the reason is counted over every record
            raise InputError(f"a {role} turn's 'value' is {type(text).__name__}, not a string")
        messages.append((_ROLES[str(role).lower()], text))
    if messages[0][0] != "user":
        messages = messages[1:]
    if messages and messages[-1][0] == "user":
        messages = messages[:-1]
    if not messages:
        raise InputError("no assistant turn")
    for index, (role, _) in enumerate(messages):
        if role != ("user" if index % 2 == 0 else "assistant"):
            raise InputError("turns do not alternate human/gpt")
    return messages


def _image_first(messages, template: Template):
    """LLaVA's preprocess_multimodal: a single image marker moves to the front of its turn ("<image>\\n" +
    the rest, stripped, then the whole stripped), the order inference uses. For `plain` (stage-1
    pretraining) the user turn is only its image markers, as preprocess_plain does: the caption is learnt
    from the image alone. (The original also collapses several markers into one; we keep them.)"""
    markers = sum(text.count(IMAGE_MARKER) for _, text in messages)
    out = []
    for role, text in messages:
        n = text.count(IMAGE_MARKER)
        if role == "user" and template.style == "plain":
            text = IMAGE_MARKER * n
        elif n == 1 and markers == 1:
            text = (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()
        out.append((role, text))
    return out


def training_segments(messages, template: Template, system=None) -> list[tuple[str, bool]]:
    """(text, is_reply) pieces of the text the original LLaVA trains on for `template` (see the module
    docstring): Template.segments, except plain (no separator after the image-only user turn) and
    single-style llava_v0 (the original's "### Human: " / "### Assistant: " lines of _add_speaker_and_signal)."""
    if template.style == "plain":
        return [(text if role == "user" else text + template.sep2, role == "assistant") for role, text in messages]
    if template.style == "single":
        system = template.system if system is None else system
        user, assistant = template.roles
        pieces = [(f"{system}\n\n###", False)]  # each reply piece ends with the "###" that opens the next line
        for role, text in messages:
            if role == "user":
                pieces.append((f" {user}: {text}\n### {assistant}:", False))
            else:
                pieces.append((f" {text}\n###", True))
        return pieces + [(" ", False)]
    return template.segments(messages, system=system)


def encode_conversation(conversations, tokenizer, template, *, image_token_id=None, system=None):
    """The training row of one conversation: (input_ids, labels), two lists of equal length.

    conversations: LLaVA's list of {"from": "human"|"gpt", "value"} (or (role, text) pairs); tokenizer: a
    `llava_fast.prompts.tokenizer.Tokenizer`; template: a `Template` or its name. input_ids hold one image_token_id
    per "<image>" (expand with `expand_and_truncate`) and equal the original LLaVA's preprocessing (module
    docstring); labels are IGNORE_INDEX except on the assistant replies and their closing separators.
    image_token_id defaults to the tokenizer's "<image>" token. Raises InputError for a conversation that
    cannot be trained on.
    """
    template = get_template(template) if isinstance(template, str) else template
    if template.style == "llava_hf":
        raise InputError("the llava_hf template has no reply terminator to learn (its replies end in a space, "
                         "which merges into the next 'USER'); train llava-1.5 checkpoints with vicuna_v1, the "
                         "format they were trained with")
    if image_token_id is None:
        image_token_id = tokenizer.token_to_id(IMAGE_MARKER)
        if image_token_id is None:
            raise InputError("the tokenizer has no <image> token: pass image_token_id=")
    messages = _image_first(conversation_messages(conversations), template)
    segments = training_segments(messages, template, system)
    text = "".join(piece for piece, _ in segments)
    replies, start = [], 0  # character spans [a, b) of the reply pieces
    for piece, is_reply in segments:
        if is_reply:
            replies.append((start, start + len(piece)))
        start += len(piece)

    chunks, start = [], 0  # the original's tokenizer_image_token: each chunk between images on its own
    for chunk in text.split(IMAGE_MARKER):
        chunks.append((start, chunk))
        start += len(chunk) + len(IMAGE_MARKER)

    ids = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
    labels = [IGNORE_INDEX] * len(ids)
    reply_index = 0
    for index, (offset, chunk) in enumerate(chunks):
        if index > 0:
            ids.append(image_token_id)
            labels.append(IGNORE_INDEX)
        if not chunk:
            continue
        encoding = tokenizer.backend.encode(chunk, add_special_tokens=False)
        for token_id, (a, _) in zip(encoding.ids, encoding.offsets):
            a += offset  # the token's first character in `text`; replies are visited in order
            while reply_index < len(replies) and replies[reply_index][1] <= a:
                reply_index += 1
            in_reply = reply_index < len(replies) and replies[reply_index][0] <= a
            ids.append(token_id)
            labels.append(token_id if in_reply and token_id != image_token_id else IGNORE_INDEX)
    return ids, labels


def expand_and_truncate(ids, labels, image_token_id, num_image_tokens, max_length):
    """Each image token -> num_image_tokens positions (an int, or one count per image in order: LLaVA-NeXT's
    depend on each image's size), then truncation to max_length that never cuts an image's run: a run that
    would be cut is dropped whole, with everything after it. Returns (ids, labels, number of images kept)."""
    out_ids, out_labels, images = [], [], 0
    for token_id, label in zip(ids, labels):
        if token_id == image_token_id:
            n = num_image_tokens if isinstance(num_image_tokens, int) else num_image_tokens[images]
            if len(out_ids) + n > max_length:
                break
            out_ids.extend([image_token_id] * n)
            out_labels.extend([IGNORE_INDEX] * n)
            images += 1
        else:
            if len(out_ids) >= max_length:
                break
            out_ids.append(token_id)
            out_labels.append(label)
    return out_ids, out_labels, images


# ------------------------------------------------------------------------------------------------------
# The data set: records checked once, rows built on demand (in DataLoader workers)
# ------------------------------------------------------------------------------------------------------


@dataclass
class EncodingSpec:
    """Everything that turns a record into a row."""

    tokenizer: object
    template: Template
    image_token_id: int
    num_image_tokens: int
    max_length: int
    image_folder: str
    system: str | None = None
    # LLaVA-NeXT: (height, width) -> that image's positions (AnyRes tiles, unpadded, newlines); None: every
    # image fills num_image_tokens.
    image_token_count: object = None


def read_records(path):
    """The JSON list of records (or JSON lines, one record per line)."""
    records = read_json(path, InputError, "--data", lines=path.endswith(".jsonl"))
    if not isinstance(records, list):
        raise InputError(f"--data {path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def record_images(record, image_folder) -> list[str]:
    image = record.get("image") if isinstance(record, dict) else None
    if image is None:
        return []
    names = image if isinstance(image, list) else [image]
    if not all(isinstance(n, str) for n in names):
        raise InputError("'image' must be a path or a list of paths")
    return [os.path.join(image_folder, n) for n in names]


def encode_record(record, spec: EncodingSpec):
    """A record -> (ids, labels, image paths), image tokens expanded and truncated; InputError if the record
    cannot be trained on (its message is the reason that gets counted)."""
    if not isinstance(record, dict) or "conversations" not in record:
        raise InputError("not a record with 'conversations'")
    images = record_images(record, spec.image_folder)
    markers = sum(t.get("value", "").count(IMAGE_MARKER) for t in record["conversations"]
                  if isinstance(t, dict) and isinstance(t.get("value"), str))
    if markers != len(images):
        raise InputError("<image> count does not match the images")
    ids, labels = encode_conversation(record["conversations"], spec.tokenizer, spec.template,
                                      image_token_id=spec.image_token_id, system=spec.system)
    counts = spec.num_image_tokens
    if spec.image_token_count is not None:
        counts = [spec.image_token_count(*image_file_size(path)) for path in images]
    ids, labels, kept = expand_and_truncate(ids, labels, spec.image_token_id, counts, spec.max_length)
    if not any(label != IGNORE_INDEX for label in labels[1:]):  # labels[0] is never a target
        raise InputError("no reply tokens within --max-length")
    return ids, labels, images[:kept]


def image_file_size(path) -> tuple[int, int]:
    """(height, width) of an image file from its header (no decoding); InputError if it is missing or
    unreadable."""
    if not os.path.isfile(path):
        raise InputError("missing image file")
    try:
        with PIL.Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
        raise InputError("unreadable image") from None


@dataclass
class Example:
    """A record that passed the checks: where it is, its row length and whether it has images."""

    index: int
    length: int
    has_image: bool


def check_records(records, spec: EncodingSpec, *, indices=None, text_only_ok=True, first_bad=None):
    """Encode every record once (the row lengths group batches), and check its image files exist.
    Returns (examples, Counter of skip reasons). Images are decoded later, when a batch needs them.
    first_bad (a dict, filled when given): reason -> the index of the first record skipped for it, so a message
    can point at one in a file of 665k records."""
    examples, skipped = [], Counter()
    for index in (range(len(records)) if indices is None else indices):
        try:
            ids, _, images = encode_record(records[index], spec)
            if not images and not text_only_ok:
                raise InputError("text-only record in stage 1 (only the projector trains: nothing to learn)")
            for path in images:
                if not os.path.isfile(path):
                    raise InputError("missing image file")
        except InputError as e:
            skipped[str(e)] += 1
            if first_bad is not None:
                first_bad.setdefault(str(e), index)
            continue
        examples.append(Example(index, len(ids), bool(images)))
    return examples, skipped


class LlavaDataset(torch.utils.data.Dataset):
    """examples[i] -> a dict with "input_ids", "labels" (1-D long tensors) and "pixel_values" ((K, 3, S, S);
    LLaVA-NeXT: the K images' AnyRes tiles, with "image_sizes" (K, 2))
    or None), or {"skipped": reason} for a record whose image cannot be decoded (strict: ImageError)."""

    def __init__(self, records, examples, spec: EncodingSpec, processor, strict=False):
        self.records, self.examples, self.spec = records, examples, spec
        self.processor, self.strict = processor, strict

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        record = self.records[self.examples[i].index]
        ids, labels, images = encode_record(record, self.spec)
        sizes = None
        try:
            pixels = self.processor(images) if images else None  # (K, 3, S, S) float32
            if isinstance(pixels, tuple):  # LLaVA-NeXT: (tiles of the K images, (K, 2) image sizes)
                pixels, sizes = pixels
        except ImageError as e:
            if self.strict:
                raise ImageError(f"record {record.get('id', self.examples[i].index)!r}: {e}") from None
            return {"skipped": "unreadable image", "id": record.get("id")}
        keys = [(self.examples[i].index, k) for k in range(len(images))]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
                "image_sizes": sizes, "image_keys": keys}


@dataclass
class Batch:
    """One micro-batch, right-padded. num_targets: label positions that count in the loss (labels[:, 1:]
    that are not IGNORE_INDEX); num_tokens: real (non-padding) tokens, image positions included."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (K, 3, S, S), K images in row order; LLaVA-NeXT: their tiles
    num_samples: int
    num_tokens: int
    num_targets: int
    lengths: list  # tokens per row
    skipped: list  # reasons of the samples dropped from this batch
    image_keys: list = field(default_factory=list)  # (record index, image number) of each image
    # LLaVA-NeXT: (K, 2) (height, width) of the K images, whose tiles pixel_values holds, image after image
    image_sizes: torch.Tensor | None = None

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this on batch types it does not know
        pv = None if self.pixel_values is None else self.pixel_values.pin_memory()
        return Batch(self.input_ids.pin_memory(), self.labels.pin_memory(), pv, self.num_samples, self.num_tokens,
                     self.num_targets, self.lengths, self.skipped, self.image_keys, self.image_sizes)

    def to(self, device):
        nb = device.type == "cuda"
        pv = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=nb)
        return Batch(self.input_ids.to(device, non_blocking=nb), self.labels.to(device, non_blocking=nb), pv,
                     self.num_samples, self.num_tokens, self.num_targets, self.lengths, self.skipped, self.image_keys,
                     self.image_sizes)


class Collate:
    """Samples -> Batch, right padding with pad_id (labels IGNORE_INDEX). Skipped samples leave the batch."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, samples):
        skipped = [s["skipped"] for s in samples if "skipped" in s]
        samples = [s for s in samples if "skipped" not in s]
        T = max((len(s["input_ids"]) for s in samples), default=0)
        ids = torch.full((len(samples), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, : len(s["input_ids"])] = s["input_ids"]
            labels[row, : len(s["labels"])] = s["labels"]
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        lengths = [len(s["input_ids"]) for s in samples]
        sizes = [s["image_sizes"] for s in samples if s.get("image_sizes") is not None]
        return Batch(ids, labels, torch.cat(pixels) if pixels else None, len(samples), sum(lengths),
                     int((labels[:, 1:] != IGNORE_INDEX).sum()), lengths, skipped,
                     [k for s in samples for k in s.get("image_keys", [])], torch.cat(sizes) if sizes else None)


# ------------------------------------------------------------------------------------------------------
# The batch plan
# ------------------------------------------------------------------------------------------------------


def epoch_batches(examples, global_batch, seed, epoch) -> list[list[int]]:
    """One epoch's global batches (lists of positions in `examples`), LLaVA's group-by-modality-length:
    image and text-only examples are shuffled apart and cut into global batches, the two remainders are
    merged and cut again (the last incomplete batch is left out), the batch order is shuffled, and each
    batch is sorted longest first so its micro-batches hold rows of similar length (less padding).
    Depends only on (seed, epoch, global batch): any number of processes sees the same batches."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    groups = [[i for i, e in enumerate(examples) if e.has_image],
              [i for i, e in enumerate(examples) if not e.has_image]]
    batches, rest = [], []
    for group in groups:
        order = [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
        full = len(order) // global_batch * global_batch
        batches += [order[k : k + global_batch] for k in range(0, full, global_batch)]
        rest += order[full:]
    rest = [rest[j] for j in torch.randperm(len(rest), generator=g).tolist()]
    batches += [rest[k : k + global_batch] for k in range(0, len(rest) // global_batch * global_batch, global_batch)]
    batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return [sorted(b, key=lambda i: -examples[i].length) for b in batches]


class StepSampler:
    """The micro-batches one process runs, from global step `start` to `total`: global batch s (epoch
    s // steps_per_epoch) is cut into world * grad_accum micro-batches of batch_size consecutive examples;
    micro-batch j goes to rank j % world, as its (j // world)-th accumulation step. Used as a DataLoader's
    batch_sampler; resuming is starting at another `start`."""

    def __init__(self, examples, batch_size, grad_accum, world, rank, seed, start, total):
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.world, self.rank, self.seed, self.start, self.total = world, rank, seed, start, total
        self.global_batch = batch_size * grad_accum * world
        self.steps_per_epoch = len(examples) // self.global_batch
        self._epoch, self._batches = None, None

    def global_batch_at(self, step) -> list[int]:
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.examples, self.global_batch, self.seed, epoch)
        return self._batches[step % self.steps_per_epoch]

    def micro_batches(self, step) -> list[list[int]]:
        batch, B = self.global_batch_at(step), self.batch_size
        return [batch[j * B : (j + 1) * B] for j in range(self.rank, self.world * self.grad_accum, self.world)]

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from self.micro_batches(step)

    def __len__(self):
        return (self.total - self.start) * self.grad_accum


def total_steps(num_examples, global_batch, epochs=None, max_steps=None):
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise InputError(f"{num_examples} usable records are fewer than one global batch of {global_batch} "
                         "(--batch-size x --grad-accum x processes)")
    return max_steps if max_steps else int(math.ceil(epochs * steps_per_epoch)), steps_per_epoch
