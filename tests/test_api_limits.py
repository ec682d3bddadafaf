"""Edges of the public API: ids past the tokenizer, the exact context limits, stream() of a batch,
and every public argument checked up front with an InputError that says what was expected.

Oracles: transformers' LlavaForConditionalGeneration (ids, logits) and tokenizer (decode), on tiny random
checkpoints with a 64-position context so a whole-context forward takes milliseconds. Both kernel backends:
`LLAVA_FAST_KERNELS=triton pytest tests/test_api_limits.py` runs it on the Triton kernels.
"""

import math

import checkpoints as ck
import PIL.Image
import pytest
import torch
from checkpoints import DEVICE

import llava_fast
from llava_fast.errors import InputError

CONTEXT = 64
PADDED_ID = 32050  # a row of llava-hf's lm_head (32,064 rows) that the tokenizer (32,002 tokens) does not know
PROMPT = "Describe it."


@pytest.fixture(scope="module")
def hf_and_model(tmp_path_factory):
    hf = ck.make_hf_model(seed=13, max_positions=CONTEXT)
    path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("limits")), "hub")
    return hf, llava_fast.load(path, device=DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def padded_favouring(tmp_path_factory):
    """A checkpoint whose lm_head row PADDED_ID wins the first step of PROMPT (logit 60 against ~0.1): its
    row is set to 60 h / |h|^2, h the final hidden state at the prompt's last position."""
    hf = ck.make_hf_model(seed=14, max_positions=CONTEXT)
    path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("plain")), "hub")
    ids = llava_fast.load(path, device="cpu").encode_prompt(PROMPT)
    lm_head = hf.lm_head if hasattr(hf, "lm_head") else hf.language_model.lm_head
    seen = []
    handle = lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0][0, -1].detach()))
    with torch.no_grad():
        hf(input_ids=torch.tensor([ids]))
        handle.remove()
        h = seen[0]
        lm_head.weight[PADDED_ID] = 60 * h / h.dot(h)
    path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("padded")), "hub")
    return hf, llava_fast.load(path, device=DEVICE, dtype="float32"), ids


# ------------------------------------------------------------------------------------------------------
# 1. Ids past the tokenizer's vocabulary
# ------------------------------------------------------------------------------------------------------


def test_padded_vocabulary_ids_greedy_match_transformers(padded_favouring, reference_dir):
    from transformers import AutoTokenizer

    hf, model, ids = padded_favouring
    assert model.config.text.vocab_size == 32064 and model.tokenizer.vocab_size == 32002
    got = model.generate_ids([ids], max_new_tokens=5, eos_token_id=None)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                          pad_token_id=32001)[0, len(ids):].tolist()
    assert got == ref and got[0] == PADDED_ID  # the id comes back, as transformers returns it
    hf_tok = AutoTokenizer.from_pretrained(f"{reference_dir}/tokenizer")
    text = model.generate(PROMPT, max_new_tokens=5)
    # The padded id decodes to nothing, as in transformers; the rest of the text is unchanged.
    assert text == hf_tok.decode(ref, skip_special_tokens=True) == model.tokenizer.decode(got)
    assert "".join(model.stream(PROMPT, max_new_tokens=5)) == text
    assert model.chat(max_new_tokens=5).ask(PROMPT) == text


def test_padded_vocabulary_ids_sampled(padded_favouring):
    _, model, ids = padded_favouring
    kw = dict(max_new_tokens=6, temperature=1.5, seed=3)
    got = model.generate_ids([ids], **kw)[0]
    assert got[0] == PADDED_ID and max(got) < 32064
    text = model.generate(PROMPT, **kw, stop=[])  # the same draws: the same ids, ending at EOS if drawn
    assert text == model.tokenizer.decode(got)
    assert "".join(model.stream(PROMPT, **kw)) == text
    steps = list(model.stream([PROMPT, PROMPT], **kw))  # a batch: each row may draw padded ids too
    assert ["".join(s[i] for s in steps) for i in range(2)] == model.generate([PROMPT, PROMPT], **kw)


# ------------------------------------------------------------------------------------------------------
# 4. Exact context limits, both sides of the boundary
# ------------------------------------------------------------------------------------------------------


def test_logits_over_exactly_the_whole_context_match_transformers(hf_and_model):
    hf, model = hf_and_model
    g = torch.Generator().manual_seed(0)
    n = model.num_image_tokens
    row = [1] + torch.randint(3, 32000, (20,), generator=g).tolist() + [32000] * n
    row += torch.randint(3, 32000, (CONTEXT - len(row),), generator=g).tolist()
    assert len(row) == CONTEXT == model.context_length
    pixels = ck.random_pixels(1, model.config.vision.image_size, seed=4)
    ours = model.logits([row], pixels).cpu()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([row]), pixel_values=pixels).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match=f"{CONTEXT + 1} tokens exceed the context length of {CONTEXT}"):
        model.logits([row + [5]], pixels)


def test_generation_fills_the_context_and_one_more_is_refused(hf_and_model):
    """prompt + max_new_tokens = context + 1 needs `context` positions: the last new token is never fed back."""
    hf, model = hf_and_model
    prompt = "Describe it in detail: " + " ".join(["the red bus"] * 13)  # a long prompt, a few new tokens
    ids = model.encode_prompt(prompt)
    new = CONTEXT + 1 - len(ids)
    assert 3 <= new <= 12
    got = model.generate_ids([ids], max_new_tokens=new, eos_token_id=None)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=32001)[0, len(ids):].tolist()
    assert got == ref and len(got) == new
    text = model.generate(prompt, max_new_tokens=new, stop=[])
    assert text == model.tokenizer.decode(ref[: ref.index(2) + 1] if 2 in ref else ref)
    assert model.chat(max_new_tokens=new).ask(prompt) == text
    for call in (lambda: model.generate_ids([ids], max_new_tokens=new + 1),
                 lambda: model.generate(prompt, max_new_tokens=new + 1),
                 lambda: model.stream(prompt, max_new_tokens=new + 1),
                 lambda: model.chat(max_new_tokens=new + 1).ask(prompt)):
        with pytest.raises(InputError, match=f"needs {CONTEXT + 1} positions, more than the context length"):
            call()


def test_bench_contexts_use_the_same_limit():
    from llava_fast.bench.generate_bench import resolve_contexts

    assert resolve_contexts([60], 10, CONTEXT, 5, explicit=True)[0] == [60]  # 60 + 5 - 1 = 64 positions
    with pytest.raises(InputError, match="exceeds"):
        resolve_contexts([60], 10, CONTEXT, 6, explicit=True)


# ------------------------------------------------------------------------------------------------------
# 7. stream() of a batch, and every public argument checked up front
# ------------------------------------------------------------------------------------------------------


def test_stream_of_a_batch_yields_every_row(hf_and_model):
    _, model = hf_and_model
    prompts = ["Hi", "Write a poem."]
    steps = list(model.stream(prompts, max_new_tokens=6))
    assert all(isinstance(s, list) and len(s) == 2 for s in steps)
    texts = ["".join(s[i] for s in steps) for i in range(2)]
    assert texts == model.generate(prompts, max_new_tokens=6)
    assert texts[1] and texts[1] == model.generate("Write a poem.", max_new_tokens=6)


BAD_GENERATION = [
    (dict(max_new_tokens=5.0), "max_new_tokens must be a positive integer, got 5.0"),
    (dict(max_new_tokens="5"), "max_new_tokens must be a positive integer, got '5'"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    (dict(temperature="0.7"), "temperature must be a finite number >= 0"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(top_p=0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2**70), "seed must be an integer in"),
    (dict(stop=5), "stop must be a string or a list of strings"),
    (dict(stop=["a", 1]), "stop must be a string or a list of strings"),
    (dict(template=3), "template must be a template name"),
    (dict(template="nope"), "unknown chat template 'nope'"),
    (dict(system=3), "system must be a string"),
]


@pytest.mark.parametrize("kwargs, message", BAD_GENERATION, ids=[f"{k}={v!r}" for (d, _) in BAD_GENERATION
                                                                   for k, v in d.items()])
def test_bad_generation_arguments_fail_up_front(hf_and_model, kwargs, message):
    _, model = hf_and_model
    full = dict(max_new_tokens=2, **{k: v for k, v in kwargs.items()}) if "max_new_tokens" not in kwargs else kwargs
    for call in (model.generate, model.stream):  # stream: when called, not at the first next()
        with pytest.raises(InputError, match=message):
            call("Hi", **full)
    with pytest.raises(InputError, match=message):
        model.chat(**full)
    sampling = {k: v for k, v in full.items() if k not in ("stop", "template", "system")}
    if sampling != dict(max_new_tokens=2):
        with pytest.raises(InputError, match=message):
            model.generate_ids([[1, 15043]], **sampling)


def test_valid_zeros_are_kept(hf_and_model):
    _, model = hf_and_model
    greedy = model.generate("Hi", max_new_tokens=4)
    assert model.generate("Hi", max_new_tokens=4, temperature=0, top_k=0, seed=0) == greedy
    assert model.generate("Hi", max_new_tokens=4, temperature=1.0, seed=0) == \
        model.generate("Hi", max_new_tokens=4, temperature=1.0, seed=0)


def test_bad_prompts_rows_and_pixels(hf_and_model):
    _, model = hf_and_model
    size = model.config.vision.image_size
    for prompts in (5, None, [1, 2]):
        with pytest.raises(InputError, match="prompts must be a string"):
            model.generate(prompts, max_new_tokens=2)
    with pytest.raises(InputError, match="a chat turn must be a string"):
        model.chat(max_new_tokens=2).ask(5)
    bad_ids = [([[1, 2.5]], "integer token ids, got 2.5"), ("abc", "list of rows"), ([1, 2], "list of rows"),
               (torch.ones(1, 3), "integer tensor")]
    for rows, message in bad_ids:
        with pytest.raises(InputError, match=message):
            model.generate_ids(rows, max_new_tokens=2)
    with pytest.raises(InputError, match="integer tensor"):
        model.logits(torch.ones(1, 3))
    with pytest.raises(InputError, match="one length"):
        model.logits([[1, 2], [1]])
    with pytest.raises(InputError, match=f"float tensor of shape \\(N, 3, {size}, {size}\\)"):
        model.generate_ids([[1] + [32000] * model.num_image_tokens], torch.zeros(1, 3, 5, 5), max_new_tokens=2)
    with pytest.raises(InputError, match="float tensor of shape"):
        model.logits([[1, 2]], "pixels")
    with pytest.raises(InputError, match="eos_token_id must be"):
        model.generate_ids([[1, 2]], max_new_tokens=2, eos_token_id="eos")
    assert model.logits(torch.tensor([1, 15043])).shape == (1, 2, 32064)  # one row as a 1-D tensor


def test_non_finite_pixels_and_nested_image_lists_are_refused(hf_and_model):
    """NaN pixels gave NaN logits (token 0 over and over) without a word; a list inside one prompt's image list
    was counted as one image ("1 image was given")."""
    _, model = hf_and_model
    size = model.config.vision.image_size
    ids = [1] + [model.image_token_id] * model.num_image_tokens + [15043]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model.logits([ids, ids], pixels)).all()  # finite pixels: the same call runs
    for value in (math.nan, math.inf, -math.inf):
        bad = pixels.clone()
        bad[1, 2, size - 1, 0] = value
        with pytest.raises(InputError, match=r"pixel_values hold 1 non-finite value \(NaN or inf\) of "):
            model.logits([ids, ids], bad)
        with pytest.raises(InputError, match="non-finite"):
            model.generate_ids([ids, ids], bad, max_new_tokens=2)
    image = PIL.Image.new("RGB", (20, 30), (200, 10, 90))
    with pytest.raises(InputError, match=r"images\[0\] is a list of 2: one prompt's images are None, an image or a "
                       "flat list"):
        model.generate("<image> and <image>", [[image, image]], max_new_tokens=2)
    with pytest.raises(InputError, match=r"images\[1\]\[0\] is a list of 3"):
        model.generate(["Hi", "<image> <image> <image>"], [None, [(image, image, image)]], max_new_tokens=2)


def test_bad_load_arguments(tmp_path):
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        llava_fast.load(str(tmp_path), device="gpu")
    with pytest.raises(InputError, match="unsupported dtype torch.int8"):
        llava_fast.load(str(tmp_path), device="cpu", dtype=torch.int8)
    with pytest.raises(llava_fast.CheckpointError, match="/no/such: not a checkpoint directory"):
        llava_fast.load("/no/such")  # "/no/such" is no hub id (org/name) either
    (tmp_path / "adapter_config.json").write_text("{}")  # what train --lora-r writes, beside its adapter weights
    with pytest.raises(llava_fast.CheckpointError, match=f"{tmp_path}: a LoRA adapter .adapter_config.json., not "
                       f"a whole checkpoint: fold it into its base model with `llava-fast merge-lora --adapter "
                       f"{tmp_path}"):
        llava_fast.load(str(tmp_path), device="cpu")
