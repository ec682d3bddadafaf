"""Training rows against the original LLaVA's own preprocessing (llava-torch 1.2.2.post1, llava/train/train.py
preprocess + llava/conversation.py, run as the oracle; see tests/original_llava.py): input ids identical for
every template, with and without images, one and several turns, on the real LLaMA tokenizer; labels identical
wherever the original's are meaningful (all templates but llava_v0, whose original masking is off by one BOS
per piece). A few rows are also pinned literally, so the test fails even if the oracle changes.
"""

import copy

import pytest
from original_llava import original_llava

from llava_fast.prompts.tokenizer import Tokenizer
from llava_fast.train import IGNORE_INDEX, encode_conversation

IMG = 32000
TEMPLATES = ["plain", "vicuna_v1", "llava_v1", "llava_v0", "llava_llama_2"]
CONVERSATIONS = {
    "image-1-turn": [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}],
    "image-2-turns": [{"from": "human", "value": "<image>\nDescribe the scene in detail, please."},
                      {"from": "gpt", "value": "Two people stand near a red bus; one holds an umbrella."},
                      {"from": "human", "value": "What is the weather like?"},
                      {"from": "gpt", "value": "It looks rainy, given the umbrella and wet street."}],
    "text-3-turns": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
                     {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Red, or maybe green."},
                     {"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You're welcome."}],
    "caption": [{"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
                {"from": "gpt", "value": "a cat on a mat"}],
}


class _DataArgs:  # what the original's preprocess_multimodal reads
    is_multimodal = True
    mm_use_im_start_end = False


@pytest.fixture(scope="module")
def oracle():
    return original_llava()


@pytest.fixture(scope="module")
def tokenizers(reference_dir):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(f"{reference_dir}/tokenizer")
    hf_tok.pad_token = hf_tok.unk_token  # as the original's train() sets it for every version but v0
    return Tokenizer.from_dir(f"{reference_dir}/tokenizer"), hf_tok


def original_row(oracle, template, conversation, hf_tok, image_token_id):
    oracle.conversation_lib.default_conversation = oracle.conversation_lib.conv_templates[template]
    has_image = any("<image>" in turn["value"] for turn in conversation)
    sources = oracle.preprocess_multimodal([copy.deepcopy(conversation)], _DataArgs)
    out = oracle.preprocess(sources, hf_tok, has_image=has_image)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    return [image_token_id if t == oracle.IMAGE_TOKEN_INDEX else t for t in ids], labels


CASES = [(t, c) for t in TEMPLATES for c in CONVERSATIONS if t != "plain" or c in ("image-1-turn", "caption")]


@pytest.mark.parametrize("image_token_id", [IMG, 32064], ids=["llava-hf-vocab", "original-vocab"])
@pytest.mark.parametrize("template,conversation", CASES, ids=[f"{t}-{c}" for t, c in CASES])
def test_rows_equal_the_original_preprocessing(oracle, tokenizers, template, conversation, image_token_id):
    tok, hf_tok = tokenizers
    conv = CONVERSATIONS[conversation]
    want_ids, want_labels = original_row(oracle, template, conv, hf_tok, image_token_id)
    ids, labels = encode_conversation(conv, tok, template, image_token_id=image_token_id)
    assert ids == want_ids
    if template != "llava_v0":
        assert any(label != IGNORE_INDEX for label in want_labels), "the original reported a mismatch"
        assert labels == want_labels


# Pinned: a stage-1 row ("a cat on a mat": "▁a" 263 right after the image, no "\n" between), and
# the image-1-turn rows, decoded in the comments; the labels are the reply tokens (from reply_start below).
PINNED = {
    # <s> <image> a cat on a mat \n
    "plain": [1, IMG, 263, 6635, 373, 263, 1775, 13],
    # <s> ...system... USER: ▁ <image> ▁ \n What is this? ASSISTANT: A cat.</s>
    "vicuna_v1": [1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
                  8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155, 29889, 3148,
                  1001, 29901, 29871, IMG, 29871, 13, 5618, 338, 445, 29973, 319, 1799, 9047, 13566, 29901, 319,
                  6635, 29889, 2],
    # <s> ...system...\n\n### Human: ▁ <image> ▁ \n What is this?\n### Assistant: A cat.\n### ▁
    "llava_v0": [1, 319, 13563, 1546, 263, 12758, 5199, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
                 8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 5199, 29915, 29879, 5155, 29889, 13, 13,
                 2277, 29937, 12968, 29901, 29871, IMG, 29871, 13, 5618, 338, 445, 29973, 13, 2277, 29937, 4007,
                 22137, 29901, 319, 6635, 29889, 13, 2277, 29937, 29871],
}


@pytest.mark.parametrize("template", sorted(PINNED))
def test_pinned_rows(tokenizers, template):
    tok, _ = tokenizers
    conv = CONVERSATIONS["caption" if template == "plain" else "image-1-turn"]
    ids, labels = encode_conversation(conv, tok, template)
    want = PINNED[template]
    assert ids == want
    reply_start = {"plain": 2, "vicuna_v1": len(want) - 4, "llava_v0": len(want) - 7}[template]
    reply_end = len(want) - (1 if template == "llava_v0" else 0)
    assert labels == ([IGNORE_INDEX] * reply_start + want[reply_start:reply_end]
                      + [IGNORE_INDEX] * (len(want) - reply_end))
