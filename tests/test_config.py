"""The real llava-1.5 config files (tests/data/configs) read into the shapes LLaVA-1.5-7B has."""

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
    ({"image_aspect_ratio": "anyres"}, "anyres with mm_patch_merge_type 'flat' is not supported"),
    ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, "needs image_grid_pinpoints"),
    ({"mm_patch_merge_type": "spatial_unpad"}, "spatial_unpad' without image_aspect_ratio anyres"),
    ({"image_aspect_ratio": "anyres_max_9"}, "image_aspect_ratio 'anyres_max_9' is not supported"),
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
        _ = llava_hf_config(d).num_vision_layers_run


def test_config_round_trips_through_a_dict(reference_dir):
    cfg = llava_hf_config(_read(reference_dir, "llava-1.5-7b-hf"))
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg


# A config.json in the form of llava-hf's llava-v1.6-mistral-7b-hf: a minimal text_config whose missing fields
# (hidden_size, layers, heads) take MistralConfig's defaults, sliding_window null as Mistral-7B-Instruct-v0.2's.
NEXT_MISTRAL_HUB = {
    "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000, "projector_hidden_act": "gelu", "use_image_newline_parameter": True,
    "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                    "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_llava_next_mistral_hub_config():
    from llava_fast.checkpoints.config import llava_next_config

    cfg = llava_next_config(NEXT_MISTRAL_HUB)
    t = cfg.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (4096, 32, 32, 8, 128)
    assert (t.intermediate_size, t.max_position_embeddings, t.rope_theta, t.rms_norm_eps) == (14336, 32768, 1e6, 1e-5)
    assert cfg.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert cfg.template == "mistral_instruct" and cfg.anyres and cfg.num_image_tokens == 576
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg
    # A Mistral text config that names nothing takes MistralConfig's defaults, not LLaMA's.
    bare = llava_next_config({**NEXT_MISTRAL_HUB, "text_config": {"model_type": "mistral", "sliding_window": None}})
    t = bare.text
    assert (t.num_kv_heads, t.intermediate_size, t.max_position_embeddings) == (8, 14336, 131072)


@pytest.mark.parametrize("window,context,kept", [(4096, 32768, 4096), (None, 32768, None), (32768, 32768, None),
                                                 ("missing", 32768, 4096), (7, 512, 7), (600, 512, None)])
def test_mistral_sliding_window_is_kept_when_shorter_than_the_context(window, context, kept):
    from llava_fast.checkpoints.config import llava_next_config

    text = {**NEXT_MISTRAL_HUB["text_config"], "max_position_embeddings": context}
    if window == "missing":  # MistralConfig's default window: 4,096
        del text["sliding_window"]
    else:
        text["sliding_window"] = window
    cfg = llava_next_config({**NEXT_MISTRAL_HUB, "text_config": text})
    assert (cfg.text.sliding_window, cfg.text.max_position_embeddings) == (kept, context)
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("window", [0, -3, "4096", 7.5, True])
def test_a_sliding_window_that_is_not_a_positive_count_is_refused(window):
    from llava_fast.checkpoints.config import llava_next_config

    text = {**NEXT_MISTRAL_HUB["text_config"], "sliding_window": window}
    with pytest.raises(CheckpointError, match="sliding_window=.* must be a positive number of tokens or null"):
        llava_next_config({**NEXT_MISTRAL_HUB, "text_config": text})


@pytest.mark.parametrize("change,message", [
    ({"vision_feature_select_strategy": "full"}, "only 'default'"),
    ({"image_grid_pinpoints": [[300, 600]]}, "not multiples of the vision tower's 336-px input"),
    ({"image_grid_pinpoints": "[(336, 672)]"}, "list of \\[height, width\\] pairs"),
    ({"text_config": {"model_type": "qwen2"}}, "text model type 'qwen2' is not supported"),
])
def test_unsupported_llava_next_configs_are_named(change, message):
    from llava_fast.checkpoints.config import llava_next_config

    with pytest.raises(CheckpointError, match=message):
        llava_next_config({**NEXT_MISTRAL_HUB, **change})


def test_original_llava_16_config(reference_dir):
    """LLaVA-1.6 in the original layout: the pinpoints are (width, height) pairs, swapped on reading, order kept."""
    d = {**_read(reference_dir, "llava-v1.5-7b-original"), "image_aspect_ratio": "anyres",
         "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]]}
    cfg = original_llava_config(d, CLIP_L_336)
    assert cfg.image_grid_pinpoints == ((672, 336), (336, 672), (672, 672))
    assert (cfg.anyres, cfg.image_aspect_ratio, cfg.template) == (True, None, "llava_v1")
    mistral = original_llava_config({**d, "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral",
                                     "sliding_window": None}, CLIP_L_336)
    assert mistral.template == "mistral_instruct" and mistral.text.num_kv_heads == 32  # the file's, not Mistral's 8


@pytest.mark.parametrize("source,name_or_path,template", [
    ("/models/llava-v1.6-34b/config.json", None, "chatml_direct"),
    ("/models/LLaVA-v1.6-34B/config.json", None, "chatml_direct"),
    ("/runs/llava-v1.6-34b-task/checkpoint-500/config.json", None, "chatml_direct"),
    ("/models/my-llava/config.json", "NousResearch/Nous-Hermes-2-Yi-34B", "chatml_direct"),
    ("/models/my-llava/config.json", "01-ai/Yi-34B", "chatml_direct"),
    ("/models/llava-v1.6-vicuna-13b/config.json", "lmsys/vicuna-13b-v1.5", "llava_v1"),
    ("/models/yield-llava-v1.6-7b/config.json", "./checkpoints/yielding", "llava_v1"),  # "yi" inside a word
    ("config.json", None, "llava_v1"),
])
def test_original_llava_16_34b_takes_chatml_direct(reference_dir, source, name_or_path, template):
    """The original's CLI picks chatml_direct for LLaVA-1.6 34B (model name holding "v1.6-34b", a trainer's
    checkpoint-N taking its run's name); a config naming its Yi base says the same."""
    d = {**_read(reference_dir, "llava-v1.5-7b-original"), "image_aspect_ratio": "anyres",
         "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]]}
    if name_or_path:
        d["_name_or_path"] = name_or_path
    assert original_llava_config(d, CLIP_L_336, source).template == template
    mistral = {**d, "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "sliding_window": None}
    assert original_llava_config(mistral, CLIP_L_336, "/models/llava-v1.6-34b/config.json").template == (
        "mistral_instruct")  # the original tests "mistral" before "v1.6-34b"
