"""A LLaVA checkpoint whose LM speaks a byte-level BPE vocabulary (as LLaMA-3 and SmolLM2 do), end to end.

The tokenizer is trained here with `tokenizers` (tests/checkpoints.py: ByteLevel pre-tokenizer and decoder,
SmolLM2's specials <|endoftext|>/<|im_start|>/<|im_end|>, no BOS added, SmolLM2's ChatML chat template, EOS
ids [<|im_end|>, <|endoftext|>] in generation_config.json). Oracles: transformers' AutoTokenizer (encode,
decode, apply_chat_template) and LlavaForConditionalGeneration.generate with the same EOS list.
"""

import json
import os
import random

import checkpoints as ck
import pytest
import torch
from checkpoints import DEVICE

import llava_fast
from llava_fast.prompts.tokenizer import Tokenizer

IMAGE = os.path.join(ck.IMAGE_DIR, "waterview.jpg")
TEXTS = ["Hello world", "你好，世界！龘𠮷 and 😀🎉👍🏽 🇯🇵", "  two  spaces\n\n\ttab", "Crème brûlée <|im_end|> end",
         "What is unusual about this image?", ""]


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory):
    """(transformers model, checkpoint dir): a tiny random llava-hf checkpoint over the trained BPE."""
    tok_dir = str(tmp_path_factory.mktemp("bpe-tokenizer"))
    vocab = ck.write_byte_level_tokenizer(tok_dir)
    image_id = vocab - 1  # "<image>", the last added token
    hf = ck.make_hf_model(seed=3, image_token_id=image_id, text=dict(
        vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("bpe-llava")), "save_pretrained",
                               tokenizer_dir=tok_dir)
    return hf, path


@pytest.fixture(scope="module")
def model(bpe_ckpt):
    return llava_fast.load(bpe_ckpt[1], device=DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def hf_tok(bpe_ckpt):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(bpe_ckpt[1])


def test_tokenizer_matches_transformers(model, hf_tok):
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, (2, 0), 2)
    assert not tok.add_bos_token  # the byte-level post-processor adds no BOS, nor does transformers
    assert tok.vocab_size == len(hf_tok) and tok.token_to_id("<image>") == model.image_token_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids, text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def _stream(tok, ids, skip=True):
    decoder = tok.stream_decoder(skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_is_utf8_safe_and_joins_to_decode(model):
    tok = model.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)
    # "𠮷" (4 bytes) is split over several byte-level tokens: nothing is emitted until it is whole.
    ids = tok.encode("a𠮷")
    pieces = _stream(tok, ids)
    assert len(ids) > 2 and any("𠮷" in p for p in pieces) and not any("\ufffd" in p for p in pieces)
    rng = random.Random(0)  # random ids: invalid UTF-8, specials in the middle, both skip settings
    specials = [0, 1, 2, model.image_token_id]
    for _ in range(400):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(3, tok.vocab_size - 1)
               for _ in range(rng.randint(0, 25))]
        for skip in (True, False):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_prompt_is_the_checkpoints_chatml_template(model, hf_tok):
    messages = [{"role": "user", "content": "<image>\nWhat is unusual about this image?"}]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    ours = model.encode_prompt("What is unusual about this image?", 1)
    assert ours == Tokenizer.expand_image_tokens(hf_ids, model.image_token_id, model.num_image_tokens)
    text = model.tokenizer.decode(ours[:40], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    with_system = model.encode_prompt("Hi", 0, system="Be brief.")
    assert model.tokenizer.decode(with_system, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # The named LLaVA templates stay selectable.
    named = model.tokenizer.decode(model.encode_prompt("Hi", 0, template="vicuna_v1"), skip_special_tokens=False)
    assert named.endswith("USER: Hi ASSISTANT:")


@pytest.fixture(scope="module")
def ended(bpe_ckpt, model, tmp_path_factory):
    """The checkpoint again, with an EOS list whose second id is the 4th token greedy decoding produces for
    the first prompt: generation must stop there exactly as transformers' generate does."""
    rows = [model.encode_prompt("Describe the image.", 1), model.encode_prompt("Count to ten.", 0)]
    free = model.generate_ids(rows, model.pixel_values([IMAGE]), max_new_tokens=12, eos_token_id=None)
    eos = free[0][3]
    path = str(tmp_path_factory.mktemp("bpe-eos"))
    for name in os.listdir(bpe_ckpt[1]):
        os.symlink(os.path.join(bpe_ckpt[1], name), os.path.join(path, name))
    os.remove(os.path.join(path, "generation_config.json"))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, eos]}, f)
    return llava_fast.load(path, device=DEVICE, dtype="float32"), rows, free, eos


def test_generation_stops_on_any_eos_as_transformers_does(bpe_ckpt, ended):
    hf = bpe_ckpt[0]
    model, rows, free, eos = ended
    assert model.tokenizer.eos_token_ids == (2, eos)
    pv = model.pixel_values([IMAGE])
    got = model.generate_ids(rows, pv, max_new_tokens=12)
    assert got[0] == free[0][: free[0].index(eos) + 1]
    images = [pv, None]
    for row, out, pixels in zip(rows, got, images):
        hf_row = torch.tensor([row])
        with torch.no_grad():
            image_kw = {} if pixels is None else {"pixel_values": pixels.cpu()}
            ref = hf.generate(input_ids=hf_row, **image_kw, max_new_tokens=12, do_sample=False,
                              eos_token_id=[2, eos], pad_token_id=2)
        ref = ref[0, len(row):].tolist()
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref  # transformers pads finished rows
        assert out == ref


def test_generate_stream_and_chat_end_to_end(ended):
    model, _, free, eos = ended
    text = model.generate("Describe the image.", IMAGE, max_new_tokens=12)
    assert text == model.tokenizer.decode(free[0][: free[0].index(eos)])
    pieces = list(model.stream("Describe the image.", IMAGE, max_new_tokens=12))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # A stop string inside the reply cuts it there, in generate and stream alike.
    long = model.generate("Count to ten.", max_new_tokens=16)
    stop = next(long[i:i + 2] for i in range(len(long) // 2, len(long) - 1) if long[i:i + 2].strip())
    cut = long[: long.index(stop)]
    assert len(cut) >= 2
    assert model.generate("Count to ten.", max_new_tokens=16, stop=stop) == cut
    assert "".join(model.stream("Count to ten.", max_new_tokens=16, stop=[stop])) == cut
    # chat() keeps the KV cache across turns, and a turn equals the whole conversation sent as one prompt.
    session = model.chat(IMAGE, max_new_tokens=6)
    a1 = session.ask("What is in the picture?")
    a2 = session.ask("And the colour?")
    assert model.last_stats["prompt_tokens"] < len(model.encode_prompt(
        [("user", "What is in the picture?"), ("assistant", a1), ("user", "And the colour?")], 1))
    whole = model.generate([("user", "What is in the picture?"), ("assistant", a1), ("user", "And the colour?")],
                           IMAGE, max_new_tokens=6)
    assert a2 == whole


def test_a_tokenizer_without_eos_is_a_clear_error(tmp_path):
    ck.write_byte_level_tokenizer(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    assert Tokenizer.from_dir(str(tmp_path)).eos_token_ids == (2,)  # generation_config.json alone suffices
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5000}))
    with pytest.raises(llava_fast.CheckpointError, match=r"tokenizer.json: the eos token id 5000 is outside the "
                                                         r"vocabulary \(size 701\)"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "generation_config.json").unlink()
    with pytest.raises(llava_fast.CheckpointError, match=r"tokenizer.json: the tokenizer names no end-of-sequence"):
        Tokenizer.from_dir(str(tmp_path))


def test_token_bytes_join_to_the_texts_utf8(model, hf_tok):
    """Each token's bytes (OpenAI's logprobs `bytes`) are what it adds to the decoded text: byte-level tokens
    read through GPT-2's byte alphabet ("Ġis" is b" is"), so a character split over several tokens is whole
    again once their bytes are joined."""
    tok = model.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode(), text
    space = next(i for i in tok.encode(" unusual image") if hf_tok.convert_ids_to_tokens(i).startswith("Ġ"))
    assert tok.token_bytes(space) == b" " + hf_tok.convert_ids_to_tokens(space)[1:].encode()
    assert tok.token_bytes(2) == b"<|im_end|>" and tok.token_bytes(model.image_token_id) == b"<image>"
    assert tok.token_bytes(tok.vocab_size + 5) == b""  # a padded lm_head row decodes to nothing


def test_served_logprobs_bytes_spell_the_reply(model):
    """The server's logprobs entries on a byte-level vocabulary: each token's text and bytes are its decoded
    bytes (" is", not "Ġis"), and the entries' bytes joined are the reply."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
    pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
    from serve_helpers import LiveServer

    from llava_fast.serve.app import ServeConfig

    config = ServeConfig(model_name="bpe", max_batch=2, max_model_len=256, max_waiting=4, image_cache_mb=4)
    server = LiveServer(model, config).start()
    try:
        r = server.client().chat.completions.create(
            model="bpe", messages=[{"role": "user", "content": "Describe a kitchen."}], max_tokens=24, temperature=0,
            logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    finally:
        server.stop()
    content, entries = r.choices[0].message.content, r.choices[0].logprobs.content
    assert len(entries) == 24 and len(content) > 0
    joined = b"".join(bytes(e.bytes) for e in entries)
    assert joined.decode(errors="replace") == content
    for entry in entries + [top for e in entries for top in e.top_logprobs]:
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
        assert "Ġ" not in entry.token and "Ċ" not in entry.token
