"""The API programs embed: generate/stream/chat/generate_ids, sampling, stop strings, EOS, and bad inputs.

Runs on a tiny random llava-hf checkpoint (ViT at 28 px: 4 image tokens) with the real LLaMA tokenizer.
"""

import json
import os
import shutil

import checkpoints as ck
import pytest
import torch
from checkpoints import DEVICE

import llava_fast
from llava_fast.errors import CheckpointError, ImageError, InputError
from llava_fast.generate import Sampling, sample_next_token

IMAGES = [os.path.join(ck.IMAGE_DIR, n) for n in ("extreme_ironing.jpg", "waterview.jpg", "llama_cute.jpg")]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    hf = ck.make_hf_model(seed=11, gqa=True)
    return ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("api")), "hub")


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return llava_fast.load(ckpt_dir, device=DEVICE, dtype="float32")


def test_the_package_offers_its_public_names_only():
    """dir(llava_fast) (tab completion, help()) listed `importlib`, an implementation detail, as a public name."""
    public = [name for name in dir(llava_fast) if not name.startswith("_")]
    assert public == sorted(llava_fast.__all__) and "load" in public and "importlib" not in public
    assert all(getattr(llava_fast, name) is not None for name in public)


def test_load_exposes_model_facts(model):
    assert model.image_token_id == 32000
    assert model.num_image_tokens == 4  # (28 / 14)^2 patches, CLS dropped
    assert model.config.template == "llava_hf"
    assert model.tokenizer.eos_token_id == 2
    assert model.context_length == 512


def test_batched_generate_equals_each_prompt_alone(model):
    prompts = ["What is unusual about this image?", "Write one word.", "Compare <image> with <image> please"]
    images = [IMAGES[0], None, [IMAGES[1], IMAGES[2]]]
    batched = model.generate(prompts, images, max_new_tokens=12)
    alone = [model.generate(p, im, max_new_tokens=12) for p, im in zip(prompts, images)]
    assert batched == alone
    assert all(isinstance(t, str) and t for t in batched)


def test_generate_text_is_the_decoded_generate_ids(model):
    rows = [model.encode_prompt("Describe the scene.", 1)]
    pv = model.pixel_values([IMAGES[1]])
    ids = model.generate_ids(rows, pv, max_new_tokens=10)[0]
    text = model.generate("Describe the scene.", IMAGES[1], max_new_tokens=10)
    assert text == model.tokenizer.decode(ids)


def test_marker_is_prepended_for_one_image_without_one(model):
    a = model.generate("Describe it.", IMAGES[0], max_new_tokens=6)
    b = model.generate("<image>\nDescribe it.", IMAGES[0], max_new_tokens=6)
    assert a == b
    assert model.encode_prompt("Describe it.", 1) == model.encode_prompt("<image>\nDescribe it.", 1)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.8, top_p=0.9, seed=5), dict(temperature=1.0, top_k=20,
                                                                                           seed=1)])
def test_stream_concatenates_to_generate(model, kwargs):
    pieces = list(model.stream("Tell me a story.", IMAGES[2], max_new_tokens=16, **kwargs))
    assert "".join(pieces) == model.generate("Tell me a story.", IMAGES[2], max_new_tokens=16, **kwargs)
    assert len(pieces) > 1


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    kw = dict(max_new_tokens=12, temperature=1.0)
    first = model.generate("Say something.", seed=123, **kw)
    assert model.generate("Say something.", seed=123, **kw) == first
    others = {model.generate("Say something.", seed=s, **kw) for s in range(4)}
    assert len(others) > 1  # a random model's next-token distribution is broad: seeds must matter


def test_top_k_one_is_greedy(model):
    greedy = model.generate("Hello", max_new_tokens=10)
    assert model.generate("Hello", max_new_tokens=10, temperature=0.7, top_k=1, seed=3) == greedy


def test_sampler_matches_the_filtered_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 9) * 2
    sampling = Sampling(temperature=0.7, top_k=6, top_p=0.8, seed=0)
    # Independent reference of the filtered distribution.
    scaled = logits[0] / 0.7
    keep = torch.zeros(9, dtype=torch.bool)
    keep[scaled.topk(6).indices] = True
    probs = torch.where(keep, scaled, torch.tensor(float("-inf"))).softmax(-1)
    order = probs.argsort(descending=True)
    mass, nucleus = 0.0, []
    for i in order.tolist():
        if mass >= 0.8:
            break
        nucleus.append(i)
        mass += probs[i].item()
    expected = torch.zeros(9)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    g = sampling.generator(torch.device("cpu"))
    draws = torch.stack([sample_next_token(logits.expand(4000, 9), sampling, g) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=9).float() / draws.numel()
    assert set(draws.unique().tolist()) <= set(nucleus)
    assert (freq - expected).abs().max() < 0.015


def test_tiny_temperature_and_top_p_sample_the_top_token_not_id_0():
    """temperature 1e-300 divided the logits by a float32 0, and top_p 1e-300 (a float32 0) dropped every token:
    each drew id 0 whatever the logits. Below 1e-5 the temperature is greedy; top_p keeps the top token."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    greedy = logits.argmax(-1)
    assert (greedy != 0).all()
    for kw in (dict(temperature=1e-300), dict(temperature=9e-6), dict(temperature=1.0, top_p=1e-300),
               dict(temperature=0.5, top_p=1e-9)):
        sampling = Sampling(seed=0, **kw)
        draws = sample_next_token(logits.repeat(20, 1), sampling, sampling.generator(torch.device("cpu")))
        assert torch.equal(draws, greedy.repeat(20)), kw
    assert Sampling(temperature=1e-300).temperature == 0 and Sampling(temperature=1e-5).temperature == 1e-5


def test_bad_sampling_settings_are_input_errors(model):
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(InputError):
            model.generate("hi", max_new_tokens=2, **kw)


def test_stop_strings_cut_the_text_in_generate_and_stream(model):
    full = model.generate("Describe everything.", IMAGES[0], max_new_tokens=24)
    stop = full[6:9]
    assert stop and len(full) > 12
    expected = full[: full.index(stop)]
    assert model.generate("Describe everything.", IMAGES[0], max_new_tokens=24, stop=[stop]) == expected
    pieces = list(model.stream("Describe everything.", IMAGES[0], max_new_tokens=24, stop=stop))
    assert "".join(pieces) == expected
    assert all(stop not in p for p in pieces)


def test_eos_ends_a_row(model, monkeypatch):
    rows = [model.encode_prompt("Describe it.", 1), model.encode_prompt("Count to ten.", 0)]
    pv = model.pixel_values([IMAGES[0]])
    free = model.generate_ids(rows, pv, max_new_tokens=10, eos_token_id=None)
    eos = free[0][3]
    cut = model.generate_ids(rows, pv, max_new_tokens=10, eos_token_id=eos)
    assert cut[0] == free[0][: free[0].index(eos) + 1]  # ends with EOS, nothing after it
    assert cut[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])
    monkeypatch.setattr(model.tokenizer, "eos_token_ids", (eos,))
    text = model.generate("Describe it.", IMAGES[0], max_new_tokens=10)
    assert text == model.tokenizer.decode(free[0][: free[0].index(eos)])


def test_chat_equals_the_whole_conversation_in_one_prompt(model):
    session = model.chat(IMAGES[1], max_new_tokens=8)
    a1 = session.ask("What is in the picture?")
    a2 = session.ask("And what colour is it?")
    second_turn_prefill = model.last_stats["prompt_tokens"]
    history = [("user", "What is in the picture?"), ("assistant", a1), ("user", "And what colour is it?")]
    assert model.generate(history, IMAGES[1], max_new_tokens=8) == a2
    full = model.encode_prompt(history, 1)
    assert second_turn_prefill < len(full) - model.num_image_tokens  # the cached first turn was not recomputed
    a3 = session.ask("Thanks.")
    history += [("assistant", a2), ("user", "Thanks.")]
    assert model.generate(history, IMAGES[1], max_new_tokens=8) == a3


def test_chat_streams_its_reply_and_an_unfinished_turn_leaves_the_chat_as_it_was(model):
    first, second = "What is in the picture?", "And what colour is it?"
    asked = model.chat(IMAGES[1], max_new_tokens=8)
    replies = [asked.ask(first), asked.ask(second)]
    streamed = model.chat(IMAGES[1], max_new_tokens=8)
    pieces = list(streamed.stream(first))
    assert len(pieces) > 1 and "".join(pieces) == replies[0]
    # A second turn stopped after one piece (a client gone, Ctrl-C): the chat holds the first turn only, and the
    # same question asked again gets the reply an uninterrupted chat gave.
    partial = streamed.stream(second)
    next(partial)
    partial.close()
    assert streamed.messages == [("user", first), ("assistant", replies[0])]
    assert streamed.ask(second) == replies[1]
    assert streamed.ask("Thanks.") == asked.ask("Thanks.")


@pytest.fixture(scope="module")
def image_text_model(tmp_path_factory):
    """A checkpoint whose greedy next token depends on the current token alone (every attention and MLP output
    is zero, so the last hidden state is the token's embedding) and whose lm_head spells " <image>" then EOS
    after "ASSISTANT:"'s ":": its replies hold the text "<image>"."""
    hf = ck.make_hf_model(seed=12, gqa=True)
    lm = hf.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.lm_head.weight.zero_()
        for current, following in ((29901, 529), (529, 3027), (3027, 29958), (29958, 2)):  # ":" "▁<" "image" ">"
            x = lm.embed_tokens.weight[current]
            final = x * torch.rsqrt(x.pow(2).mean() + hf.config.text_config.rms_norm_eps) * lm.norm.weight
            hf.lm_head.weight[following] = 10 * final / final.norm()
    path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("image-text")), "hub")
    return llava_fast.load(path, device=DEVICE, dtype="float32")


def test_a_reply_that_writes_image_is_text_in_the_next_turns(image_text_model):
    """A reply holding the text "<image>" counted as an image marker in every later turn of the chat: without an
    image each of them failed ("1 <image> marker but 0 images"), the chat was over; with one, the image moved
    from the first user turn into that reply."""
    from llava_fast.prompts.messages import split_openai_messages

    model = image_text_model
    text_only = model.chat(None, max_new_tokens=6)
    assert text_only.ask("Hi").strip() == "<image>"
    assert text_only.ask("What did you mean?").strip() == "<image>"
    session = model.chat(IMAGES[1], max_new_tokens=6)
    first = session.ask("Hi")
    assert first.strip() == "<image>"
    second = session.ask("What did you mean?")
    assert session.messages == [("user", "Hi"), ("assistant", first), ("user", "What did you mean?"),
                                ("assistant", second)]
    as_messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGES[1]}},
                                                {"type": "text", "text": "Hi"}]},
                   {"role": "assistant", "content": first}, {"role": "user", "content": "What did you mean?"}]
    prompt = model.encode_prompt(split_openai_messages(as_messages)[0], 1)
    assert prompt.index(model.image_token_id) < prompt.index(13566)  # before the first "ASSISTANT" ("ANT")
    assert session.cached_ids[:len(prompt)] == prompt  # the second turn's prompt, as the cache holds it
    assert second == model.generate(as_messages, max_new_tokens=6)
    as_pairs = [("user", "Hi"), ("assistant", first), ("user", "What did you mean?")]
    assert model.encode_prompt(as_pairs, 1) == prompt  # (role, text) pairs: a reply's "<image>" is text there too


def test_image_typed_in_a_later_chat_turn_is_text(model):
    """A later turn's "<image>" was refused ("images belong to the first turn"), where a server's text part or a
    reply keeps it as text: it is text here too, the prompt's one image stays in the first turn."""
    from llava_fast.prompts.messages import split_openai_messages

    session = model.chat(IMAGES[0], max_new_tokens=4)
    first = session.ask("Hi")
    question = "Is <image> a tag?"
    second = session.ask(question)
    assert session.messages[2] == ("user", question)  # the turn as typed
    as_messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGES[0]}},
                                                {"type": "text", "text": "Hi"}]},
                   {"role": "assistant", "content": first}, {"role": "user", "content": question}]
    prompt = model.encode_prompt(split_openai_messages(as_messages)[0], 1)
    assert prompt.count(model.image_token_id) == model.num_image_tokens  # one image, none for the typed text
    assert "<image> a tag?" in model.tokenizer.decode(prompt[prompt.index(model.image_token_id) +
                                                             model.num_image_tokens:])
    assert session.cached_ids[:len(prompt)] == prompt
    assert second == model.generate(as_messages, max_new_tokens=4)


# ------------------------------------------------------------------------------------------------------
# Bad inputs: one exception type each, a message naming the problem
# ------------------------------------------------------------------------------------------------------


def test_missing_and_corrupt_images(model, tmp_path):
    with pytest.raises(ImageError, match="nope.jpg"):
        model.generate("Describe.", str(tmp_path / "nope.jpg"), max_new_tokens=2)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    with pytest.raises(ImageError, match="corrupt.jpg"):
        model.generate("Describe.", str(corrupt), max_new_tokens=2)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(IMAGES[0], "rb").read()[:3000])
    with pytest.raises(ImageError, match="truncated.jpg"):
        model.generate("Describe.", str(truncated), max_new_tokens=2)


def test_chat_reads_its_image_when_it_starts(model, tmp_path):
    """A missing image fails at chat(), not at the first turn (a chat that never gets a turn would say nothing)."""
    with pytest.raises(ImageError, match="image file not found: .*nope.jpg"):
        model.chat(str(tmp_path / "nope.jpg"))


def test_image_count_mismatches(model):
    with pytest.raises(InputError, match="has 1 <image> marker but 2 images were given"):
        model.generate("<image>\nWhat is this?", [IMAGES[0], IMAGES[1]], max_new_tokens=2)
    with pytest.raises(InputError, match="has 2 <image> markers but 1 image was given"):
        model.generate("<image> and <image>?", IMAGES[0], max_new_tokens=2)
    with pytest.raises(InputError, match="has 1 <image> marker but 0 images were given"):
        model.generate("<image>\nWhat is this?", max_new_tokens=2)
    with pytest.raises(InputError, match="2 prompts"):
        model.generate(["a", "b"], [IMAGES[0]], max_new_tokens=2)
    rows = [model.encode_prompt("x", 1)]
    with pytest.raises(InputError, match="image-token positions"):
        model.generate_ids(rows, model.pixel_values(IMAGES[:2]), max_new_tokens=2)


def test_malformed_messages_are_input_errors(model):
    """A message that is not a (role, text) pair of strings is named; it was an IndexError or AttributeError."""
    for messages, words in (([("user",)], "message 0 must be a (role, text) pair, got ('user',)"),
                            ([("user", "a", "b")], "message 0 must be a (role, text) pair"),
                            ([("user", 5)], "message 0 text must be a string, got int"),
                            ([("user", "Hi"), ("assistant", None), ("user", "And?")],
                             "message 1 text must be a string, got NoneType")):
        with pytest.raises(InputError) as err:
            model.generate(messages, max_new_tokens=2)
        assert words in str(err.value), (messages, str(err.value))


def test_prompt_too_long_for_the_context(model):
    with pytest.raises(InputError, match="context length of 512"):
        model.generate("Describe.", IMAGES[0], max_new_tokens=500)
    # "row 0: prompt of ..." named a batch row no one had written (a single prompt, a chat turn); a batch
    # still names its row.
    n = len(model.encode_prompt("Describe.", 1))
    with pytest.raises(InputError) as err:
        model.generate("Describe.", IMAGES[0], max_new_tokens=500)
    assert str(err.value) == (f"the prompt has {n} tokens; with max_new_tokens=500 it needs {n + 499} positions, "
                              "more than the context length of 512 tokens")
    with pytest.raises(InputError, match="^row 1 has"):
        model.generate(["Hi.", "Describe. " * 100], [None, None], max_new_tokens=300)
    with pytest.raises(InputError, match="max_new_tokens"):
        model.generate("Describe.", max_new_tokens=0)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.generate_ids([[1, 5, 99999]], max_new_tokens=2)


def test_unknown_template(model):
    with pytest.raises(InputError, match="no_such_template"):
        model.generate("hi", template="no_such_template", max_new_tokens=2)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_checkpoint_with_missing_shard(ckpt_dir, tmp_path):
    bad = _copy(ckpt_dir, tmp_path / "ck")
    os.remove(os.path.join(bad, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        llava_fast.load(bad, device=DEVICE)


def test_checkpoint_with_missing_unexpected_and_misshapen_weights(ckpt_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    def rewrite(edit, name):
        bad = _copy(ckpt_dir, tmp_path / name)
        shard = os.path.join(bad, "model-00001-of-00002.safetensors")
        state = load_file(shard)
        edit(state)
        save_file(state, shard, metadata={"format": "pt"})
        return bad

    key = next(k for k in load_file(os.path.join(ckpt_dir, "model-00001-of-00002.safetensors")) if "weight" in k)
    with pytest.raises(CheckpointError, match="missing weights"):
        llava_fast.load(rewrite(lambda s: s.pop(key), "missing"), device=DEVICE)
    with pytest.raises(CheckpointError, match="unexpected weights.*surprise"):
        llava_fast.load(rewrite(lambda s: s.update({"surprise.weight": torch.ones(2)}), "extra"), device=DEVICE)
    with pytest.raises(CheckpointError, match="has shape"):
        llava_fast.load(rewrite(lambda s: s.update({key: torch.ones(3, 3)}), "shape"), device=DEVICE)
    bad = _copy(ckpt_dir, tmp_path / "corrupt")
    with open(os.path.join(bad, "model-00001-of-00002.safetensors"), "r+b") as f:
        f.truncate(200)
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        llava_fast.load(bad, device=DEVICE)


def test_unknown_architecture_and_not_a_checkpoint(ckpt_dir, tmp_path):
    bad = _copy(ckpt_dir, tmp_path / "arch")
    cfg_path = os.path.join(bad, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        llava_fast.load(bad, device=DEVICE)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        llava_fast.load(str(tmp_path / "nowhere"), device=DEVICE)
    os.remove(os.path.join(bad, "config.json"))
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        llava_fast.load(bad, device=DEVICE)


def test_original_checkpoint_needs_its_vision_tower(tmp_path):
    hf = ck.make_hf_model(seed=2)
    path = ck.write_checkpoint(hf, str(tmp_path / "orig"), "original")
    shutil.move(os.path.join(path, "clip"), str(tmp_path / "clip-elsewhere"))
    with pytest.raises(CheckpointError, match="vision_tower"):
        llava_fast.load(path, device=DEVICE)
    # transformers 5's CLIPVisionModel.save_pretrained writes the tower's names with no vision_model prefix.
    from safetensors.torch import load_file, save_file

    clip_weights = str(tmp_path / "clip-elsewhere" / "model.safetensors")
    save_file({k.removeprefix("vision_model."): v for k, v in load_file(clip_weights).items()}, clip_weights)
    model = llava_fast.load(path, device=DEVICE, vision_tower=str(tmp_path / "clip-elsewhere"))
    assert model.config.template == "vicuna_v1" and model.processor.image_aspect_ratio == "pad"
    assert model.generate("Describe.", IMAGES[0], max_new_tokens=3)


def test_half_precision_load_tracks_float32(ckpt_dir, model):
    half = llava_fast.load(ckpt_dir, device=DEVICE, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    rows = [model.encode_prompt("Describe.", 1)]
    pv = model.pixel_values([IMAGES[0]])
    ref, got = model.logits(rows, pv), half.logits(rows, pv)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def _stream_ids(model, rows, pv, sync_every, eos):
    steps = model._stream_rows(rows, pv, max_new_tokens=12, sampling=Sampling(), stop=[], eos_token_id=eos,
                               sync_every=sync_every)
    texts = ["" for _ in rows]
    while True:
        try:
            texts = [t + d for t, d in zip(texts, next(steps))]
        except StopIteration as done:
            return done.value, texts


def test_reading_tokens_back_in_chunks_changes_nothing(model):
    """On a GPU new tokens are read back every 16 steps; rows that end mid-chunk must end exactly where they
    would have with a read-back every step."""
    rows = [model.encode_prompt("Describe it.", 1), model.encode_prompt("Count to ten.", 0)]
    pv = model.pixel_values([IMAGES[0]])
    free = model.generate_ids(rows, pv, max_new_tokens=12, eos_token_id=None)
    eos = free[0][4]  # ends row 0 inside a chunk
    per_step = _stream_ids(model, rows, pv, 1, eos)
    assert per_step[0][0] == free[0][: free[0].index(eos) + 1]
    for every in (3, 5, 16):
        assert _stream_ids(model, rows, pv, every, eos) == per_step


def test_legitimately_unused_weights_are_skipped(ckpt_dir, tmp_path):
    """Older transformers saved CLIP's position_ids and LLaMA's rotary inv_freq buffers: not errors."""
    from safetensors.torch import load_file, save_file

    path = _copy(ckpt_dir, tmp_path / "buffers")
    shard = os.path.join(path, "model-00001-of-00002.safetensors")
    state = load_file(shard)
    state["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(state, shard, metadata={"format": "pt"})
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert llava_fast.load(path, device=DEVICE).generate("hi", max_new_tokens=2) is not None
    assert "vision_tower.vision_model.post_layernorm.weight" in index["weight_map"]  # present, and skipped


def test_hub_id_without_huggingface_hub_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match="install huggingface_hub"):
        llava_fast.load("llava-hf/llava-1.5-7b-hf")
