"""Checkpoint loading for the three layouts people have, onto one model definition.

Per layout: config; weights; vision tower.
- llava-hf hub: LlavaConfig (nested); `language_model.model.*`, `language_model.lm_head.weight`,
  `vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`; inside.
- transformers save_pretrained: LlavaConfig; 4.5x: `model.language_model.*`, `model.vision_tower.vision_model.*`,
  `lm_head.weight`; 5.x: as the hub but `vision_tower.*` without `vision_model`; inside.
- llava-hf LLaVA-NeXT: LlavaNextConfig (nested, + image_grid_pinpoints); as llava-hf, plus `image_newline`
  (`model.image_newline` from save_pretrained); inside.
- original LLaVA repo: LlavaLlamaForCausalLM / LlavaMistralForCausalLM + mm_*; `model.embed_tokens`,
  `model.layers.*`, `model.norm`, `lm_head`, `model.mm_projector.{0,2}.*` (or `model.mm_projector.*` for
  linear), LLaVA-1.6's `model.image_newline`, `.bin` shards; a separate CLIP checkpoint (`vision_model.*`).

Every key is renamed to this engine's names (model.py), converted tensor by tensor straight from the
memory-mapped file to the target device and dtype (peak host memory stays about one model, not two), and
assigned into a model built on the meta device, so nothing is initialised twice.
"""

from __future__ import annotations

import os
import re

import torch

from llava_fast.checkpoints.config import (
    LlavaConfig,
    find_vision_tower_dir,
    is_original_llava,
    llava_hf_config,
    llava_next_config,
    original_llava_config,
    read_json,
)
from llava_fast.errors import CheckpointError
from llava_fast.model import LlavaForCausalLM

# ------------------------------------------------------------------------------------------------------
# Key renaming
# ------------------------------------------------------------------------------------------------------

# (pattern, replacement) applied in order; the first that matches wins.
LLAVA_HF_RULES = [
    (r"^(?:model\.)?language_model\.lm_head\.", "lm_head."),
    (r"^(?:model\.)?language_model\.model\.", "language_model."),
    (r"^model\.language_model\.", "language_model."),
    (r"^(?:model\.)?vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
]
ORIGINAL_RULES = [
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^model\.mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
    # A fine-tuned original checkpoint that also saved its tower: model.vision_tower.vision_tower.vision_model.*
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"language_model.\1."),
    (r"^model\.image_newline$", "image_newline"),  # LLaVA-1.6
]
# A CLIP checkpoint: CLIPModel / transformers 4.x CLIPVisionModel save `vision_model.*`; transformers 5.x
# CLIPVisionModel saves the tower's own names without a prefix.
CLIP_RULES = [(r"^vision_model\.", "vision_tower."),
              (r"^(embeddings|pre_layrnorm|encoder|post_layernorm)\.", r"vision_tower.\1.")]

# Weights a checkpoint may legitimately carry that this engine never needs.
_SKIPPED = [
    r"\.position_ids$",  # CLIP's buffer, saved by older transformers
    r"rotary_emb\.inv_freq$",  # LLaMA's buffer, saved by older transformers
    r"^vision_tower\.post_layernorm\.",  # only feeds CLIP's pooled output
    r"^(text_model|visual_projection|text_projection|logit_scale)",  # the text half of a full CLIP checkpoint
]


def rename_key(key, rules):
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def is_skipped_weight(key, num_vision_layers_run):
    if any(re.search(p, key) for p in _SKIPPED):
        return True
    m = re.match(r"^vision_tower\.encoder\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= num_vision_layers_run  # layers after vision_feature_layer


# ------------------------------------------------------------------------------------------------------
# Weight files
# ------------------------------------------------------------------------------------------------------


def weight_files(directory):
    """The checkpoint's weight files: safetensors (single or sharded) preferred, else pytorch_model*.bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not os.path.isfile(os.path.join(directory, f)):
                    raise CheckpointError(f"{index} lists shard {f!r}, which is missing from {directory}")
            return [os.path.join(directory, f) for f in files]
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    shards = sorted(f for f in os.listdir(directory) if re.fullmatch(r"(model|pytorch_model).*\.(safetensors|bin)", f))
    if shards:
        return [os.path.join(directory, f) for f in shards]
    raise CheckpointError(f"{directory}: no weights found (model.safetensors, model.safetensors.index.json "
                          "or pytorch_model*.bin)")


def iter_tensors(path):
    """Yield (key, tensor) from one weight file. safetensors are memory-mapped: each tensor is read when
    asked for, so the caller converts it before the next one is read."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own types for truncated/corrupt files
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    else:
        try:
            try:  # mmap keeps a 7B .bin shard out of RAM until each tensor is converted
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # only the legacy (pre-zipfile) format cannot be mapped
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read PyTorch weights ({e})") from None
        yield from state.items()


# ------------------------------------------------------------------------------------------------------
# Config + weights -> model
# ------------------------------------------------------------------------------------------------------


def read_config(directory, vision_tower=None):
    """(LlavaConfig, weight sources) where sources is a list of (file, key rules)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path) and os.path.isfile(os.path.join(directory, "adapter_config.json")):
        # What `train --lora-r` writes: "config.json: file not found" did not say what the directory is.
        raise CheckpointError(f"{directory}: a LoRA adapter (adapter_config.json), not a whole checkpoint: fold it "
                              f"into its base model with `llava-fast merge-lora --adapter {directory} --output DIR` "
                              "and load DIR")
    d = read_json(cfg_path)
    if is_original_llava(d):
        vdir = find_vision_tower_dir(d, directory, vision_tower)
        cfg = original_llava_config(d, read_json(os.path.join(vdir, "config.json")), cfg_path)
        sources = [(f, ORIGINAL_RULES) for f in weight_files(directory)]
        # A fine-tuned checkpoint may carry its own tower; the separate CLIP checkpoint fills what it lacks.
        sources = [(f, CLIP_RULES) for f in weight_files(vdir)] + sources
        return cfg, sources
    archs = d.get("architectures") or []
    if d.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in archs:
        if vision_tower:
            raise CheckpointError(f"{directory}: llava-hf checkpoints contain their vision tower; "
                                  "vision_tower= is only for original-LLaVA checkpoints")
        return llava_next_config(d, cfg_path), [(f, LLAVA_HF_RULES) for f in weight_files(directory)]
    if d.get("model_type") == "llava" or "LlavaForConditionalGeneration" in archs:
        if vision_tower:
            raise CheckpointError(f"{directory}: llava-hf checkpoints contain their vision tower; "
                                  "vision_tower= is only for original-LLaVA checkpoints")
        return llava_hf_config(d, cfg_path), [(f, LLAVA_HF_RULES) for f in weight_files(directory)]
    raise CheckpointError(
        f"{cfg_path}: unknown architecture {archs or d.get('model_type')!r}: expected a LLaVA checkpoint "
        "(llava-hf LlavaForConditionalGeneration or LlavaNextForConditionalGeneration, or original "
        "LlavaLlamaForCausalLM)"
    )


def expected_weights(net: LlavaForCausalLM) -> dict:
    """Name -> (meta) tensor of every weight a checkpoint must provide. With tied embeddings lm_head is not
    among them: transformers saves no lm_head then, and ties any it finds to embed_tokens."""
    expected = dict(net.state_dict())
    if net.cfg.text.tie_word_embeddings:
        del expected["lm_head.weight"]
    return expected


def assign_weights(net: LlavaForCausalLM, loaded: dict):
    """Put the loaded tensors into the meta-built `net` (no copy) and re-tie lm_head to embed_tokens."""
    if net.cfg.text.tie_word_embeddings:
        loaded = {**loaded, "lm_head.weight": loaded["language_model.embed_tokens.weight"]}
    net.load_state_dict(loaded, assign=True, strict=True)
    net.tie_weights()


def read_weights(net: LlavaForCausalLM, sources, device, dtype, allow_missing=()) -> dict:
    """Name -> tensor of every weight of the meta-built `net`, read from `sources` ((file, rename rules)
    pairs): renamed, checked against the shapes the config implies, floating tensors cast to `dtype` (or
    `dtype(name, stored tensor)` when it is a function) on `device`, one at a time. Names starting with one of
    `allow_missing` may be absent (the caller initialises them); any other missing weight, or one the model does not
    have, is a CheckpointError naming it."""
    expected = expected_weights(net)
    tied_head = "lm_head.weight" if net.cfg.text.tie_word_embeddings else None  # transformers ties any it finds
    loaded, unexpected = {}, []
    for path, rules in sources:
        for key, tensor in iter_tensors(path):
            name = rename_key(key, rules)
            if is_skipped_weight(name, net.cfg.num_vision_layers_run) or name == tied_head:
                continue
            if name not in expected:
                unexpected.append(f"{key} (in {os.path.basename(path)})")
                continue
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, but the config implies {want}")
            target_dtype = tensor.dtype
            if tensor.is_floating_point():
                target_dtype = dtype(name, tensor) if callable(dtype) else dtype
            loaded[name] = tensor.to(device=device, dtype=target_dtype, copy=True)
            del tensor
    missing = sorted(n for n in set(expected) - set(loaded) if not n.startswith(tuple(allow_missing)))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        files = ", ".join(sorted({os.path.basename(p) for p, _ in sources}))
        raise CheckpointError(f"missing weights in {files}: {shown}")
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(f"unexpected weights (not part of a LLaVA model with this config): {shown}")
    return loaded


def load_weights(cfg: LlavaConfig, sources, device, dtype) -> LlavaForCausalLM:
    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    assign_weights(net, read_weights(net, sources, device, dtype))
    net.requires_grad_(False)
    net.init_rope(device)
    return net.eval()
