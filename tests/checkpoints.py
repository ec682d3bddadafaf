"""Tiny random LLaVA checkpoints, written by the tests in every layout llava-fast loads.

transformers builds and saves them (it is the test-only oracle), with the real LLaMA tokenizer from
tests/data/tokenizer so prompts tokenize as they do for real checkpoints. Sizes are small (ViT 32
wide, LLaMA 64 wide) so a forward pass takes milliseconds on the CPU; the vocabulary is the real 32,064.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from llava_fast.bench.random_checkpoint import LLAVA_15_CHAT_TEMPLATE

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # tests/data/README.md: sources
TOKENIZER_DIR = os.path.join(REFERENCE, "tokenizer")
IMAGE_DIR = os.path.join(REFERENCE, "images")
VOCAB = 32064
# Where the model-level tests run: the GPU when there is one (the default kernel backend there is Triton,
# which needs CUDA tensors), else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # llava-hf's padded vocabulary; <image> = 32000, <pad> = 32001


def hf_configs(*, gqa=True, image_size=28, text_layers=2, vision_layers=3, max_positions=512, text=None):
    """(CLIPVisionConfig, LlamaConfig); `text` overrides LlamaConfig fields (vocab_size, rope_scaling, ...)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=16,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    fields = dict(hidden_size=64, intermediate_size=136, num_hidden_layers=text_layers, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, vocab_size=VOCAB, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    return vision, LlamaConfig(**{**fields, **(text or {})})


def mistral_config(llama, text=None):
    """transformers' MistralConfig of hf_configs' LlamaConfig sizes; `text` overrides its fields (sliding_window:
    None unless given)."""
    from transformers import MistralConfig

    fields = {k: v for k, v in llama.to_dict().items() if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")}
    return MistralConfig(**{**fields, "sliding_window": None, **(text or {})})


def make_hf_model(seed=0, *, feature_layer=-2, strategy="default", image_token_id=32000, text_model="llama",
                  mistral=None, **sizes):
    """A random transformers LlavaForConditionalGeneration (fp32, eval mode); text_model "llama" or "mistral"
    (MistralConfig fields overridden by `mistral`, e.g. a sliding_window)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, text = hf_configs(**sizes)
    if text_model == "mistral":
        text = mistral_config(text, mistral)
    patches = (vision.image_size // vision.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                      image_seq_length=patches + (strategy == "full"), tie_word_embeddings=text.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    # transformers initialises some tensors to constants (LayerNorm, RMSNorm weights 1, biases 0); random
    # values make a parity test able to catch a swapped or skipped weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = text.pad_token_id
    return model


NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-1.6's, (height, width)


def make_hf_next_model(seed=0, *, feature_layer=-2, image_token_id=32000, text_model="llama", text=None,
                       image_size=336, pinpoints=NEXT_PINPOINTS, **sizes):
    """A random transformers LlavaNextForConditionalGeneration (fp32, eval mode) with the real 336-px tiles and
    LLaVA-1.6's pinpoints (a 672x672 image is 2,928 positions, so the context holds 4,096); text_model "llama"
    (Vicuna) or "mistral". image_size / pinpoints: smaller tiles for fast tests (28 px: 2 x 2 patches)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision, llama = hf_configs(image_size=image_size, **{"max_positions": 4096, **sizes}, text=text)
    text_cfg = mistral_config(llama, text) if text_model == "mistral" else llama
    cfg = LlavaNextConfig(vision_config=vision, text_config=text_cfg, image_token_index=image_token_id,
                          vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                          image_grid_pinpoints=pinpoints, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 32001
    return model


def copy_tokenizer(dst, src=TOKENIZER_DIR):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt), as its tokenizer_config.json and
# its GGUF's tokenizer.chat_template ship it (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0).
CHATML_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt"
    " %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# llava-hf/llava-1.5-7b-hf's chat_template.json (the processor's template: content parts, images first): the one
# the random llava-hf checkpoints of the benchmarks ship.
LLAVA_15_HF = LLAVA_15_CHAT_TEMPLATE
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2's vocabulary


def write_byte_level_tokenizer(dst, vocab_size=700, eos_ids=(2, 0), chat_template=CHATML_SMOLLM2):
    """A byte-level BPE tokenizer.json (GPT-2 / SmolLM2 style: ByteLevel pre-tokenizer and decoder, no BOS
    added) trained with `tokenizers` on LLaVA-Bench text plus CJK and emoji (so some merges hold partial UTF-8
    characters), SmolLM2's special tokens at 0..2 and "<image>" added after the vocabulary; tokenizer_config.json
    with the ChatML template and generation_config.json with several EOS ids. Returns the vocabulary size."""
    import json as _json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = ["你好，世界！这是一个测试。龘𠮷", "Emoji 😀🎉👍🏽 and flags 🇯🇵",
             "Crème brûlée, naïve façade, Ångström"] * 20
    for name in ("qa90_questions.jsonl", "qa90_gpt4_answer.jsonl"):
        with open(os.path.join(REFERENCE, "llava_bench_coco", name), encoding="utf-8") as f:
            texts += [_json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    os.makedirs(dst, exist_ok=True)
    tok.save(os.path.join(dst, "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": chat_template,
              "model_max_length": 8192}
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        _json.dump(config, f)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        _json.dump({"bos_token_id": 1, "eos_token_id": list(eos_ids), "pad_token_id": 2}, f)
    return tok.get_vocab_size(with_added_tokens=True)


def write_preprocessor(dst, image_size, grid_pinpoints=None):
    """A CLIPImageProcessor config, or with grid_pinpoints a LlavaNextImageProcessor one."""
    cfg = {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }
    if grid_pinpoints is not None:
        cfg.update(image_processor_type="LlavaNextImageProcessor", image_grid_pinpoints=grid_pinpoints, do_pad=True)
    with open(os.path.join(dst, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f)


def _canonical_state(model):
    """transformers' in-memory names (>= 4.52): model.language_model.*, model.vision_tower.vision_model.*,
    model.multi_modal_projector.*, lm_head.weight; older versions: language_model.model.* etc."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _rename(state, rules):
    import re

    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            k2, n = re.subn(pattern, repl, k)
            if n:
                k = k2
                break
        out[k] = v
    return out


def _write_shards(state, dst, num_shards, kind):
    """Split state over num_shards files of `kind` ("safetensors" or "bin") plus the index transformers
    writes beside them."""
    from safetensors.torch import save_file

    prefix, index = ("model", "model.safetensors.index.json") if kind == "safetensors" else (
        "pytorch_model", "pytorch_model.bin.index.json")
    keys = sorted(state)
    per = -(-len(keys) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        name = f"{prefix}-{i + 1:05d}-of-{num_shards:05d}.{kind}"
        chunk = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        if kind == "safetensors":
            save_file(chunk, os.path.join(dst, name), metadata={"format": "pt"})
        else:
            torch.save(chunk, os.path.join(dst, name))
        weight_map.update({k: name for k in chunk})
    with open(os.path.join(dst, index), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _to_legacy(model):
    """Whatever names this transformers version uses in memory -> the llava-hf hub names."""
    rules = [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.vision_model\.", "vision_tower.vision_model."),
        (r"^model\.vision_tower\.", "vision_tower.vision_model."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.image_newline$", "image_newline"),
        (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
    ]
    return _rename(_canonical_state(model), rules)


def write_checkpoint(model, dst, layout, *, shards=2, tokenizer_dir=TOKENIZER_DIR):
    """Write `model` (a transformers Llava model) to dst in one of:
    - "save_pretrained": transformers' own save_pretrained (whatever the installed version writes);
    - "hub": llava-hf hub names (language_model.model.*, vision_tower.vision_model.*), sharded + index;
    - "model_prefix": transformers >= 4.52's in-memory names (model.language_model.*, model.vision_tower.*
      without vision_model, top-level lm_head.weight), one model.safetensors;
    - "original": the original LLaVA repo (LlavaLlamaForCausalLM: model.*, lm_head, model.mm_projector.{0,2}),
      pytorch_model-*.bin shards + index, and the CLIP tower in dst/clip (vision_model.* safetensors).
    """
    os.makedirs(dst, exist_ok=True)
    image_size = model.config.vision_config.image_size
    if layout == "save_pretrained":
        model.save_pretrained(dst)
    elif layout in ("hub", "model_prefix"):
        legacy = _to_legacy(model)
        cfg = model.config.to_dict()
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
        if layout == "hub":
            _write_shards(legacy, dst, shards, "safetensors")
        else:
            from safetensors.torch import save_file

            state = _rename(legacy, [(r"^language_model\.model\.", "model.language_model."),
                                     (r"^language_model\.lm_head\.", "lm_head."),
                                     (r"^vision_tower\.vision_model\.", "model.vision_tower."),
                                     (r"^multi_modal_projector\.", "model.multi_modal_projector."),
                                     (r"^image_newline$", "model.image_newline")])
            save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "original":
        _write_original(model, dst, shards)
    else:
        raise ValueError(layout)
    copy_tokenizer(dst, tokenizer_dir)
    if layout != "original":  # an original checkpoint's preprocessor config comes with its CLIP tower
        write_preprocessor(dst, image_size, getattr(model.config, "image_grid_pinpoints", None))
    return dst


def _write_original(model, dst, shards):
    legacy = _to_legacy(model)
    llm = _rename({k: v for k, v in legacy.items() if not k.startswith("vision_tower.")}, [
        (r"^language_model\.model\.", "model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
        (r"^multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
        (r"^image_newline$", "model.image_newline"),
    ])
    _write_shards(llm, dst, shards, "bin")
    vc, tc = model.config.vision_config, model.config.text_config
    clip_dir = os.path.join(dst, "clip")
    os.makedirs(clip_dir, exist_ok=True)
    from safetensors.torch import save_file

    clip_state = {k.replace("vision_tower.", "", 1): v for k, v in legacy.items() if k.startswith("vision_tower.")}
    save_file(clip_state, os.path.join(clip_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
        json.dump(vc.to_dict(), f)
    write_preprocessor(clip_dir, vc.image_size)
    strategy = {"default": "patch", "full": "cls_patch"}[model.config.vision_feature_select_strategy]
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "max_position_embeddings": tc.max_position_embeddings, "num_attention_heads": tc.num_attention_heads,
        "num_hidden_layers": tc.num_hidden_layers, "num_key_value_heads": tc.num_key_value_heads,
        "rms_norm_eps": tc.rms_norm_eps, "rope_theta": 10000.0, "rope_scaling": None, "vocab_size": tc.vocab_size,
        "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "mm_hidden_size": vc.hidden_size, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": strategy,
        "mm_vision_select_layer": model.config.vision_feature_layer, "mm_vision_tower": clip_dir,
        "image_aspect_ratio": "pad", "use_mm_proj": True,
    }
    if getattr(model.config, "image_grid_pinpoints", None) is not None:
        # LLaVA-1.6: the same literal pinpoint list llava-hf's config has, which the original reads as
        # (width, height) pairs.
        cfg.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                   image_grid_pinpoints=model.config.image_grid_pinpoints)
        if tc.model_type == "mistral":
            cfg.update(architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral", sliding_window=None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def write_original_linear(model, dst, seed=0):
    """An original-layout LLaVA v1 checkpoint with a linear projector (transformers has no such model, so
    the projector weight is drawn here). Returns (weight, bias) of the projector for the oracle."""
    _write_original(model, dst, 1)
    copy_tokenizer(dst)
    g = torch.Generator().manual_seed(seed)
    vc, tc = model.config.vision_config, model.config.text_config
    w = torch.randn(tc.hidden_size, vc.hidden_size, generator=g) * 0.2
    b = torch.randn(tc.hidden_size, generator=g) * 0.02
    path = os.path.join(dst, "pytorch_model-00001-of-00001.bin")
    state = torch.load(path, weights_only=True)
    for k in [k for k in state if k.startswith("model.mm_projector.")]:
        del state[k]
    state["model.mm_projector.weight"], state["model.mm_projector.bias"] = w, b
    torch.save(state, path)
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: os.path.basename(path) for k in state}}, f)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["mm_projector_type"] = "linear"
    cfg["image_aspect_ratio"] = None
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return w, b


def random_pixels(n, image_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, image_size, image_size, generator=g)
