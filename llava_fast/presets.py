"""Built-in model shapes with random weights: run and benchmark llava-fast with no download.

Random weights produce noise text; what they measure (speed, memory) is the same as with real weights of
the same shapes. `tiny` is small enough for the CPU.
"""

from __future__ import annotations

import os

import torch

from llava_fast.checkpoints.config import LlavaConfig, TextConfig, VisionConfig
from llava_fast.errors import InputError

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BUNDLED_TOKENIZER = os.path.join(ASSETS, "tokenizer")
BUNDLED_IMAGE = os.path.join(ASSETS, "extreme_ironing.jpg")

_CLIP_L_336 = VisionConfig()  # ViT-L/14 at 336 px: 24 layers, 1024 wide, 576 patches
_CLIP_L_224 = VisionConfig(image_size=224)  # 256 patches (LLaVA v1)
_VICUNA_7B = TextConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
# Mistral-7B-Instruct-v0.2, LLaVA-1.6's Mistral backbone (llava-v1.6-mistral-7b-hf's text_config): GQA 32/8, a
# 14,336-wide MLP, RoPE theta 1e6, no sliding window.
_MISTRAL_7B = TextConfig(vocab_size=32064, intermediate_size=14336, num_kv_heads=8, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1e6)
_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # LLaVA-1.6's, (height, width)
_VICUNA_13B = TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                         num_kv_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5)

PRESETS = {
    "llava-1.5-7b": LlavaConfig(vision=_CLIP_L_336, text=_VICUNA_7B),
    "llava-1.5-13b": LlavaConfig(vision=_CLIP_L_336, text=_VICUNA_13B),
    "llava-v1-7b": LlavaConfig(vision=_CLIP_L_224, text=_VICUNA_7B, projector_type="linear",
                               vision_feature_layer=-2, template="llava_v0"),
    # The CPU preset: a 6-layer, 512-wide LLaMA (GQA 8/4) reading a 4-layer ViT at 224 px (256 image tokens).
    "tiny": LlavaConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=224),
        text=TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8,
                        num_kv_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5),
        vision_feature_layer=-1,
    ),
    # LLaVA-NeXT (AnyRes): a 672x672 image is 5 tiles of 336 px, 2,928 image positions.
    "llava-v1.6-mistral-7b": LlavaConfig(vision=_CLIP_L_336, text=_MISTRAL_7B, image_grid_pinpoints=_NEXT_PINPOINTS,
                                         template="mistral_instruct"),
    # The CPU NeXT preset: tiny's decoder and tower, the tower at LLaVA-1.6's 336-px tiles and pinpoints (so the
    # same 5 tiles and 2,928 positions for a 672x672 image), 4,096 positions.
    "tiny-next": LlavaConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=336),
        text=TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8,
                        num_kv_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision_feature_layer=-1, image_grid_pinpoints=_NEXT_PINPOINTS, template="mistral_instruct",
    ),
}


def preset_config(name) -> LlavaConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return LlavaConfig.from_dict(PRESETS[name].to_dict())  # a copy the caller may change


def random_init_(net, seed=0):
    """Initialise like a trained transformer's statistics: weights N(0, 0.02), norms 1, biases 0. Done in
    place on the weights' device, so a 7B preset never passes through host memory."""
    g = torch.Generator(device=net.lm_head.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return net


def random_model(name="tiny", *, device=None, dtype=None, seed=0, compile=False, quantize=None):
    """A LlavaModel with the preset's shapes, random weights, the bundled tokenizer and CLIP preprocessing
    (q/k/v and gate/up fused for inference, as load() does; compile and quantize as in load())."""
    from llava_fast.api import LlavaModel
    from llava_fast.checkpoints.load import checkpoint_image_processor, resolve_device_dtype
    from llava_fast.cpu.quantize import parse_scheme, prepare_for_inference
    from llava_fast.model import LlavaForCausalLM
    from llava_fast.prompts.tokenizer import Tokenizer

    cfg = preset_config(name)
    if quantize is not None:
        parse_scheme(quantize)
    device, dtype = resolve_device_dtype(device, dtype)
    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    net = random_init_(net.to_empty(device=device).to(dtype), seed)
    net.requires_grad_(False).eval().init_rope(device)
    net = prepare_for_inference(net.fuse_projections(), quantize, compile=compile)
    processor = checkpoint_image_processor(None, cfg)  # CLIP's defaults; AnyRes tiles on the pinpoints
    return LlavaModel(net, Tokenizer.from_dir(BUNDLED_TOKENIZER), processor, compile=compile)
