"""bench/random_checkpoint.py at the tiny preset's shapes: transformers (the oracle, as vLLM reads the same files)
loads every tensor with none missing, its processor renders and expands the prompt as llava-fast does, and both
engines give the same logits for an image prompt; the hand-written safetensors shards read back through the
safetensors library with the draw's statistics; a seed writes the same bytes."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import llava_fast
from llava_fast.bench import random_checkpoint
from llava_fast.errors import InputError


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny-hf"))
    total = random_checkpoint.write_checkpoint("tiny", out, dtype=torch.bfloat16, seed=3, shard_bytes=30 * 2**20)
    return out, total


def test_shards_read_back_with_the_draws_statistics(written):
    from safetensors import safe_open

    out, total = written
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    # 108 MB in shards of at most 30 MiB, a tensor larger than that (the 33 MB embedding) alone in its shard
    assert files == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    seen, nbytes = {}, 0
    for file in files:
        with safe_open(os.path.join(out, file), "pt") as f:
            for name in f.keys():
                seen[name] = f.get_tensor(name)
                nbytes += seen[name].numel() * 2
    assert nbytes == total == index["metadata"]["total_size"] and set(seen) == set(index["weight_map"])
    assert all(t.dtype == torch.bfloat16 for t in seen.values())
    assert seen["language_model.model.embed_tokens.weight"].shape == (32064, 512)
    assert seen["language_model.model.layers.5.self_attn.k_proj.weight"].shape == (256, 512)  # GQA 8/4
    assert torch.equal(seen["vision_tower.vision_model.encoder.layers.3.layer_norm2.weight"], torch.ones(256))
    assert torch.equal(seen["multi_modal_projector.linear_2.bias"], torch.zeros(512))
    w = seen["language_model.model.layers.2.mlp.down_proj.weight"].float()
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    v = seen["language_model.model.layers.3.mlp.down_proj.weight"].float()
    assert not torch.equal(w, v)  # each tensor its own draw


def test_a_seed_writes_the_same_bytes(tmp_path):
    def digest(seed, name):
        out = str(tmp_path / name)
        random_checkpoint.write_checkpoint("tiny", out, dtype=torch.bfloat16, seed=seed)
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    assert digest(5, "a") == digest(5, "b") != digest(6, "c")
    with pytest.raises(InputError, match="already holds a checkpoint"):
        random_checkpoint.write_checkpoint("tiny", str(tmp_path / "a"))
    with pytest.raises(InputError, match="only LLaVA-1.5 presets"):
        random_checkpoint.write_checkpoint("tiny-next", str(tmp_path / "d"))


def test_transformers_and_llava_fast_read_the_same_model(written):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, _ = written
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    processor = AutoProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (180, 260, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is unusual here?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")

    model = llava_fast.load(out, device="cpu", dtype="float32")
    ids = model.encode_prompt("<image>\nWhat is unusual here?", 1)
    assert ids == inputs["input_ids"][0].tolist() and ids.count(32000) == 256  # 224 px / 14: 16 x 16 patches
    pixels = model.pixel_values([image])
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=2e-2, rtol=0)  # PIL vs torch bicubic resize
    ours = model.logits([ids], inputs["pixel_values"])
    with torch.no_grad():
        ref = hf(**inputs).logits
    assert torch.isfinite(ref).all() and ref.std() > 0.1  # the random model's logits are not flat
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
