"""The real llava-1.5 config files (../shared/reference/configs) read into the shapes LLaVA-1.5-7B has."""

import json
import os

import pytest
import torch

from llava_fast.checkpoints.config import LlavaConfig, llava_hf_config, original_llava_config
from llava_fast.errors import CheckpointError
from llava_fast.model import LlavaForCausalLM

CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _read(reference_dir, name):
    with open(os.path.join(reference_dir, "configs", name, "config.json")) as f:
        return json.load(f)


def _param_count(cfg: LlavaConfig):
    with torch.device("meta"):
        return sum(p.numel() for p in LlavaForCausalLM(cfg).parameters())


def test_llava_hf_minimal_hub_config_falls_back_to_llama_7b(reference_dir):
    cfg = llava_hf_config(_read(reference_dir, "llava-1.5-7b-hf"))
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size) == (4096, 32, 32, 32, 11008)
    assert (t.vocab_size, t.max_position_embeddings, t.rms_norm_eps, t.head_dim) == (32064, 4096, 1e-5, 128)
    assert (v.hidden_size, v.num_layers, v.image_size, v.patch_size) == (1024, 24, 336, 14)
    assert (cfg.num_image_tokens, cfg.num_vision_layers_run, cfg.image_token_id) == (576, 23, 32000)
    assert (cfg.projector_type, cfg.template, cfg.text.pad_token_id) == ("mlp2x_gelu", "llava_hf", 32001)
    # LLaVA-1.5-7B: 6.74B LLaMA (32064 vocab) + 0.30B CLIP-L up to layer 23 + 21M projector.
    assert 7.0e9 < _param_count(cfg) < 7.1e9


def test_original_config_with_its_clip_tower(reference_dir):
    cfg = original_llava_config(_read(reference_dir, "llava-v1.5-7b-original"), CLIP_L_336)
    assert (cfg.projector_type, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (
        "mlp2x_gelu", -2, "default")
    assert (cfg.image_aspect_ratio, cfg.template, cfg.layout) == ("pad", "vicuna_v1", "original")
    assert cfg.image_token_id == 32000 == cfg.text.vocab_size  # no <image> row: the first id past the vocabulary
    assert cfg.num_image_tokens == 576


@pytest.mark.parametrize("change, message", [
    ({"mm_projector_type": "mlp3x_gelu"}, "3-layer MLP"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"mm_hidden_size": 768}, "mm_hidden_size=768"),
    ({"mm_vision_select_feature": "middle"}, "unknown vision feature selection"),
    ({"image_aspect_ratio": "anyres"}, "anyres"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling of type .dynamic. is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
])
def test_unsupported_original_configs_are_named(reference_dir, change, message):
    d = {**_read(reference_dir, "llava-v1.5-7b-original"), **change}
    with pytest.raises(CheckpointError, match=message):
        original_llava_config(d, CLIP_L_336)


def test_feature_layer_outside_the_tower_is_an_error(reference_dir):
    d = {**_read(reference_dir, "llava-1.5-7b-hf"), "vision_feature_layer": -30}
    with pytest.raises(CheckpointError, match="vision_feature_layer=-30"):
        llava_hf_config(d).num_vision_layers_run


def test_config_round_trips_through_a_dict(reference_dir):
    cfg = llava_hf_config(_read(reference_dir, "llava-1.5-7b-hf"))
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg
