"""A preset's shapes as a random-weight checkpoint on disk in the llava-hf layout, so that engines which only read
files (vLLM, transformers) run beside llava-fast on the same weights.

In: a preset name (llava_fast.presets: llava-1.5-7b, tiny, ...; LLaVA-1.5 presets only, no AnyRes), a directory,
a dtype and a seed.
Out, in the directory, what llava-hf/llava-1.5-7b-hf ships: config.json (transformers' LlavaConfig), the weights
as model-0000i-of-0000n.safetensors shards with model.safetensors.index.json (llava-hf's names:
language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, multi_modal_projector.*), the
bundled LLaMA tokenizer (<image> = 32000, <pad> = 32001), generation_config.json, preprocessor_config.json
(CLIPImageProcessor at the tower's size), processor_config.json and chat_template.json (llava-hf's template).

Written one tensor at a time: each shard's safetensors header is computed from the shapes first, then every
tensor is drawn and appended, so host memory holds one tensor (the 7B's largest, the 32,064 x 4,096 embedding,
is 263 MB in bfloat16 plus its float32 draw), never the 14 GB model.
Values as presets.random_init_ (the statistics of a trained transformer, so 32 layers' activations stay finite):
weights N(0, 0.02), norm weights 1, biases 0; tensor i drawn from its own generator seeded with seed * 2**20 + i,
so a seed always writes the same bytes.

    python -m llava_fast.bench.random_checkpoint --preset llava-1.5-7b --out DIR [--dtype bfloat16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys

import torch

from llava_fast.errors import InputError
from llava_fast.presets import BUNDLED_TOKENIZER, preset_config

# llava-hf/llava-1.5-7b-hf's chat_template.json: content parts, images first.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in"
    " message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size (5 GB): the 7B in bfloat16 is 3 shards


def hub_names(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(llava-hf name, shape) of every tensor of the preset, in the model's order; plus the CLIP tower's
    post_layernorm, which llava-hf checkpoints carry though LLaVA never reads it."""
    from llava_fast.model import LlavaForCausalLM

    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    out = []
    for name, t in net.state_dict().items():
        if name.startswith("vision_tower."):
            name = "vision_tower.vision_model." + name[len("vision_tower."):]
        elif name.startswith("language_model."):
            name = "language_model.model." + name[len("language_model."):]
        elif name.startswith("lm_head."):
            name = "language_model." + name
        out.append((name, tuple(t.shape)))
    width = cfg.vision.hidden_size
    out += [(f"vision_tower.vision_model.post_layernorm.{p}", (width,)) for p in ("weight", "bias")]
    return out


def draw(name, shape, index, seed, dtype):
    """The tensor's random values, as presets.random_init_ sets them."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name:
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 2**20 + index)
    return torch.empty(shape).normal_(0.0, 0.02, generator=g).to(dtype)


def _write_shard(path, entries, seed, dtype):
    """entries: [(index, name, shape)]; the safetensors file format: an 8-byte little-endian header length, the
    JSON header (data offsets relative to the end of the header, padded to 8 bytes), then the raw tensors."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for _, name, shape in entries:
        nbytes = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for index, name, shape in entries:
            f.write(draw(name, shape, index, seed, dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return offset


def hf_config(cfg, dtype) -> dict:
    """transformers' LlavaConfig as llava-hf/llava-1.5-7b-hf's config.json writes it, every size spelled out."""
    v, t = cfg.vision, cfg.text
    name = str(dtype).replace("torch.", "")
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "torch_dtype": name,
        "ignore_index": -100, "image_token_index": cfg.image_token_id, "pad_token_id": 32001,
        "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_seq_length": (v.image_size // v.patch_size) ** 2, "vocab_size": t.vocab_size,
        "text_config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": name,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "vocab_size": t.vocab_size, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "projection_dim": 768,
        },
    }


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def write_checkpoint(preset: str, out: str, *, dtype=torch.bfloat16, seed: int = 0, shard_bytes: int = SHARD_BYTES):
    """Write the preset as a random llava-hf checkpoint into `out` (created; an existing checkpoint there is an
    error). Returns the weights' size in bytes."""
    if dtype not in SAFETENSORS_DTYPES:
        raise InputError(f"dtype {dtype}: expected one of {', '.join(str(d) for d in SAFETENSORS_DTYPES)}")
    cfg = preset_config(preset)
    if cfg.image_grid_pinpoints is not None or cfg.projector_type != "mlp2x_gelu":
        raise InputError(f"preset {preset!r}: only LLaVA-1.5 presets (one 2-layer projector, no AnyRes) are written")
    if os.path.exists(os.path.join(out, "config.json")):
        raise InputError(f"{out} already holds a checkpoint (config.json): remove it or choose another directory")
    os.makedirs(out, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for index, (name, shape) in enumerate(hub_names(cfg)):
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((index, name, shape))
        size += nbytes
    total, weight_map = 0, {}
    for i, entries in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(os.path.join(out, file), entries, seed, dtype)
        weight_map.update({name: file for _, name, _ in entries})
    if len(shards) > 1:
        _write_json(os.path.join(out, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(out, "config.json"), hf_config(cfg, dtype))
    _write_json(os.path.join(out, "generation_config.json"), {"bos_token_id": 1, "eos_token_id": 2,
                                                              "pad_token_id": 32001})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BUNDLED_TOKENIZER, name), os.path.join(out, name))
    size_px = cfg.vision.image_size
    _write_json(os.path.join(out, "preprocessor_config.json"), {
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": size_px, "width": size_px},
        "size": {"shortest_edge": size_px}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3,
        "rescale_factor": 1 / 255})
    _write_json(os.path.join(out, "processor_config.json"), {
        "processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": cfg.vision.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy, "num_additional_image_tokens": 1})
    _write_json(os.path.join(out, "chat_template.json"), {"chat_template": LLAVA_15_CHAT_TEMPLATE})
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_fast.bench.random_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llava-1.5-7b", help="a LLaVA-1.5 preset of llava_fast.presets")
    p.add_argument("--out", required=True, help="the checkpoint directory to create")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        total = write_checkpoint(args.preset, args.out, dtype=getattr(torch, args.dtype), seed=args.seed)
    except InputError as err:
        print(f"random_checkpoint: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {args.preset}, {args.dtype}, {total / 1e9:.2f} GB of weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
