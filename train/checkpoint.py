"""Checkpoints for training: the base model a run starts from, the llava-hf checkpoint it writes, and the
training state it resumes from.

Starting points (`load_base`):
- a LLaVA checkpoint in any layout `llava_fast.load` reads (llava-hf, transformers, original LLaVA + its CLIP);
- a LLaMA/Vicuna checkpoint (LlamaForCausalLM) plus `vision_tower=` a CLIP checkpoint: LLaVA's stage 1 from
  scratch, with a fresh LLaVA-1.5 projector (mlp2x_gelu, CLIP layer -2, patch features);
- either with `projector=` a projector file (ours, or the original repo's mm_projector.bin).
A vocabulary without an "<image>" token (Vicuna, original LLaVA) gets "<image>" and "<pad>" added and is
padded to a multiple of 64 with rows equal to the mean embedding, as llava-hf's conversion does, so that the
result is a valid llava-hf checkpoint.

What a run writes (`save_checkpoint`): LLaVA-NeXT in the original layout is written back in that layout
(`save_original`: the input's names, config and tokenizer; see `writes_original` for why); everything else in
the llava-hf hub layout (`save_llava_hf`: language_model.model.*, language_model.lm_head,
vision_tower.vision_model.*, multi_modal_projector.*; sharded safetensors + index, config.json, tokenizer,
preprocessor config). A tensor the run did not change is copied byte for byte from the input checkpoint
(dtype included, and the vision layers after the feature layer that llava-fast never builds); changed tensors
are written in the dtype the input had them in. Every file is written to a temporary name and renamed, and
config.json goes last (after the old one is removed): a checkpoint that has a config.json is complete.

Training state (`save_state` / `load_state`): checkpoint-STEP/ holds the trained parameters in float32 and
the optimizer state (state.pt from rank 0 when replicated; under FSDP, each process's shards through
torch.distributed.checkpoint), each process's RNG states, and trainer_state.json (step, run settings,
counters). It is written as checkpoint-STEP.tmp/ and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn

from llava_fast.checkpoints.config import LlavaConfig, read_json, text_config_from_dict, vision_config_from_dict
from llava_fast.checkpoints.layouts import (
    CLIP_RULES,
    LLAVA_HF_RULES,
    ORIGINAL_RULES,
    assign_weights,
    expected_weights,
    iter_tensors,
    read_config,
    read_weights,
    rename_key,
    weight_files,
)
from llava_fast.checkpoints.load import checkpoint_image_processor
from llava_fast.errors import CheckpointError, InputError
from llava_fast.image import LLAVA_PROCESSOR_TYPES, ImageProcessor
from llava_fast.model import LlavaForCausalLM
from llava_fast.prompts.tokenizer import Tokenizer

_LLAMA_RULES = [(r"^model\.(embed_tokens|layers|norm)\.", r"language_model.\1."), (r"^lm_head\.", "lm_head.")]
_PROJECTOR_RULES = ORIGINAL_RULES[:3] + [(r"^mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
                                          (r"^mm_projector\.0\.", "multi_modal_projector.linear_1."),
                                          (r"^mm_projector\.2\.", "multi_modal_projector.linear_2.")] + LLAVA_HF_RULES
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")


@dataclass
class TrainBase:
    """The model a run starts from, and where each of its tensors came from (to write them back)."""

    net: LlavaForCausalLM
    tokenizer: Tokenizer
    processor: ImageProcessor
    sources: list  # [(weight file, key rules)]
    hf_config: dict | None  # the input's config.json when it is llava-hf's, else None
    tokenizer_dir: str
    processor_config: dict | None  # the input's preprocessor_config.json, or None
    resized_from: int | None  # the vocabulary size before "<image>" was added, or None

    @property
    def cfg(self) -> LlavaConfig:
        return self.net.cfg


# ------------------------------------------------------------------------------------------------------
# Loading the base
# ------------------------------------------------------------------------------------------------------


def _is_llama(d):
    return d.get("model_type") == "llama" or "LlamaForCausalLM" in (d.get("architectures") or [])


def _from_scratch_config(llama, clip_dir):
    """LLaVA-1.5's architecture around a LLaMA config and a CLIP checkpoint's config."""
    return LlavaConfig(vision=vision_config_from_dict(read_json(os.path.join(clip_dir, "config.json"))),
                       text=text_config_from_dict(llama), projector_type="mlp2x_gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_token_id=text_config_from_dict(llama).vocab_size,
                       layout="original", template="vicuna_v1")


def _load_tensors(net, sources, device, allow_missing=(), dtype=torch.float32):
    """Assign every tensor of `sources` (`dtype`: a dtype or a function of the name and the stored tensor) to the
    meta-built `net`; names starting with one of `allow_missing` may be absent (they keep a fresh float32
    initialisation)."""
    expected = expected_weights(net)
    loaded = read_weights(net, sources, device, dtype, allow_missing)
    for module_name in sorted({n.rsplit(".", 1)[0] for n in expected if n not in loaded}):
        module = net.get_submodule(module_name)  # fresh: built on the device with nn.Linear's own initialisation
        module.to_empty(device=device, recurse=False)
        module.reset_parameters()
        loaded.update({f"{module_name}.{k}": v.detach().float() for k, v in module.named_parameters()})
    assign_weights(net, loaded)
    return net


def read_projector(path, net):
    """Projector weights from `path` (our mm_projector.safetensors, or the original mm_projector.bin)."""
    if not os.path.isfile(path):
        raise InputError(f"--projector {path}: file not found")
    want = {n: p for n, p in net.multi_modal_projector.named_parameters(prefix="multi_modal_projector")}
    got = {}
    for key, tensor in iter_tensors(path):
        name = rename_key(key, _PROJECTOR_RULES)
        if name not in want:
            raise CheckpointError(f"--projector {path}: {key} is not a projector weight of this model")
        if tensor.shape != want[name].shape:
            raise CheckpointError(f"--projector {path}: {key} has shape {tuple(tensor.shape)}, the model's is "
                                  f"{tuple(want[name].shape)}")
        got[name] = tensor
    if set(got) != set(want):
        raise CheckpointError(f"--projector {path}: missing {sorted(set(want) - set(got))}")
    return got


def _tokenizer_with_image_token(tokenizer, vocab_size):
    """A tokenizer with "<image>" and "<pad>" added (ids vocab_size and vocab_size + 1), as llava-hf's conversion
    adds them to a vocabulary that lacks them."""
    from tokenizers import AddedToken

    backend = tokenizer.backend
    if backend.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise CheckpointError(f"the tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens but the "
                              f"model's vocabulary has {vocab_size}; cannot add an <image> token")
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                                AddedToken("<pad>", special=True, normalized=False)])
    return Tokenizer(backend, bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids,
                     pad_token_id=vocab_size + 1, unk_token_id=tokenizer.unk_token_id,
                     add_bos_token=tokenizer.add_bos_token,
                     chat_template=tokenizer.chat_template and tokenizer.chat_template.text,
                     chat_template_origin=tokenizer.chat_template and tokenizer.chat_template.origin,
                     source=tokenizer.source)


def _add_image_token_rows(net):
    """Pad the vocabulary by "<image>" and "<pad>" to a multiple of 64, and give the new rows of embed_tokens
    and lm_head the mean of the old ones (llava-hf's conversion). Returns the old vocabulary size."""
    old = net.cfg.text.vocab_size
    new = -(-(old + 2) // 64) * 64
    tied = net.cfg.text.tie_word_embeddings
    for module in (net.language_model.embed_tokens,) + (() if tied else (net.lm_head,)):
        weight = module.weight.data
        extra = weight.mean(0, keepdim=True).expand(new - old, -1)
        module.weight = nn.Parameter(torch.cat([weight, extra]), requires_grad=False)
    net.tie_weights()
    net.cfg.text.vocab_size = new
    net.cfg.image_token_id = old
    net.cfg.text.pad_token_id = old + 1
    return old


@dataclass
class BaseFiles:
    """What a run's base checkpoint says before its weights load (read_base): enough to tokenize and check the
    data (a 7B's weights take a minute to load, its config and tokenizer milliseconds)."""

    model_dir: str
    cfg: LlavaConfig  # as read: the loaded model's image token id and vocabulary follow `image_token_id` below
    sources: list  # [(weight file, key rules)]
    allow_missing: tuple
    processor_dir: str
    hf_config: dict | None
    tokenizer: Tokenizer  # with "<image>" and "<pad>" already added where the load adds their rows
    adds_image_token: bool
    image_token_id: int  # the id of an image position in the loaded model


def read_base(model_dir, *, vision_tower=None) -> BaseFiles:
    """The config, weight files and tokenizer of the checkpoint a run starts from; no weight is read."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"--model {model_dir}: not a checkpoint directory")
    d = read_json(os.path.join(model_dir, "config.json"))
    allow_missing, hf_config = (), None
    if _is_llama(d):
        if not vision_tower:
            raise InputError(f"--model {model_dir} is a LLaMA checkpoint: LLaVA's stage 1 from scratch also needs "
                             "--vision-tower (a CLIP checkpoint directory)")
        cfg = _from_scratch_config(d, vision_tower)
        sources = [(f, CLIP_RULES) for f in weight_files(vision_tower)]
        sources += [(f, _LLAMA_RULES) for f in weight_files(model_dir)]
        allow_missing = ("multi_modal_projector.",)  # fresh, or --projector below
        processor_dir = vision_tower
    else:
        cfg, sources = read_config(model_dir, vision_tower)
        if cfg.layout == "llava_hf":
            hf_config, processor_dir = d, model_dir
        else:
            processor_dir = os.path.dirname(sources[0][0])  # the CLIP checkpoint's directory
    if cfg.projector_type != "mlp2x_gelu":
        raise CheckpointError(f"{model_dir}: a linear projector (LLaVA v1) has no llava-hf layout to write; "
                              "llava-fast trains LLaVA-1.5's mlp2x_gelu projector")
    tokenizer = Tokenizer.from_dir(model_dir)
    image_id = tokenizer.token_to_id("<image>")
    adds_image_token, image_token_id = False, cfg.image_token_id
    if writes_original(cfg):
        pass  # image positions keep the id outside the vocabulary they have when the written checkpoint loads
    elif image_id is not None and image_id < cfg.text.vocab_size:
        image_token_id = image_id
    elif cfg.image_token_id >= cfg.text.vocab_size:
        if cfg.anyres:
            raise CheckpointError(f"{model_dir}: the LLaVA-NeXT checkpoint's tokenizer has no <image> token within "
                                  f"its {cfg.text.vocab_size}-token vocabulary")
        tokenizer, adds_image_token = _tokenizer_with_image_token(tokenizer, cfg.text.vocab_size), True
        image_token_id, hf_config = cfg.text.vocab_size, None
    return BaseFiles(model_dir, cfg, sources, allow_missing, processor_dir, hf_config, tokenizer, adds_image_token,
                     image_token_id)


def load_base(model_dir, *, vision_tower=None, projector=None, device="cpu", image_aspect_ratio=None,
              seed=0, frozen_dtype=torch.float32, trains=None, files: BaseFiles | None = None,
              keeps_stored=None) -> TrainBase:
    """The model a run starts from on `device`, frozen (the trainer unfreezes): float32, except that with
    `trains` (a function of a parameter's name: True where the run trains it) the weights it does not train are
    read straight into `frozen_dtype`, one tensor at a time, as the trainer stores them. A LoRA or stage 1 run
    in bfloat16 then never holds its frozen weights in float32: a 7B's would be a 28 GB transient beside the
    14 GB it keeps. The bits are the float32-then-cast ones (one rounding either way). The embedding and output
    rows stay float32 while a missing <image> token is added, whose new rows are the float32 mean of the old.
    keeps_stored (a function of a frozen weight's name and its stored tensor): True where that frozen weight is kept
    in the dtype the checkpoint stores it in (the trainer's float32 runs widen it where an op reads it,
    `MasterWeights.widen_frozen_on_use`).

    image_aspect_ratio: "pad" or "square" (None: the checkpoint's setting). files: read_base's reading of
    model_dir, when the caller already has it."""
    files = files or read_base(model_dir, vision_tower=vision_tower)
    device = torch.device(device)
    cfg = files.cfg
    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    resized = ("language_model.embed_tokens.weight", "lm_head.weight") if files.adds_image_token else ()

    def dtype_of(name, stored):
        if trains is None or trains(name) or name in resized:
            return torch.float32
        return stored.dtype if keeps_stored is not None and keeps_stored(name, stored) else frozen_dtype

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # a fresh projector is the same in every process
        _load_tensors(net, files.sources, device, files.allow_missing, dtype_of)
    if projector:
        with torch.no_grad():
            for name, tensor in read_projector(projector, net).items():
                net.get_parameter(name).copy_(tensor)
    net.requires_grad_(False)

    resized_from = _add_image_token_rows(net) if files.adds_image_token else None
    cfg.image_token_id = files.image_token_id
    net.init_rope(device)

    processor_file = os.path.join(files.processor_dir, "preprocessor_config.json")
    processor_config = read_json(processor_file) if os.path.isfile(processor_file) else None
    processor = checkpoint_image_processor(files.processor_dir, cfg, image_aspect_ratio)
    return TrainBase(net, files.tokenizer, processor, files.sources, files.hf_config, model_dir, processor_config,
                     resized_from)


# ------------------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------------------


def atomic_write(path, write):
    """write(tmp_path) then rename onto `path`: `path` is either absent, the old file, or the whole new one."""
    tmp = f"{path}.tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write)


def save_tensors(path, tensors, metadata=None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def load_tensors(path):
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a bad file
        raise CheckpointError(f"cannot read {path}: {e}") from e


# ------------------------------------------------------------------------------------------------------
# Writing the llava-hf layout
# ------------------------------------------------------------------------------------------------------


def hub_name(name):
    """This engine's parameter name -> the llava-hf hub name."""
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def llava_hf_config(cfg: LlavaConfig, dtype: torch.dtype) -> dict:
    """transformers' LlavaConfig dict for this model."""
    t, v = cfg.text, cfg.vision
    dtype = str(dtype).replace("torch.", "")
    text = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings, "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "tie_word_embeddings": t.tie_word_embeddings, "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias,
            "rope_scaling": t.rope_scaling, "torch_dtype": dtype}
    vision = {"model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
              "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
              "hidden_act": v.hidden_act, "projection_dim": 768}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": cfg.image_token_id, "pad_token_id": t.pad_token_id, "projector_hidden_act": "gelu",
            "vision_feature_layer": cfg.vision_feature_layer, "image_seq_length": cfg.num_image_tokens,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy, "vocab_size": t.vocab_size,
            "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": dtype, "text_config": text,
            "vision_config": vision}


def save_llava_hf(dst, base: TrainBase, changed: dict, *, max_shard_bytes=5 * 2**30):
    """Write the llava-hf checkpoint to `dst`: `changed` maps parameter names (ours) to the tensors this run
    produced; every other tensor is copied from the input checkpoint. Returns the written file names."""
    expected = set(expected_weights(base.net))  # tied embeddings: no lm_head tensor, as transformers saves them
    shards, dtypes = _ShardWriter(dst, max_shard_bytes), {}
    llm_dtype = None
    for path, rules in base.sources:
        for key, tensor in iter_tensors(path):
            name = rename_key(key, rules)
            if name.startswith("language_model.") and llm_dtype is None:
                llm_dtype = tensor.dtype
            dtypes[name] = tensor.dtype
            extra_vision = name.startswith("vision_tower.") and not name.endswith("position_ids")
            if name in changed or not (name in expected or extra_vision):
                continue
            if name in ("language_model.embed_tokens.weight", "lm_head.weight") and base.resized_from:
                # the old rows byte for byte, then the new rows as _add_image_token_rows made them: the mean row
                mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, mean.expand(base.cfg.text.vocab_size - tensor.shape[0], -1)])
            shards.add(hub_name(name), tensor)
    for name in sorted(n for n in changed if n in expected):
        shards.add(hub_name(name), changed[name].detach().to("cpu", dtypes.get(name, llm_dtype or torch.float32)))
    names = shards.finish()
    _write_tokenizer(dst, base)
    write_json(os.path.join(dst, "preprocessor_config.json"), processor_config(base))
    if base.hf_config is not None:
        config = dict(base.hf_config)
    else:
        config = llava_hf_config(base.cfg, llm_dtype or torch.float32)
    write_json(os.path.join(dst, "config.json"), config)  # last: its presence marks a complete checkpoint
    return names + ["model.safetensors.index.json", "config.json"]


class _ShardWriter:
    """Tensors into model-0000i-of-0000n.safetensors shards of at most max_shard_bytes, and their index."""

    def __init__(self, dst, max_shard_bytes):
        os.makedirs(dst, exist_ok=True)
        for stale in ("config.json", "model.safetensors.index.json"):  # the old checkpoint stops looking complete
            if os.path.exists(os.path.join(dst, stale)):
                os.remove(os.path.join(dst, stale))
        self.dst, self.max_shard_bytes = dst, max_shard_bytes
        self.out, self.size, self.shards = {}, 0, []

    def add(self, key, tensor):
        if self.size and self.size + tensor.numel() * tensor.element_size() > self.max_shard_bytes:
            self._flush()
        self.out[key] = tensor
        self.size += tensor.numel() * tensor.element_size()

    def _flush(self):
        if self.out:
            name = f"model-{len(self.shards) + 1:05d}.safetensors"
            save_tensors(os.path.join(self.dst, name), self.out)
            self.shards.append((name, list(self.out)))
            self.out, self.size = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names, remove an older checkpoint's, write the index."""
        self._flush()
        total = len(self.shards)
        weight_map, names = {}, []
        for index, (name, keys) in enumerate(self.shards):  # model-00001.safetensors -> model-00001-of-00003...
            final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(self.dst, name), os.path.join(self.dst, final))
            weight_map.update({k: final for k in keys})
            names.append(final)
        for f in os.listdir(self.dst):  # shards of an older checkpoint in the same directory
            if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) and f not in names:
                os.remove(os.path.join(self.dst, f))
        write_json(os.path.join(self.dst, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
        return names


def writes_original(cfg: LlavaConfig) -> bool:
    """Whether a run on this model writes the original layout back rather than llava-hf's: LLaVA-NeXT in the
    original layout (LlavaLlamaForCausalLM / LlavaMistralForCausalLM, image_aspect_ratio anyres). Its llava-hf
    form would not be the same model: transformers rounds when unpadding where the original truncates (a 176x55
    image gets 16 feature rows, not 14), so the trained weights keep the layout, and the semantics, they had."""
    return cfg.anyres and cfg.layout == "original"


def save_checkpoint(dst, base: TrainBase, changed: dict) -> str:
    """Write the trained model to `dst` in the layout it is written back in; returns that layout's name."""
    if writes_original(base.cfg):
        save_original(dst, base, changed)
        return "original"
    save_llava_hf(dst, base, changed)
    return "llava-hf"


def save_original(dst, base: TrainBase, changed: dict, *, max_shard_bytes=5 * 2**30):
    """Write an original-layout checkpoint to `dst`: the input's own tensors under their own names (changed ones
    replaced, in the dtype the input had them), its config.json and tokenizer; the CLIP tower stays where the
    config points (vision_tower=), as the input's did. Images stay placeholders outside the vocabulary, as in the
    original code, so the vocabulary is the input's."""
    tower_changed = sorted(n for n in changed if n.startswith("vision_tower."))
    if tower_changed:
        raise CheckpointError(f"the original layout keeps the CLIP tower apart; this run changed {tower_changed[0]}")
    shards, written = _ShardWriter(dst, max_shard_bytes), set()
    own = os.path.abspath(base.tokenizer_dir)
    for path, rules in base.sources:
        if os.path.dirname(os.path.abspath(path)) != own:  # the separate CLIP tower's files
            continue
        for key, tensor in iter_tensors(path):
            name = rename_key(key, rules)
            if name in changed:
                tensor = changed[name].detach().to("cpu", tensor.dtype)
                written.add(name)
            shards.add(key, tensor)
    missing = sorted(set(changed) - written)
    if missing:
        raise CheckpointError(f"{base.tokenizer_dir}: the input has no tensor for {missing[0]} to write back")
    names = shards.finish()
    _write_tokenizer(dst, base)
    config = read_json(os.path.join(base.tokenizer_dir, "config.json"))
    write_json(os.path.join(dst, "config.json"), config)  # last: its presence marks a complete checkpoint
    return names + ["model.safetensors.index.json", "config.json"]


def _write_tokenizer(dst, base):
    if base.resized_from is None:
        for name in _TOKENIZER_FILES:
            src = os.path.join(base.tokenizer_dir, name)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(dst, name)):
                atomic_write(os.path.join(dst, name), lambda tmp, src=src: shutil.copyfile(src, tmp))
        return
    tok = base.tokenizer
    atomic_write(os.path.join(dst, "tokenizer.json"), lambda tmp: tok.backend.save(tmp))
    src_config = os.path.join(base.tokenizer_dir, "tokenizer_config.json")
    config = read_json(src_config) if os.path.isfile(src_config) else {}
    config = {k: v for k, v in config.items() if k not in ("added_tokens_decoder", "pad_token")}
    config.update({"add_bos_token": tok.add_bos_token, "bos_token": tok.id_to_token(tok.bos_token_id),
                   "eos_token": tok.id_to_token(tok.eos_token_id), "pad_token": "<pad>",
                   "legacy": config.get("legacy", True)})
    if tok.unk_token_id is not None:
        config["unk_token"] = tok.id_to_token(tok.unk_token_id)
    write_json(os.path.join(dst, "tokenizer_config.json"), config)


def processor_config(base: TrainBase) -> dict:
    """The preprocessor_config.json transformers reads as the run's image preprocessing: LLaVA-1.5's padding
    is transformers' LlavaImageProcessor with do_pad (CLIPImageProcessor has no padding, and ignores the
    image_aspect_ratio key llava-fast used to write: non-square images then differ by up to 3 levels).
    LLaVA-NeXT: the input's LlavaNextImageProcessor config, its pinpoints set to the model's."""
    if base.cfg.anyres:
        config = dict(base.processor_config or _clip_processor_config(base.cfg.vision.image_size))
        config.update(image_processor_type="LlavaNextImageProcessor", do_pad=True,
                      image_grid_pinpoints=[list(p) for p in base.cfg.image_grid_pinpoints])
        return config
    config = dict(base.processor_config or _clip_processor_config(base.processor.image_size))
    config.pop("image_aspect_ratio", None)
    pad = base.processor.image_aspect_ratio == "pad"
    if pad or config.get("image_processor_type") in LLAVA_PROCESSOR_TYPES:
        config["image_processor_type"] = "LlavaImageProcessor"
        config["do_pad"] = pad
    else:
        config.pop("do_pad", None)
    return config


def _clip_processor_config(image_size):
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


# ------------------------------------------------------------------------------------------------------
# Training state
# ------------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rng_state():
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_state(output, step, model, optimizer, masters, trainer_state, keep=1):
    """checkpoint-STEP/ in `output`; every process calls it. masters: the trainer's MasterWeights, whose
    float32 tensors and the optimizer state rank 0 writes (replicated training); None under FSDP, where every
    process writes its shards with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    dist = _dist()
    rank = dist.get_rank() if dist else 0
    final = os.path.join(output, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist:
        dist.barrier()
    if masters is None:
        model_sd, optim_sd = _state_dicts(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    elif rank == 0:
        torch.save({"masters": masters.state_dict(), "optim": optimizer.state_dict()}, os.path.join(tmp, "state.pt"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    if dist:
        dist.barrier()
    if rank == 0:
        write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output)[:-keep] if keep else []:
            shutil.rmtree(os.path.join(output, f"checkpoint-{old}"), ignore_errors=True)
    if dist:
        dist.barrier()
    return final


def list_checkpoints(output) -> list[int]:
    """Steps of the complete checkpoint-STEP directories in `output`, oldest first."""
    if not os.path.isdir(output):
        return []
    steps = []
    for name in os.listdir(output):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(output, name, "trainer_state.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def load_state(path, model, optimizer, masters) -> dict:
    """Restore checkpoint `path` (see save_state) and this process's RNG; returns trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    dist = _dist()
    rank = dist.get_rank() if dist else 0
    trainer_state = read_json(os.path.join(path, "trainer_state.json"))
    try:
        if masters is None:
            model_sd, optim_sd = _state_dicts(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(ignore_frozen_params=True, strict=False))
        else:
            state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
            masters.load_state_dict(state["masters"])
            optimizer.load_state_dict(state["optim"])
        _set_rng_state(torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=False))
    except (RuntimeError, KeyError, ValueError, EOFError, OSError) as e:  # a torn file, or another model's state
        raise CheckpointError(f"--resume: cannot restore the training state in {path}: "
                              f"{' '.join(str(e).split())[:300]}") from e
    return trainer_state
