"""Model configuration: three dataclasses and the readers for the config.json files people have.

Two families of config.json exist in the wild:
- llava-hf / transformers (`LlavaForConditionalGeneration`, LLaVA-NeXT's `LlavaNextForConditionalGeneration`):
  `text_config` and `vision_config` nested; the hub ships a minimal one (text_config without hidden_size etc.)
  that relies on LLaMA-7B / CLIP-L-336 defaults.
- the original LLaVA repo (`LlavaLlamaForCausalLM`): LLaMA fields at top level plus `mm_*` fields; the CLIP
  tower's own config.json lives in a separate checkpoint directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from llava_fast.errors import CheckpointError
from llava_fast.prompts.templates import checkpoint_name, default_template_for


@dataclass
class VisionConfig:
    """CLIP ViT. Defaults are CLIP ViT-L/14-336, the tower of LLaVA-1.5 (and transformers' LlavaConfig)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    """LLaMA. Defaults are LLaMA-7B's, which transformers' LlamaConfig falls back to."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    # None: LLaMA's RoPE. Else {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (LLaMA-3.1+).
    rope_scaling: dict | None = None
    attention_bias: bool = False  # q/k/v/o projections with biases
    mlp_bias: bool = False  # gate/up/down projections with biases
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' tensor (small LMs, e.g. SmolLM2)
    # Mistral's sliding-window attention: a token at position p attends to keys in (p - window, p]. None: every
    # earlier key (a window at least as long as the context changes nothing and is stored as None).
    sliding_window: int | None = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads


@dataclass
class LlavaConfig:
    vision: VisionConfig | None = field(default_factory=VisionConfig)  # None: a text-only model (GGUF alone)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"  # or "linear" (LLaVA v1)
    vision_feature_layer: int = -2  # index into CLIP's hidden states; 0 is the embeddings
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_token_id: int = 32000
    image_aspect_ratio: str | None = None  # "pad": LLaVA-1.5's expand-to-square before resizing
    # LLaVA-NeXT (AnyRes, mm_patch_merge_type spatial_unpad): the (height, width) resolutions an image is tiled
    # at (image/anyres.py); None for LLaVA v1 / 1.5, whose every image is one tile of num_image_tokens features.
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    layout: str = "llava_hf"  # which checkpoint family this came from: "llava_hf" or "original"
    template: str = "llava_hf"  # default chat template for this checkpoint

    @property
    def num_image_tokens(self) -> int:
        """Features per tile: every image's count for LLaVA v1 / 1.5, the base tile's for LLaVA-NeXT (whose
        count depends on the image's size: image/anyres.py num_image_tokens)."""
        if self.vision is None:
            return 0
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def anyres(self) -> bool:
        return self.image_grid_pinpoints is not None

    @property
    def exact_unpad(self) -> bool:
        """How AnyRes unpadding rounds (image/anyres.py unpadded_window): as transformers (llava-hf checkpoints)
        or truncating, as the original code the original-layout checkpoints were trained with (and the GGUF
        files llama.cpp converts from them)."""
        return self.layout not in ("original", "gguf")

    @property
    def num_vision_layers_run(self) -> int:
        """Encoder layers actually computed: hidden state k is the output of layer k (0 = embeddings),
        so feature layer -2 of a 24-layer tower is hidden state 23, and layer 24 is never needed."""
        if self.vision is None:
            return 0
        layer = self.vision_feature_layer
        n = layer if layer >= 0 else self.vision.num_layers + 1 + layer
        if not 0 <= n <= self.vision.num_layers:
            raise CheckpointError(
                f"vision_feature_layer={layer} is outside the {self.vision.num_layers}-layer vision tower"
            )
        return n

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        vision = d.pop("vision")
        if d.get("image_grid_pinpoints") is not None:
            d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
        return cls(vision=None if vision is None else VisionConfig(**vision), text=TextConfig(**d.pop("text")), **d)


# ------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------

_SELECT_STRATEGY = {"default": "default", "patch": "default", "full": "full", "cls_patch": "full"}


def read_json(path, error=CheckpointError, what=None, lines=False):
    """A JSON file (lines: a JSON-lines file, as a list of its non-blank lines' values). Any problem reading
    it raises `error` (a checkpoint's file: CheckpointError; a user's input: InputError) naming the file, and
    `what` (the flag that named it) when given. Every JSON file llava-fast reads goes through here."""
    label = f"{what} {path}" if what else f"cannot read {path}"
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)
    except FileNotFoundError:
        raise error(f"{label}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{label}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{label}: {e}") from None


_ROPE_SCALING_FIELDS = {"linear": ("factor",),
                        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope(d, source):
    """(rope_theta, rope_scaling) of a LlamaConfig dict. transformers 5.x keeps both in rope_parameters; older
    files have rope_theta at the top level and rope_scaling beside it ("type" before transformers 4.45)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    field_name = "rope_parameters" if params.get("rope_type") else "rope_scaling"
    spec = params if params.get("rope_type") else scaling
    rope_type = spec.get("rope_type") or spec.get("type") or "default"
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type not in _ROPE_SCALING_FIELDS:
        raise CheckpointError(f"{source}: {field_name} of type {rope_type!r} is not supported "
                              f"(default, {', '.join(_ROPE_SCALING_FIELDS)})")
    missing = [k for k in _ROPE_SCALING_FIELDS[rope_type] if spec.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: {field_name} of type {rope_type!r} lacks {', '.join(missing)}")
    if spec.get("attention_factor") not in (None, 1, 1.0):
        raise CheckpointError(f"{source}: {field_name}.attention_factor={spec['attention_factor']} is not supported")
    return theta, {"rope_type": rope_type, **{k: float(spec[k]) for k in _ROPE_SCALING_FIELDS[rope_type]}}


def _tied(d, outer=None) -> bool:
    """transformers ties lm_head to embed_tokens when the text config (else the LLaVA config) says so."""
    for config in (d, outer or {}):
        if config.get("tie_word_embeddings") is not None:
            return bool(config["tie_word_embeddings"])
    return False


def text_config_from_dict(d, source="config.json", outer=None) -> TextConfig:
    """A LlamaConfig dict (missing fields take LLaMA-7B defaults, as transformers does). `outer`: the LLaVA
    config around a nested text config (it may say tie_word_embeddings)."""
    mt = d.get("model_type", "llama")
    if mt not in ("llama", "llava", "llava_llama", "mistral", "llava_mistral"):
        raise CheckpointError(f"{source}: text model type {mt!r} is not supported: llava-fast runs LLaMA decoders "
                              "(and Mistral's)")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: text hidden_act {d['hidden_act']!r} is not supported (LLaMA uses silu)")
    mistral = mt in ("mistral", "llava_mistral")
    # Mistral is LLaMA's math with its own defaults for missing fields (transformers' MistralConfig): 8 KV heads,
    # a 14,336-wide MLP, 131,072 positions, no biases, and a 4,096-token sliding window.
    t = TextConfig(intermediate_size=14336, num_kv_heads=8, max_position_embeddings=131072) if mistral else TextConfig()
    max_positions = d.get("max_position_embeddings", t.max_position_embeddings)
    window = d.get("sliding_window", 4096 if mistral else None)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise CheckpointError(f"{source}: sliding_window={window!r} must be a positive number of tokens or null")
    if window is not None and window >= max_positions:
        window = None  # no position can see past it
    heads = d.get("num_attention_heads", t.num_heads)
    if "num_key_value_heads" not in d:
        kv_heads = t.num_kv_heads if mistral else heads
    else:
        kv_heads = heads if d["num_key_value_heads"] is None else d["num_key_value_heads"]  # null: MHA
    head_dim = d.get("head_dim")  # null: hidden_size // heads (0 below); an explicit 0 is an error, not "unset"
    if kv_heads < 1 or heads % kv_heads or (head_dim is not None and head_dim < 1):
        raise CheckpointError(f"text config: num_key_value_heads={kv_heads} must divide num_attention_heads={heads} "
                              f"and head_dim={head_dim} must be positive")
    eos = d.get("eos_token_id", t.eos_token_id)
    rope_theta, rope_scaling = _rope(d, source)
    return TextConfig(
        vocab_size=d.get("vocab_size", t.vocab_size),
        hidden_size=d.get("hidden_size", t.hidden_size),
        intermediate_size=d.get("intermediate_size", t.intermediate_size),
        num_layers=d.get("num_hidden_layers", t.num_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=0 if head_dim is None else head_dim,
        rms_norm_eps=d.get("rms_norm_eps", t.rms_norm_eps),
        rope_theta=rope_theta,
        max_position_embeddings=max_positions,
        bos_token_id=d["bos_token_id"] if d.get("bos_token_id") is not None else t.bos_token_id,
        eos_token_id=eos[0] if isinstance(eos, list) and eos else (eos if isinstance(eos, int) else t.eos_token_id),
        pad_token_id=d.get("pad_token_id"),
        rope_scaling=rope_scaling,
        attention_bias=not mistral and bool(d.get("attention_bias", False)),  # MistralConfig has neither
        mlp_bias=not mistral and bool(d.get("mlp_bias", False)),
        tie_word_embeddings=_tied(d, outer),
        sliding_window=window,
    )


def vision_config_from_dict(d) -> VisionConfig:
    """A CLIPVisionConfig dict, or a CLIPConfig dict with a nested vision_config. Missing fields take the
    CLIP ViT-L/14-336 values (transformers' LlavaConfig default tower)."""
    if "vision_config" in d and isinstance(d["vision_config"], dict):
        d = d["vision_config"]
    mt = d.get("model_type", "clip_vision_model")
    if mt not in ("clip_vision_model", "clip"):
        raise CheckpointError(f"vision model type {mt!r} is not supported: llava-fast runs CLIP ViT towers")
    v = VisionConfig()
    act = d.get("hidden_act", v.hidden_act)
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"vision hidden_act {act!r} is not supported (quick_gelu or gelu)")
    return VisionConfig(
        hidden_size=d.get("hidden_size", v.hidden_size),
        intermediate_size=d.get("intermediate_size", v.intermediate_size),
        num_layers=d.get("num_hidden_layers", v.num_layers),
        num_heads=d.get("num_attention_heads", v.num_heads),
        image_size=d.get("image_size", v.image_size),
        patch_size=d.get("patch_size", v.patch_size),
        num_channels=d.get("num_channels", v.num_channels),
        layer_norm_eps=d.get("layer_norm_eps", v.layer_norm_eps),
        hidden_act=act,
    )


def _feature_layer(value, source):
    if isinstance(value, list):
        raise CheckpointError(f"{source}: multi-layer vision features {value} are not supported")
    return int(value)


def _select_strategy(value, source):
    if value not in _SELECT_STRATEGY:
        raise CheckpointError(f"{source}: unknown vision feature selection {value!r} "
                              f"(expected one of {sorted(_SELECT_STRATEGY)})")
    return _SELECT_STRATEGY[value]


def llava_hf_config(d, source="config.json") -> LlavaConfig:
    """transformers' LlavaConfig (llava-hf hub files and what save_pretrained writes)."""
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{source}: projector_hidden_act {act!r} is not supported (LLaVA uses gelu)")
    if d.get("multimodal_projector_bias") is False:
        raise CheckpointError(f"{source}: projectors without bias are not supported")
    text_dict = dict(d.get("text_config") or {})
    if "vocab_size" not in text_dict and "vocab_size" in d:
        text_dict["vocab_size"] = d["vocab_size"]
    text = text_config_from_dict(text_dict, f"{source} (text_config)", outer=d)
    if d.get("pad_token_id") is not None and text.pad_token_id is None:
        text.pad_token_id = d["pad_token_id"]
    return LlavaConfig(
        vision=vision_config_from_dict(d.get("vision_config") or {}),
        text=text,
        projector_type="mlp2x_gelu",  # transformers' LlavaMultiModalProjector is always Linear-GELU-Linear
        vision_feature_layer=_feature_layer(d.get("vision_feature_layer", -2), source),
        vision_feature_select_strategy=_select_strategy(d.get("vision_feature_select_strategy", "default"), source),
        image_token_id=int(d.get("image_token_index", d.get("image_token_id", 32000))),
        layout="llava_hf",
        template=default_template_for(d),
    )


# transformers' LlavaNextConfig default, LLaVA-1.6's pinpoints (height, width).
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def parse_grid_pinpoints(value, source, tile_size, width_first=False):
    """image_grid_pinpoints as (height, width) pairs, each a multiple of the tile; width_first: the original
    repo's (width, height) pairs. The original also allows a string (a Python literal) and a range
    "(1x1),...,(3x3)", which LLaVA-1.6's checkpoints do not use."""
    if isinstance(value, str) or not isinstance(value, list) or not value or any(
            not isinstance(p, (list, tuple)) or len(p) != 2 or not all(isinstance(v, int) for v in p) for p in value):
        pair = "[width, height]" if width_first else "[height, width]"
        raise CheckpointError(f"{source}: image_grid_pinpoints must be a list of {pair} pairs, got {value!r:.120}")
    pairs = tuple((w, h) if width_first else (h, w) for h, w in ((p[0], p[1]) for p in value))
    bad = [p for p in pairs if min(p) < tile_size or p[0] % tile_size or p[1] % tile_size]
    if bad:
        raise CheckpointError(f"{source}: image_grid_pinpoints {bad} are not multiples of the vision tower's "
                              f"{tile_size}-px input")
    return pairs


def llava_next_config(d, source="config.json") -> LlavaConfig:
    """transformers' LlavaNextConfig (llava-hf's llava-v1.6-* and what save_pretrained writes): LlavaConfig's
    fields plus image_grid_pinpoints and the learned image_newline (mm_patch_merge_type spatial_unpad, the
    only merge transformers implements)."""
    cfg = llava_hf_config(d, source)
    if cfg.vision_feature_select_strategy != "default":
        # transformers cannot arrange 577-feature tiles on the 24 x 24 grid either (its view() fails).
        raise CheckpointError(f"{source}: LLaVA-NeXT with vision_feature_select_strategy "
                              f"{d.get('vision_feature_select_strategy')!r} is not supported (only 'default': the "
                              "tiles' CLS features cannot be arranged on the patch grid)")
    cfg.image_grid_pinpoints = parse_grid_pinpoints(d.get("image_grid_pinpoints", _NEXT_PINPOINTS), source,
                                                    cfg.vision.image_size)
    return cfg


def original_llava_config(d, vision_dict, source="config.json") -> LlavaConfig:
    """The original LLaVA repo's LlavaLlamaForCausalLM / LlavaMistralForCausalLM config plus its CLIP tower's
    config. LLaVA-1.6 (image_aspect_ratio "anyres") adds image_grid_pinpoints, as (width, height) pairs, and
    mm_patch_merge_type "spatial_unpad"."""
    projector = d.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        m = re.fullmatch(r"mlp(\d+)x_gelu", projector)
        detail = f" (a {m.group(1)}-layer MLP)" if m else ""
        raise CheckpointError(f"{source}: mm_projector_type {projector!r}{detail} is not supported "
                              "(linear or mlp2x_gelu)")
    if d.get("mm_use_im_start_end"):
        raise CheckpointError(f"{source}: mm_use_im_start_end=true checkpoints (image start/end tokens) "
                              "are not supported")
    aspect = d.get("image_aspect_ratio")
    if aspect not in (None, "pad", "square", "anyres"):
        raise CheckpointError(f"{source}: image_aspect_ratio {aspect!r} is not supported (pad, square or anyres)")
    merge = d.get("mm_patch_merge_type", "flat")
    if aspect == "anyres" and merge != "spatial_unpad":
        raise CheckpointError(f"{source}: image_aspect_ratio anyres with mm_patch_merge_type {merge!r} is not "
                              "supported (spatial_unpad, LLaVA-1.6's)")
    if aspect != "anyres" and merge not in ("flat", "spatial"):  # both: one tile's features as they are
        raise CheckpointError(f"{source}: mm_patch_merge_type {merge!r} without image_aspect_ratio anyres is not "
                              "supported (flat or spatial)")
    text = text_config_from_dict(d, source)
    vision = vision_config_from_dict(vision_dict)
    strategy = _select_strategy(d.get("mm_vision_select_feature", "patch"), source)
    pinpoints = None
    if aspect == "anyres":
        if strategy != "default":
            raise CheckpointError(f"{source}: anyres with mm_vision_select_feature "
                                  f"{d.get('mm_vision_select_feature')!r} is not supported (only 'patch': the "
                                  "tiles' CLS features cannot be arranged on the patch grid)")
        if d.get("image_grid_pinpoints") is None:
            raise CheckpointError(f"{source}: image_aspect_ratio anyres needs image_grid_pinpoints")
        pinpoints = parse_grid_pinpoints(d["image_grid_pinpoints"], source, vision.image_size, width_first=True)
    if d.get("mm_hidden_size") not in (None, vision.hidden_size):
        raise CheckpointError(f"{source}: mm_hidden_size={d['mm_hidden_size']} but the vision tower's "
                              f"hidden_size is {vision.hidden_size}")
    return LlavaConfig(
        vision=vision,
        text=text,
        projector_type=projector,
        vision_feature_layer=_feature_layer(d.get("mm_vision_select_layer", -2), source),
        vision_feature_select_strategy=strategy,
        # No <image> row in the vocabulary: the id after the last real token marks image positions; the
        # splice replaces those positions before any embedding lookup, so the id never indexes the table.
        image_token_id=text.vocab_size,
        image_aspect_ratio="pad" if aspect == "pad" else None,
        image_grid_pinpoints=pinpoints,
        layout="original",
        template=default_template_for(d, checkpoint_name(source)),
    )


def is_original_llava(d) -> bool:
    archs = d.get("architectures") or []
    originals = {"LlavaLlamaForCausalLM", "LlavaMistralForCausalLM"}
    return bool(originals & set(archs)) or any(k.startswith("mm_") for k in d)


def find_vision_tower_dir(d, checkpoint_dir, vision_tower):
    """Where an original-layout checkpoint's CLIP tower lives: the vision_tower= argument, else
    mm_vision_tower when that is a local directory."""
    candidates = [vision_tower] if vision_tower else []
    name = d.get("mm_vision_tower") or d.get("vision_tower")
    if not vision_tower and name:
        candidates += [name, os.path.join(checkpoint_dir, name)]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "config.json")):
            return c
    if vision_tower:
        raise CheckpointError(f"vision_tower={vision_tower!r}: no CLIP checkpoint (config.json) there")
    raise CheckpointError(
        f"{checkpoint_dir} is an original-LLaVA checkpoint whose CLIP tower ({name!r}) is a separate "
        "checkpoint; pass vision_tower=<local CLIP directory> (CLI: --vision-tower)"
    )
