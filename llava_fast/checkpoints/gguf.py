"""GGUF checkpoints (llama.cpp's file format): a LLaMA text model, plus optionally an `mmproj` file holding
LLaVA's CLIP tower and projector, read with the `gguf` package (the llama.cpp project's reader and
dequantizers).

In:  text-model.gguf (general.architecture "llama": llama.* hyper-parameters, tokenizer.ggml.* vocabulary,
     token_embd / blk.N.* / output_norm / output tensors in any type `gguf.quants.dequantize` reads: F32, F16,
     BF16, Q4_0 ... Q8_0, the K-quants, the IQ types), and optionally mmproj.gguf (general.architecture
     "clip" with clip.has_llava_projector, as llama.cpp's LLaVA image-encoder converter
     tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py writes it: v.* tower, mm.* projector).
     LLaVA-1.6 (NeXT) mmproj files, from llava_surgery_v2.py's projector and a vision config carrying the
     original's AnyRes settings, add clip.vision.image_grid_pinpoints (the original's pairs flattened),
     clip.vision.mm_patch_merge_type "spatial_unpad" and the tensor model.image_newline.
Out: `read_gguf(...)` -> (LlavaForCausalLM with every weight dequantized to the target dtype, Tokenizer
     with the file's chat template (tokenizer.chat_template), ImageProcessor, AnyResProcessor or None).
     `llava_fast.load("x.gguf", mmproj=...)` calls it.

What llama.cpp's converters change, and how it is undone here:
- convert_hf_to_gguf.py permutes the rows of q_proj and k_proj (LlamaModel.permute: within each head,
  transformers' rotary halves (i, i + D/2) become adjacent pairs (2i, 2i + 1), the layout of ggml's RoPE). We
  apply the inverse per tensor; rows are output features, so this commutes with the block quantization (blocks run
  along the input features).
- A model with tied embeddings has no output.weight: lm_head then shares token_embd's tensor (one copy).
- The legacy LLaVA mmproj converter names CLIP's mlp.fc1 "ffn_down" and fc2 "ffn_up" (its string replaces
  are crossed); newer files use the opposite. fc1 is recognised by its shape (intermediate x hidden) instead.
- The mmproj keeps only the CLIP layers LLaVA reads: clip.vision.block_count layers, and the feature taken
  is the last one's output (hidden state block_count; clip.vision.feature_layer, when present, says the
  same). LLaVA drops the CLS token (llama.cpp's "mlp" projector does) and pads images to square (LLaVA-1.5).
- LLaVA-1.6: the pinpoints are the original config's list flattened, [w0, h0, w1, h1, ...]; llama.cpp reads
  each pair as (width, height) (clip.cpp: image_res_candidates of clip_image_size {width, height}), as the
  original does, and the weights come from an original-layout checkpoint, so tiles are arranged and unpadded
  as for that layout (config.py's original reader; LlavaConfig.exact_unpad).

A text-only GGUF loads as a model without vision tower or projector (config.vision is None); passing it an
image raises InputError. Weights are read from the memory-mapped file and dequantized a few MiB of rows at a
time straight into the target dtype, so peak host memory is one model plus the reader's parsed metadata:
SmolLM2-135M in float32 (513 MiB of weights) peaks at 1.2 GiB RSS, of which 245 MiB is Python + torch and
160 MiB the gguf reader's view of a 49k-token vocabulary.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from llava_fast.checkpoints.config import LlavaConfig, TextConfig, VisionConfig, parse_grid_pinpoints
from llava_fast.checkpoints.layouts import assign_weights, expected_weights
from llava_fast.errors import CheckpointError
from llava_fast.image import AnyResProcessor, ImageProcessor
from llava_fast.model import LlavaForCausalLM

# GGUF llama tensor names -> this engine's (model.py); blk.N.* are per decoder layer.
_TEXT_NAMES = {"token_embd.weight": "language_model.embed_tokens.weight",
               "output_norm.weight": "language_model.norm.weight", "output.weight": "lm_head.weight"}
_TEXT_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# mmproj (clip) tensor names -> ours. ffn_up / ffn_down are resolved by shape (see the docstring).
_VISION_NAMES = {"v.class_embd": "vision_tower.embeddings.class_embedding",
                 "v.patch_embd.weight": "vision_tower.embeddings.patch_embedding.weight",
                 "v.position_embd.weight": "vision_tower.embeddings.position_embedding.weight",
                 "v.pre_ln.weight": "vision_tower.pre_layrnorm.weight",
                 "v.pre_ln.bias": "vision_tower.pre_layrnorm.bias",
                 "mm.0.weight": "multi_modal_projector.linear_1.weight",
                 "mm.0.bias": "multi_modal_projector.linear_1.bias",
                 "mm.2.weight": "multi_modal_projector.linear_2.weight",
                 "mm.2.bias": "multi_modal_projector.linear_2.bias",
                 "mm.weight": "multi_modal_projector.linear_1.weight",  # LLaVA v1's linear projector
                 "mm.bias": "multi_modal_projector.linear_1.bias",
                 "model.image_newline": "image_newline"}  # LLaVA-1.6 (llama.cpp's TN_IMAGE_NEWLINE)
_VISION_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                       "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2"}
_VISION_SKIPPED = ("v.post_ln.",)  # feeds only CLIP's pooled output, which LLaVA never reads

# tokenizer.ggml.pre (llama.cpp's name for the pre-tokenizer regex of a byte-level BPE vocabulary, see
# src/llama-vocab.cpp) -> (kind, BPE ignore_merges). "gpt2": GPT-2's regex; "digits": every digit split off
# first, then GPT-2's regex (StarCoder, SmolLM); "llama3": LLaMA-3's regex (digits in runs of up to 3).
_BPE_PRE_TOKENIZERS = {"default": ("gpt2", False), "gpt-2": ("gpt2", False), "gpt2": ("gpt2", False),
                       "smollm": ("digits", False), "starcoder": ("digits", False), "refact": ("digits", False),
                       "llama3": ("llama3", True), "llama-v3": ("llama3", True), "llama-bpe": ("llama3", True)}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_BYTE = 1, 2, 3, 4, 6


class GGUFFile:
    """One GGUF file, memory-mapped: its metadata as Python values and its tensors by name. Every problem
    reading it (not a GGUF file, truncated, corrupt) is a CheckpointError naming the file."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: file not found")
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except Exception as e:  # the reader raises ValueError, IndexError, struct or numpy errors on bad bytes
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                                  "is it truncated or corrupt?") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key, default=None):
        """A metadata value as Python (str, int, float, bool, list), converted when first asked for."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key):
        if key not in self.reader.fields:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return self.get(key)

    def tensor(self, name: str, dtype=torch.float32) -> torch.Tensor:
        """The tensor dequantized to `dtype` on the CPU, in PyTorch's dimension order. Rows are dequantized a
        few MiB at a time straight into the result, so the float32 temporaries never hold a whole tensor
        (SmolLM2's Q8_0 embedding is 113 MiB in float32)."""
        from gguf import quants

        info = self.tensors[name]
        shape = tuple(int(n) for n in reversed(info.shape))  # GGUF lists dimensions innermost first
        out = torch.empty(shape, dtype=dtype)
        data = info.data.reshape(-1, info.data.shape[-1]) if info.data.ndim > 1 else info.data.reshape(1, -1)
        rows = out.view(data.shape[0], -1)
        step = max(1, (1 << 22) // rows.shape[1])  # about 4M elements (16 MiB of float32) per chunk
        try:
            for start in range(0, data.shape[0], step):
                chunk = quants.dequantize(data[start:start + step], info.tensor_type)
                rows[start:start + step] = torch.from_numpy(np.array(chunk, dtype=np.float32))
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name} has quantization type {info.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from None
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name} ({type(e).__name__}: {e}); "
                                  "is the file truncated or corrupt?") from None
        return out


# ------------------------------------------------------------------------------------------------------
# Configuration from metadata
# ------------------------------------------------------------------------------------------------------


def text_config(f: GGUFFile) -> TextConfig:
    arch = f.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{f.path}: architecture {arch!r} is not supported: llava-fast runs LLaMA decoders "
                              "(general.architecture 'llama')")
    if "rope_freqs.weight" in f.tensors:  # LLaMA-3.1's per-frequency factors, without the parameters behind them
        raise CheckpointError(f"{f.path}: RoPE frequency factors (rope_freqs.weight, LLaMA-3.1 scaling) are not "
                              "supported; load the transformers checkpoint instead")
    scaling = f.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{f.path}: RoPE scaling {scaling!r} is not supported (none or linear)")
    hidden = int(f.require("llama.embedding_length"))
    heads = int(f.require("llama.attention.head_count"))
    head_dim = int(f.get("llama.attention.key_length", hidden // heads))
    if int(f.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{f.path}: partial rotary embeddings (llama.rope.dimension_count="
                              f"{f.get('llama.rope.dimension_count')} of head size {head_dim}) are not supported")
    tokens = f.get("tokenizer.ggml.tokens") or []
    vocab = f.get("llama.vocab_size") or len(tokens) or int(f.tensors["token_embd.weight"].shape[1])
    eos = f.get("tokenizer.ggml.eos_token_id")
    return TextConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(f.require("llama.feed_forward_length")),
        num_layers=int(f.require("llama.block_count")), num_heads=heads,
        num_kv_heads=int(f.get("llama.attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(f.require("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(f.require("llama.context_length")),
        bos_token_id=int(f.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(eos) if eos is not None else 2,
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
        rope_scaling={"rope_type": "linear", "factor": float(f.require("llama.rope.scaling.factor"))}
        if scaling == "linear" else None,
        tie_word_embeddings="output.weight" not in f.tensors,  # convert_hf_to_gguf writes no output when tied
    )


def vision_config(f: GGUFFile) -> tuple[VisionConfig, int, str, tuple | None]:
    """(VisionConfig, vision_feature_layer as a hidden-state index, projector type, LLaVA-1.6's image grid
    pinpoints as (height, width) pairs or None) of an mmproj file."""
    if f.get("general.architecture") != "clip" or not f.get("clip.has_vision_encoder", False):
        raise CheckpointError(f"{f.path}: not an mmproj file (a 'clip' GGUF with a vision encoder); "
                              f"its architecture is {f.get('general.architecture')!r}")
    if not f.get("clip.has_llava_projector", False):
        raise CheckpointError(f"{f.path}: the CLIP file has no LLaVA projector (clip.has_llava_projector)")
    projector = f.get("clip.projector_type", "mlp")
    if projector != "mlp":
        raise CheckpointError(f"{f.path}: projector type {projector!r} is not supported (LLaVA's 'mlp': "
                              "Linear-GELU-Linear, or one Linear)")
    layers = int(f.require("clip.vision.block_count"))
    feature = f.get("clip.vision.feature_layer")
    if feature is not None and len(feature) != 1:
        raise CheckpointError(f"{f.path}: multi-layer vision features {list(feature)} are not supported")
    if feature is not None and int(feature[0]) != layers:
        raise CheckpointError(f"{f.path}: clip.vision.feature_layer {feature[0]} does not match the "
                              f"{layers} encoder layers the file holds")
    vision = VisionConfig(
        hidden_size=int(f.require("clip.vision.embedding_length")),
        intermediate_size=int(f.require("clip.vision.feed_forward_length")),
        num_layers=layers, num_heads=int(f.require("clip.vision.attention.head_count")),
        image_size=int(f.require("clip.vision.image_size")), patch_size=int(f.require("clip.vision.patch_size")),
        layer_norm_eps=float(f.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu" if f.get("clip.use_gelu", False) else "quick_gelu",
    )
    return vision, layers, "mlp2x_gelu" if "mm.2.weight" in f.tensors else "linear", anyres_pinpoints(f, vision)


_PINPOINTS_KEY, _MERGE_KEY, _NEWLINE = ("clip.vision.image_grid_pinpoints", "clip.vision.mm_patch_merge_type",
                                        "model.image_newline")


def anyres_pinpoints(f: GGUFFile, vision: VisionConfig):
    """LLaVA-1.6's (height, width) pinpoints from an mmproj, or None for a LLaVA-1.5 one (no pinpoints, merge
    type absent or "flat", no newline). Any of the three without the others is an error naming what is
    missing: llava-fast arranges tiles only as spatial_unpad does, which needs all three."""
    pinpoints, merge = f.get(_PINPOINTS_KEY), f.get(_MERGE_KEY)
    has_newline = _NEWLINE in f.tensors
    if pinpoints is None and merge in (None, "flat") and not has_newline:
        return None
    if merge != "spatial_unpad":
        found = f"is {merge!r}" if merge is not None else "is missing"
        raise CheckpointError(f"{f.path}: metadata key {_MERGE_KEY!r} {found}; LLaVA-1.6 image tiling (an mmproj "
                              f"with {_PINPOINTS_KEY} or {_NEWLINE}) is supported with 'spatial_unpad' only")
    if pinpoints is None:
        raise CheckpointError(f"{f.path}: metadata key {_PINPOINTS_KEY!r} is missing (mm_patch_merge_type "
                              "'spatial_unpad' tiles images at those resolutions)")
    if not has_newline:
        raise CheckpointError(f"{f.path}: tensor {_NEWLINE!r} is missing (mm_patch_merge_type 'spatial_unpad' "
                              "appends it after each row of an image's features)")
    values = list(pinpoints) if isinstance(pinpoints, (list, tuple)) else None
    if not values or len(values) % 2 or not all(isinstance(v, int) for v in values):
        raise CheckpointError(f"{f.path}: {_PINPOINTS_KEY} must be a flat list of width, height integers, got "
                              f"{pinpoints!r:.120}")
    pairs = [values[i : i + 2] for i in range(0, len(values), 2)]
    return parse_grid_pinpoints(pairs, f.path, vision.image_size, width_first=True)


# ------------------------------------------------------------------------------------------------------
# Tokenizer from metadata
# ------------------------------------------------------------------------------------------------------


def tokenizer_from_gguf(f: GGUFFile):
    """Our Tokenizer from tokenizer.ggml.*: model "llama" (SentencePiece BPE with byte fallback, LLaMA-1/2,
    Vicuna, Mistral) or "gpt2" (byte-level BPE: LLaMA-3, SmolLM, ...)."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from llava_fast.prompts.tokenizer import Tokenizer, sentencepiece_backend

    model = f.get("tokenizer.ggml.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise CheckpointError(f"{f.path}: no tokenizer in the metadata (tokenizer.ggml.model / tokens)")
    types = f.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if model == "llama":
        backend = sentencepiece_backend(list(zip(tokens, types)), byte_fallback=_TOKEN_BYTE in types,
                                        add_dummy_prefix=bool(f.get("tokenizer.ggml.add_space_prefix", True)),
                                        legacy=True)  # llama.cpp prefixes a space after every special token
        add_bos = f.get("tokenizer.ggml.add_bos_token", True)
    elif model == "gpt2":
        pre = f.get("tokenizer.ggml.pre", "default")
        if pre not in _BPE_PRE_TOKENIZERS:
            raise CheckpointError(f"{f.path}: byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
                                  f"supported; known: {', '.join(sorted(_BPE_PRE_TOKENIZERS))}")
        kind, ignore_merges = _BPE_PRE_TOKENIZERS[pre]
        merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
        backend = tokenizers.Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "llama3")
        if kind == "digits":
            byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif kind == "llama3":
            byte_level = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_REGEX), "isolated"), byte_level])
        backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, <|eot_id|>) are matched whole in text and skipped in decoding.
        backend.add_tokens([AddedToken(t, special=k == _TOKEN_CONTROL, normalized=False)
                            for t, k in zip(tokens, types) if k in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)])
        add_bos = f.get("tokenizer.ggml.add_bos_token", kind == "llama3")
    else:
        raise CheckpointError(f"{f.path}: tokenizer model {model!r} is not supported ('llama' SentencePiece or "
                              "'gpt2' byte-level BPE)")

    def token_id(key):
        value = f.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else int(value)

    if token_id("eos") is None:
        raise CheckpointError(f"{f.path}: the tokenizer has no end-of-sequence token "
                              "(tokenizer.ggml.eos_token_id): generation could never stop")
    # A reply ends at EOS or at an end-of-turn id (LLaMA-3's <|eot_id|>, <|eom_id|>).
    eos_ids = [i for i in (token_id("eos"), token_id("eot"), token_id("eom")) if i is not None]
    template = f.get("tokenizer.chat_template")
    return Tokenizer(backend, bos_token_id=token_id("bos"), eos_token_ids=eos_ids, pad_token_id=token_id("padding"),
                     unk_token_id=token_id("unknown"), add_bos_token=bool(add_bos), chat_template=template,
                     chat_template_origin=f"{f.path} (tokenizer.chat_template)", source=f.path)


# ------------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------------


def unpermute_rotary_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute for q_proj / k_proj weights (num_heads * D, C):
    per head, GGUF's interleaved rotary pairs (rows 2i, 2i+1) back to transformers' halves (rows i, i + D/2)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _text_name(name):
    if name in _TEXT_NAMES:
        return _TEXT_NAMES[name]
    parts = name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _TEXT_LAYER_NAMES and parts[3] == "weight":
        return f"language_model.layers.{parts[1]}.{_TEXT_LAYER_NAMES[parts[2]]}.weight"
    return None


def _vision_name(name, shape, vision: VisionConfig):
    if name in _VISION_NAMES:
        return _VISION_NAMES[name]
    parts = name.split(".")  # v.blk.N.attn_q.weight
    if len(parts) != 5 or parts[:2] != ["v", "blk"]:
        return None
    what = parts[3]
    # fc1: hidden -> intermediate; weight (intermediate, hidden), bias (intermediate,)
    if what in ("ffn_up", "ffn_down"):
        what = "mlp.fc1" if shape[0] == vision.intermediate_size != vision.hidden_size else "mlp.fc2"
    elif what in _VISION_LAYER_NAMES:
        what = _VISION_LAYER_NAMES[what]
    else:
        return None
    return f"vision_tower.encoder.layers.{parts[2]}.{what}.{parts[4]}"


def _load_tensors(f: GGUFFile, expected, loaded, rename, transform, device, dtype):
    """Dequantize, rename (rename -> our name, "" to skip, None if unknown), transform and convert each
    tensor of f into `loaded`, one at a time."""
    unexpected = []
    for name in f.tensors:
        ours = rename(name)
        if ours == "":
            continue
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        tensor = transform(ours, f.tensor(name, dtype))
        want = expected[ours].shape
        if tensor.shape != want:
            if [n for n in tensor.shape if n != 1] != [n for n in want if n != 1]:
                raise CheckpointError(f"{f.path}: tensor {name} has shape {tuple(tensor.shape)}, but the metadata "
                                      f"implies {tuple(want)}")
            tensor = tensor.reshape(want)  # the mmproj converter squeezes size-1 dimensions
        loaded[ours] = tensor.to(device=device, dtype=dtype)
        del tensor
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(f"{f.path}: unexpected tensors (not part of a LLaMA / LLaVA model with this "
                              f"metadata): {shown}")


def read_gguf(path, mmproj=None, *, device, dtype):
    """Build (net, tokenizer with the file's chat template, processor or None) from a text-model GGUF and an
    optional mmproj GGUF. Errors: CheckpointError naming the file and the problem."""
    text_file = GGUFFile(os.fspath(path))
    text = text_config(text_file)
    tokenizer = tokenizer_from_gguf(text_file)  # before the weights: a bad tokenizer fails fast
    vision_file = None if mmproj is None else GGUFFile(os.fspath(mmproj))
    if vision_file is None:
        cfg = LlavaConfig(vision=None, text=text, image_token_id=text.vocab_size, layout="gguf", template="vicuna_v1")
    else:
        vision, feature_layer, projector, pinpoints = vision_config(vision_file)
        projector_w = vision_file.tensors.get("mm.2.weight") or vision_file.tensors.get("mm.weight")
        if projector_w is not None and int(projector_w.shape[1]) != text.hidden_size:
            raise CheckpointError(f"{vision_file.path}: the projector outputs {int(projector_w.shape[1])}-wide "
                                  f"embeddings, but the text model {text_file.path} is {text.hidden_size} wide; "
                                  "this mmproj belongs to another model")
        # No <image> token in a GGUF vocabulary: the id after the last token marks image positions, replaced
        # by the projected features before any embedding lookup (as for original-LLaVA checkpoints).
        cfg = LlavaConfig(vision=vision, text=text, projector_type=projector, vision_feature_layer=feature_layer,
                          vision_feature_select_strategy="default", image_token_id=text.vocab_size,
                          image_aspect_ratio=None if pinpoints else "pad", image_grid_pinpoints=pinpoints,
                          layout="gguf", template="vicuna_v1")

    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    expected, loaded = expected_weights(net), {}
    H, Hkv = text.num_heads, text.num_kv_heads

    def text_transform(ours, t):
        if ours.endswith("q_proj.weight"):
            return unpermute_rotary_rows(t, H)
        if ours.endswith("k_proj.weight"):
            return unpermute_rotary_rows(t, Hkv)
        return t

    _load_tensors(text_file, expected, loaded, _text_name, text_transform, device, dtype)
    if vision_file is not None:
        shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in vision_file.tensors.items()}
        _load_tensors(vision_file, expected, loaded,
                      lambda name: "" if name.startswith(_VISION_SKIPPED) else _vision_name(name, shapes[name], vision),
                      lambda ours, t: t, device, dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        files = text_file.path + ("" if vision_file is None else f" + {vision_file.path}")
        raise CheckpointError(f"missing tensors in {files}: {shown}")
    assign_weights(net, loaded)  # tied embeddings: lm_head shares embed_tokens' tensor
    net.requires_grad_(False)
    net.init_rope(device)

    processor = None
    if vision_file is not None:
        mean = vision_file.get("clip.vision.image_mean")
        std = vision_file.get("clip.vision.image_std")
        overrides = {} if mean is None or std is None else dict(image_mean=tuple(mean), image_std=tuple(std))
        if cfg.anyres:
            tile = ImageProcessor.clip(image_size=cfg.vision.image_size, backend="python", **overrides)
            processor = AnyResProcessor(tile, cfg.image_grid_pinpoints)
        else:
            processor = ImageProcessor.clip(image_size=cfg.vision.image_size, pad=True, **overrides)
    return net.eval(), tokenizer, processor
