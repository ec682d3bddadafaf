"""llava_fast.prompts.tokenizer against transformers' LlamaTokenizer (which builds its own BPE pipeline from the same
vocabulary), llava-hf's LlavaProcessor, and LLaVA's tokenizer_image_token restated on transformers' tokenizer.

Real data: tests/data/tokenizer (LLaMA's tokenizer.model and its llava-hf style tokenizer.json with
<image> = 32000, <pad> = 32001) and the LLaVA-Bench questions and GPT-4 answers as a text corpus.
"""

import json
import os
import random
import shutil

import pytest

from llava_fast.errors import CheckpointError, InputError
from llava_fast.prompts.tokenizer import Tokenizer, backend_from_sentencepiece

VICUNA_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
                 "What is unusual about this image? ASSISTANT:")
# Text the templates never produce but a tokenizer must get right: CJK (some characters only as byte
# tokens), emoji (4 bytes), runs of spaces and newlines, a literal "</s>", accents.
EDGE_TEXTS = [
    "你好，世界！这是一个测试。龘𠮷",
    "Emoji 😀🎉👍🏽 and flags 🇯🇵",
    "    def f(x):\n        return x  # two  spaces\n\n\ttab",
    "first turn</s>USER: second",
    "Crème brûlée, naïve façade, Ångström",
    "",
    " leading space",
]


@pytest.fixture(scope="module")
def tokenizer_dir(reference_dir):
    return os.path.join(reference_dir, "tokenizer")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(reference_dir):
    texts = list(EDGE_TEXTS)
    for name in ("qa90_questions.jsonl", "qa90_gpt4_answer.jsonl"):
        with open(os.path.join(reference_dir, "llava_bench_coco", name), encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def original_llava_ids(hf_tok, prompt, image_token_id):
    """LLaVA's tokenizer_image_token, restated: each chunk between "<image>" markers tokenized on its own
    (with BOS), BOS kept only on the first chunk, one image id between consecutive chunks."""
    chunks = [hf_tok(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        assert chunk[0] == hf_tok.bos_token_id
        ids += [image_token_id] + chunk[1:]
    return ids


# -------------------------------------------------------------------------------------------------------
# Vocabulary, encode, decode
# -------------------------------------------------------------------------------------------------------


def test_special_tokens_and_vocab_size(tok, hf_tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 32001, 0)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.vocab_size == len(hf_tok) == 32002
    assert tok.token_to_id("<image>") == 32000 and tok.token_to_id("▁Hello") == 15043
    assert tok.token_to_id("no such token") is None
    assert tok.special_token_ids == {0, 1, 2, 32000, 32001}


def test_encode_pinned_ids(tok):
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("Hello world", add_bos=False) == [15043, 3186]
    # "中" is a vocabulary piece; "😀" is spelled in four byte tokens <0xF0><0x9F><0x98><0x80>.
    assert tok.encode("中😀", add_bos=False) == [29871, 30275, 243, 162, 155, 131]
    # An added token written in the text is that token, and (legacy: false) no "▁" is prepended after it.
    assert tok.encode("a</s>USER", add_bos=False) == [263, 2, 11889]


def test_text_that_is_not_valid_unicode_is_an_input_error(tok):
    """A byte that is not UTF-8 on the command line or stdin reaches Python as a lone surrogate (surrogateescape),
    as does JSON's unpaired "\\ud800"; tokenizers raised a bare TypeError on both (a traceback, an HTTP 500)."""
    for encode in (lambda t: tok.encode(t), lambda t: tok.encode_with_images(t, 32000)):
        with pytest.raises(InputError, match=r"not valid UTF-8: byte 0xff after 'Describe ' \(as read from"):
            encode("Describe \udcff the image")
        with pytest.raises(InputError, match="lone UTF-16 surrogate U[+]D800 at the start"):
            encode("\ud800<image> x")
    assert tok.encode("é\U0001F600", add_bos=False) == [904, 243, 162, 155, 131]  # a valid pair (😀) still encodes


def test_encode_and_decode_match_transformers(tok, hf_tok, corpus):
    for text in corpus:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids, text
        assert tok.encode(text, add_bos=False) == hf_tok(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False), text


def test_decode_rejects_negative_ids_and_drops_padded_ones(tok, reference_dir):
    from transformers import AutoTokenizer

    with pytest.raises(InputError, match="-200 is outside the vocabulary"):
        tok.decode([1, -200, 15043])
    # Ids past the tokenizer (llava-hf's lm_head has 32,064 rows, the tokenizer 32,002 tokens) decode to
    # nothing, as transformers decodes them; also inside a byte run ("中" = <0xE4><0xB8><0xAD>).
    hf_tok = AutoTokenizer.from_pretrained(f"{reference_dir}/tokenizer")
    for ids in ([32002], [15043, 32050, 3186], [15043, 231, 32063, 187, 176, 32002]):
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
        assert "".join(stream(tok, ids, True)) == tok.decode(ids)
    assert tok.decode([15043, 32050, 3186]) == "Hello world" and tok.decode([32002, 32063]) == ""
    assert tok.decode([15043, 231, 32063, 187, 176]) == "Hello中"


# -------------------------------------------------------------------------------------------------------
# Images: the original LLaVA's chunked tokenization vs llava-hf's whole-prompt tokenization
# -------------------------------------------------------------------------------------------------------


def test_encode_with_images_is_tokenizer_image_token(tok, hf_tok):
    prompts = [VICUNA_PROMPT, "<image>\nDescribe.", "<image><image>two images", "Compare <image> and <image>",
               "text only", "ends with an image <image>", "<image>", "</s>USER: <image>\n第二"]
    for prompt in prompts:
        for image_token_id in (-200, 32000):
            assert tok.encode_with_images(prompt, image_token_id) == original_llava_ids(hf_tok, prompt,
                                                                                          image_token_id), prompt
    assert tok.encode_with_images("<image>\nHi", -200, add_bos=False) == [-200, 29871, 13, 18567]


def test_image_prompt_ids_pinned_both_ways(tok):
    system_ids = [1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
                  8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155, 29889]
    user_ids = [3148, 1001, 29901, 29871]  # "▁US", "ER", ":", "▁"
    question_ids = [13, 5618, 338, 22910, 1048, 445, 1967, 29973]  # "\n", "What", ... "?"
    assistant_ids = [319, 1799, 9047, 13566, 29901]  # "▁A", "SS", "IST", "ANT", ":"
    # Original LLaVA: the chunk after the image gets its own dummy-prefix "▁" (29871).
    assert tok.encode_with_images(VICUNA_PROMPT, -200) == (
        system_ids + user_ids + [-200, 29871] + question_ids + assistant_ids)
    # llava-hf: the whole prompt at once; "<image>" is the added token 32000 and no "▁" follows it.
    assert tok.encode(VICUNA_PROMPT) == system_ids + user_ids + [32000] + question_ids + assistant_ids


def test_llava_hf_processor_tokenizes_the_whole_prompt(tok, hf_tok, reference_dir):
    transformers = pytest.importorskip("transformers")
    image_module = pytest.importorskip("PIL.Image")
    with open(os.path.join(reference_dir, "configs", "llava-1.5-7b-hf", "preprocessor_config.json")) as f:
        image_processor = transformers.CLIPImageProcessor(**json.load(f))
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=14,
                                            vision_feature_select_strategy="default", image_token="<image>",
                                            num_additional_image_tokens=1)
    prompt = "USER: <image>\nWhat is unusual about this image? ASSISTANT:"
    image = image_module.open(os.path.join(reference_dir, "images", "extreme_ironing.jpg"))
    hf_ids = processor(text=prompt, images=image)["input_ids"][0]
    hf_ids = hf_ids.tolist() if hasattr(hf_ids, "tolist") else list(hf_ids)

    ours = Tokenizer.expand_image_tokens(tok.encode(prompt), 32000, 576)
    assert ours == hf_ids and len(ours) == 18 + 576
    assert hf_ids[:5] == [1, 3148, 1001, 29901, 29871] and hf_ids[5 + 576:5 + 578] == [13, 5618]
    chunked = tok.expand_image_tokens(tok.encode_with_images(prompt, 32000), 32000, 576)
    assert chunked == ours[:5 + 576] + [29871] + ours[5 + 576:]  # exactly one extra "▁" after the image


def test_escaped_image_text_is_tokenized_as_the_text_not_the_image(tok, hf_tok):
    """"<image>" a person wrote (escape_image_text) becomes the ids of the text "<image>", as transformers
    tokenizes it with special tokens split, and only a real marker becomes the image id, in both layouts."""
    from llava_fast.prompts.templates import escape_image_text

    question = " What does <image> mean in Jinja's <image>?"
    literal = hf_tok(question, split_special_tokens=True, add_special_tokens=False).input_ids
    assert 32000 not in literal and len(literal) > 8
    head = "USER: <image>"
    text = head + escape_image_text(question)
    assert tok.encode(text, add_bos=False) == tok.encode(head, add_bos=False) + literal
    assert tok.encode_with_images(text, -200, add_bos=False) == tok.encode_with_images(head, -200, add_bos=False) \
        + literal
    assert tok.encode(escape_image_text("<image>"), add_bos=False) == [529, 3027, 29958]  # "<", "image", ">"
    assert tok.encode(text) == tok.encode(text)  # the copy of the backend is built once and kept
    assert tok.encode(VICUNA_PROMPT).count(32000) == 1  # text without the escape: the marker is the image id


def test_expand_image_tokens():
    assert Tokenizer.expand_image_tokens([1, 5, -200, 7, -200], -200, 3) == [1, 5] + [-200] * 3 + [7] + [-200] * 3
    assert Tokenizer.expand_image_tokens([1, 2], -200, 3) == [1, 2]
    with pytest.raises(InputError, match="num_image_tokens"):
        Tokenizer.expand_image_tokens([-200], -200, 0)


# -------------------------------------------------------------------------------------------------------
# Streaming decode
# -------------------------------------------------------------------------------------------------------


def stream(tok, ids, skip_special_tokens=True):
    decoder = tok.stream_decoder(skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_real_text_never_splits_a_character(tok, corpus):
    for text in corpus:
        ids = tok.encode(text)
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids), text
        assert not any("\ufffd" in d for d in deltas), text


def test_stream_pinned_deltas(tok):
    # "😀" arrives as four byte tokens: held until the run is closed by the next non-byte token.
    ids = tok.encode("Hi 😀 ok")
    assert ids == [1, 6324, 29871, 243, 162, 155, 131, 3431]
    assert stream(tok, ids) == ["", "Hi", " ", "", "", "", "", "😀 ok", ""]
    # The first token's leading space is stripped (as decode does), a later one's is kept.
    assert stream(tok, [1, 29871, 15043, 3186]) == ["", "", " Hello", " world", ""]
    assert tok.decode([1, 29871, 15043, 3186]) == " Hello world"
    # A complete "中" in bytes followed by a stray continuation byte: decode turns the whole run into one
    # U+FFFD per byte, so nothing of it may be emitted before the run ends.
    zhong = [231, 187, 176]  # <0xE4><0xB8><0xAD>
    assert tok.decode(zhong) == "中"
    assert stream(tok, zhong + [131, 278]) == ["", "", "", "", "\ufffd" * 4 + " the", ""]
    # A skipped special token inside a byte run is invisible; at the end of the stream the run is flushed.
    assert stream(tok, [231, 2, 187, 176]) == ["", "", "", "", "中"]
    assert stream(tok, [231, 2, 187, 176], skip_special_tokens=False) == ["", "\ufffd</s>", "", "", "\ufffd\ufffd"]


def test_stream_random_ids_equal_decode(tok):
    rng = random.Random(0)
    byte_ids = list(range(3, 259))
    pools = [byte_ids, byte_ids, sorted(tok.special_token_ids), [29871, 259, 13], list(range(tok.vocab_size))]
    for _ in range(1500):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 30))]
        for skip in (True, False):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_stream_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.stream_decoder().push(-200)


# -------------------------------------------------------------------------------------------------------
# Loading: tokenizer.model conversion, special-token files, errors
# -------------------------------------------------------------------------------------------------------


def test_tokenizer_model_converts_to_the_reference_tokenizer_json(tokenizer_dir, tmp_path, tok, corpus):
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), tmp_path)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer_config.json"), tmp_path)  # legacy: false
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001}))
    converted = Tokenizer.from_dir(str(tmp_path))

    ours, reference = json.loads(converted.backend.to_str()), json.loads(tok.backend.to_str())
    for key in ("model", "normalizer", "pre_tokenizer", "decoder", "added_tokens"):
        assert ours[key] == reference[key], key  # same vocabulary and the same 61,249 merges in order
    assert len(ours["model"]["merges"]) == 61249
    assert (converted.bos_token_id, converted.eos_token_id, converted.pad_token_id) == (1, 2, 32001)
    for text in corpus + [VICUNA_PROMPT]:
        assert converted.encode(text) == tok.encode(text)


def test_tokenizer_model_without_legacy_setting_is_legacy(tokenizer_dir, tmp_path, tokenizer_dir_hf_legacy):
    # transformers' slow LlamaTokenizer, which the original LLaVA repo ran, defaulted to legacy=True: the text
    # after a special token gets the dummy prefix too ("▁US", "ER" instead of "USER").
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), tmp_path)
    converted = Tokenizer.from_dir(str(tmp_path))
    assert converted.encode("a</s>USER") == [1, 263, 2, 3148, 1001]
    assert converted.encode("a</s>USER") == tokenizer_dir_hf_legacy("a</s>USER").input_ids
    assert converted.pad_token_id == 0  # no pad token named: unk, as LLaVA's trainer pads


@pytest.fixture(scope="module")
def tokenizer_dir_hf_legacy(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir, legacy=True)


def test_special_tokens_map_fills_a_null_config_entry(tokenizer_dir, tmp_path):
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": None, "add_bos_token": False}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "<unk>", "lstrip": False}, "eos_token": "</s>"}))
    loaded = Tokenizer.from_dir(str(tmp_path))
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 2, 1)
    assert loaded.encode("Hello") == [15043]  # add_bos_token false


def test_loading_errors(tokenizer_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_dir(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(str(tmp_path))

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        Tokenizer.from_dir(str(tmp_path))

    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    with pytest.raises(CheckpointError, match=r"pad_token is '\[PAD\]', which is not in its vocabulary"):
        Tokenizer.from_dir(str(tmp_path))

    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": 32005}))
    with pytest.raises(CheckpointError, match="'<image>' as id 32005, but the vocabulary has it at 32000"):
        Tokenizer.from_dir(str(tmp_path))

    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"\x0a\x05\x0a\x03abc")  # one piece, no trainer spec: reads as a Unigram model
    with pytest.raises(CheckpointError, match="Unigram"):
        backend_from_sentencepiece(str(bad_model))
    bad_model.write_bytes(b"\xff\xff")
    with pytest.raises(CheckpointError, match="cannot read the SentencePiece model"):
        backend_from_sentencepiece(str(bad_model))
