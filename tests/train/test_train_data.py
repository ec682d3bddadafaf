"""Bad records, the batch plan (modality and length grouping; the same batches for any number of
processes), padding and target counting."""

from collections import Counter

import pytest
import torch
from trainutil import make_records

from llava_fast.image import ImageProcessor
from llava_fast.prompts.templates import get_template
from llava_fast.prompts.tokenizer import Tokenizer
from llava_fast.train.data import (
    IGNORE_INDEX,
    Collate,
    EncodingSpec,
    Example,
    LlavaDataset,
    StepSampler,
    check_records,
    epoch_batches,
)


@pytest.fixture(scope="module")
def spec(reference_dir, image_folder):
    tok = Tokenizer.from_dir(f"{reference_dir}/tokenizer")
    return EncodingSpec(tok, get_template("vicuna_v1"), 32000, 4, 512, image_folder)


def test_bad_records_are_counted_and_never_trained_on(spec):
    good = make_records(3, text_only_every=3)  # two with images, one text-only
    q, a = {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": [q, a]},
        {"id": "no-reply", "image": "img0.png", "conversations": [q]},
        {"id": "no-marker", "image": "img0.png", "conversations": [{"from": "human", "value": "q"}, a]},
        {"id": "no-image", "conversations": [q, a]},
        {"id": "two-markers", "image": "img0.png", "conversations": [{"from": "human", "value": "<image><image>"}, a]},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": [q, a]},  # exists: found when decoded
        "not a record",
        {"id": "number-reply", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}]},
        {"id": "system-turn", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, a]},
    ]
    records = good + bad
    examples, skipped = check_records(records, spec)
    assert [e.index for e in examples] == [0, 1, 2, len(records) - 4]
    assert skipped == Counter({"missing image file": 1, "no assistant turn": 1, "not a record with 'conversations'": 1,
                               "<image> count does not match the images": 3,
                               "a gpt turn's 'value' is int, not a string": 1,
                               "a conversation turn has role 'system' (expected human/gpt)": 1})
    stage1_examples, stage1_skipped = check_records(good, spec, text_only_ok=False)
    assert len(stage1_examples) == 2 and sum(stage1_skipped.values()) == 1

    dataset = LlavaDataset(records, examples, spec, ImageProcessor.clip(28))
    batch = Collate(spec.tokenizer.pad_token_id)([dataset[i] for i in range(len(examples))])
    assert batch.skipped == ["unreadable image"] and batch.num_samples == 3
    assert batch.pixel_values.shape == (2, 3, 28, 28)  # images of rows 0 and 1, in row order
    assert batch.num_targets == int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) > 0
    for row, length in enumerate(batch.lengths):  # right padding: pad ids, ignored labels
        assert (batch.input_ids[row, length:] == spec.tokenizer.pad_token_id).all()
        assert (batch.labels[row, length:] == IGNORE_INDEX).all()
    strict = LlavaDataset(records, examples, spec, ImageProcessor.clip(28), strict=True)
    with pytest.raises(ValueError, match="corrupt.jpg"):
        strict[len(examples) - 1]


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 200, (n,), generator=g).tolist()
    images = (torch.rand(n, generator=g) < 0.7).tolist()
    return [Example(i, lengths[i], images[i]) for i in range(n)]


def test_batch_plan_groups_modality_and_length():
    examples = _examples(103)
    batches = epoch_batches(examples, 8, seed=1, epoch=0)
    assert len(batches) == 103 // 8
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)
    mixed = [b for b in batches if len({examples[i].has_image for i in b}) > 1]
    assert len(mixed) <= 1  # only the batch made of both modalities' remainders
    for b in batches:
        assert [examples[i].length for i in b] == sorted((examples[i].length for i in b), reverse=True)
    assert batches == epoch_batches(examples, 8, seed=1, epoch=0)
    assert batches != epoch_batches(examples, 8, seed=1, epoch=1)


@pytest.mark.parametrize("batch_size,accum,world", [(2, 1, 2), (1, 2, 2), (1, 1, 4), (2, 2, 1)])
def test_every_layout_of_a_global_batch_sees_the_same_samples(batch_size, accum, world):
    examples = _examples(50)
    total = 15  # crosses an epoch boundary: 50 // 4 = 12 steps per epoch
    one = StepSampler(examples, 4, 1, 1, 0, seed=3, start=0, total=total)
    for step in range(total):
        want = one.micro_batches(step)[0]
        ranks = [StepSampler(examples, batch_size, accum, world, r, 3, 0, total).micro_batches(step)
                 for r in range(world)]
        got = sorted(i for r in ranks for mb in r for i in mb)
        assert got == sorted(want) and all(len(mb) == batch_size for r in ranks for mb in r)
    resumed = list(StepSampler(examples, 2, 2, 1, 0, 3, start=3, total=total))
    assert resumed == list(StepSampler(examples, 2, 2, 1, 0, 3, start=0, total=total))[3 * 2:]
