"""encode_conversation on the real LLaMA tokenizer (tests/data/tokenizer): labels exactly on the
assistant replies and their closing separators, for every template, multi-turn.

Two independent checks: ids pinned literally (decoded in the comments), and a derivation through what
inference sees: reply k's labels start right after the tokens of the prompt `render(messages[:2k+1])` (the
generation prompt) and end at the tokens of `render(messages[:2k+2])`.
"""

import random

import pytest

from llava_fast.errors import InputError
from llava_fast.prompts.templates import get_template
from llava_fast.prompts.tokenizer import Tokenizer
from llava_fast.train import IGNORE_INDEX, encode_conversation, expand_and_truncate
from llava_fast.train.data import conversation_messages

IMG = 32000


@pytest.fixture(scope="module")
def tok(reference_dir):
    return Tokenizer.from_dir(f"{reference_dir}/tokenizer")


CONV = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Orange."}]

# (template, conversation, system, ids, labelled spans). "<image>" moves to the front of its turn (LLaVA's
# preprocess_multimodal); each chunk between images is tokenized alone, so "▁" (29871) follows the image
# (tokenizer_image_token); plain keeps only the image of the user turn, with no separator (preprocess_plain);
# llava_v0 trains on "### Human: " lines (preprocess's default path). tests/train/test_train_original.py
# checks these against the original code itself.
PINNED = [
    # " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Orange.</s>"
    ("vicuna_v1", CONV, "",
     [1, 3148, 1001, 29901, 29871, IMG, 29871, 13, 5618, 338, 445, 29973, 319, 1799, 9047, 13566, 29901, 319, 6635,
      29889, 2, 11889, 29901, 1530, 473, 29973, 319, 1799, 9047, 13566, 29901, 26048, 29889, 2],
     [[319, 6635, 29889, 2], [26048, 29889, 2]]),  # " A cat.</s>", " Orange.</s>"
    # "\n\n### Human: <image>\nWhat is this?\n### Assistant: A cat.\n### Human: Colour?\n### Assistant: Orange.\n### "
    ("llava_v0", CONV, "",
     [1, 29871, 13, 13, 2277, 29937, 12968, 29901, 29871, IMG, 29871, 13, 5618, 338, 445, 29973, 13, 2277, 29937,
      4007, 22137, 29901, 319, 6635, 29889, 13, 2277, 29937, 12968, 29901, 1530, 473, 29973, 13, 2277, 29937, 4007,
      22137, 29901, 26048, 29889, 13, 2277, 29937, 29871],
     [[319, 6635, 29889, 13, 2277, 29937], [26048, 29889, 13, 2277, 29937]]),  # " A cat.\n###", " Orange.\n###"
    # "<image>A cat.\n"
    ("plain", CONV[:2], None, [1, IMG, 319, 6635, 29889, 13], [[319, 6635, 29889, 13]]),
    # "[INST] <image>\nWhat is this? [/INST] A cat. </s><s>[INST] Colour? [/INST] Orange. </s>" (no <<SYS>>
    # block for an empty system prompt, as the original's wrap_sys)
    ("llava_llama_2", CONV, "",
     [1, 518, 25580, 29962, 29871, IMG, 29871, 13, 5618, 338, 445, 29973, 518, 29914, 25580, 29962, 319, 6635,
      29889, 29871, 2, 1, 29961, 25580, 29962, 1530, 473, 29973, 518, 29914, 25580, 29962, 26048, 29889, 29871, 2],
     [[319, 6635, 29889, 29871, 2], [26048, 29889, 29871, 2]]),
]


def spans(ids, labels):
    out, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("name,conv,system,want_ids,want_spans", PINNED, ids=[p[0] for p in PINNED])
def test_pinned(tok, name, conv, system, want_ids, want_spans):
    ids, labels = encode_conversation(conv, tok, name, system=system)
    assert ids == want_ids
    assert spans(ids, labels) == want_spans
    assert labels[0] == IGNORE_INDEX and IMG not in [label for label in labels]


LONG = [("human", "<image>\nDescribe the scene in detail, please."),
        ("gpt", "Two people stand near a red bus; one holds an umbrella."),
        ("human", "What is the weather like?"), ("gpt", "It looks rainy, given the umbrella and wet street."),
        ("human", "Anything unusual? Answer in one word."), ("gpt", "No.")]


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llava_llama_2"])
def test_labels_start_where_the_inference_prompt_ends(tok, name):
    """For the templates whose training text is the inference text (get_prompt), reply k's labels start right
    after the tokens of its generation prompt. (plain and llava_v0 train on other text, as the original.)"""
    template = get_template(name)
    ids, labels = encode_conversation(LONG, tok, name)

    def encode(messages, prompt):
        return tok.encode_with_images(template.render(messages, add_generation_prompt=prompt), IMG)

    assert ids == encode(LONG, False)
    expected = [IGNORE_INDEX] * len(ids)
    for k in range(len(LONG) // 2):
        prompt, full = encode(LONG[: 2 * k + 1], True), encode(LONG[: 2 * k + 2], False)
        assert ids[: len(prompt)] == prompt and ids[: len(full)] == full
        expected[len(prompt) : len(full)] = ids[len(prompt) : len(full)]
    assert labels == expected
    for span in spans(ids, labels):
        assert span[-1] == 2  # EOS closes every reply


def test_original_layout_tokenizes_chunks_apart(tok):
    """No "<image>" in the vocabulary (image id past it): each chunk is tokenized alone, as the original
    repo's tokenizer_image_token does, so "\\n" after the image arrives as "▁", "\\n"."""
    image_id = 32064
    ids, labels = encode_conversation(CONV[:2], tok, "vicuna_v1", image_token_id=image_id)
    text = get_template("vicuna_v1").render([("user", "<image>\nWhat is this?"), ("assistant", "A cat.")],
                                            add_generation_prompt=False)
    assert ids == tok.encode_with_images(text, image_id)
    i = ids.index(image_id)
    assert ids[i + 1 : i + 3] == [29871, 13]
    assert spans(ids, labels) == [[319, 6635, 29889, 2]]


def test_bad_conversations(tok):
    with pytest.raises(InputError, match="no assistant turn"):
        encode_conversation([{"from": "human", "value": "hi"}], tok, "vicuna_v1")
    with pytest.raises(InputError, match="alternate"):
        encode_conversation([{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                             {"from": "gpt", "value": "c"}], tok, "vicuna_v1")
    with pytest.raises(InputError, match="llava_hf"):
        encode_conversation(CONV, tok, "llava_hf")
    # A leading gpt turn and a trailing unanswered human turn are dropped (LLaVA does the same).
    assert conversation_messages([("gpt", "x"), ("human", "q"), ("gpt", "a"), ("human", "left")]) == \
        [("user", "q"), ("assistant", "a")]


def test_truncation_never_cuts_an_image():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        ids = [IMG if rng.random() < 0.15 else rng.randint(3, 31999) for _ in range(n)]
        labels = [IGNORE_INDEX if t == IMG or rng.random() < 0.5 else t for t in ids]
        num, max_length = rng.randint(1, 9), rng.randint(1, 60)
        out, out_labels, kept = expand_and_truncate(ids, labels, IMG, num, max_length)
        full, full_labels, all_images = expand_and_truncate(ids, labels, IMG, num, 10**9)
        assert len(out) <= max_length and out == full[: len(out)] and out_labels == full_labels[: len(out)]
        assert out.count(IMG) == kept * num  # whole runs only
        if len(out) < min(max_length, len(full)):  # stopped early: only because the next image did not fit
            assert full[len(out)] == IMG and len(out) + num > max_length
