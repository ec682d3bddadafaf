"""LLaMA-3-style and small-LM checkpoints in the llava-hf layout, against transformers: rope_theta 500000 with
llama3 RoPE scaling, head_dim that is not hidden/heads, attention and MLP biases, tied embeddings (no lm_head
tensor). Logits within 1e-4 in float32 at positions past the scaling's original context, greedy ids equal; the
tied checkpoint shares one tensor, and the trainer keeps it tied and saves it as transformers does."""

import os

import checkpoints as ck
import pytest
import torch
from checkpoints import DEVICE

import llava_fast
from llava_fast import ops
from llava_fast.checkpoints.config import text_config_from_dict
from llava_fast.errors import CheckpointError

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {
    # LLaMA-3.1-like: theta 500000, llama3 scaling whose original context (64) the test rows pass, head_dim 24
    "llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, head_dim=24),
    "biases": dict(attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint dir, llava-fast model), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            hf = ck.make_hf_model(seed=7, text=VARIANTS[name])
            path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp(name)), "save_pretrained")
            built[name] = (name, hf, path, llava_fast.load(path, device=DEVICE, dtype="float32"))
        return built[name]

    return get


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, checkpoints):
    return checkpoints(request.param)


def _row(model, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 32000, (length,), generator=g).tolist()


def test_logits_and_greedy_match_transformers(variant):
    name, hf, _, model = variant
    pv = ck.random_pixels(1, model.config.vision.image_size, seed=2)
    row = _row(model, 5) + [model.image_token_id] * model.num_image_tokens + _row(model, 90, seed=1)
    ours = model.logits([row], pv).cpu()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([row]), pixel_values=pv).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    got = model.generate_ids([row], pv, max_new_tokens=12, eos_token_id=None)[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([row]), pixel_values=pv, max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=32001)[0, len(row):].tolist()
    assert got == expected


def test_llama3_rope_frequencies_are_transformers(checkpoints):
    variant = checkpoints("llama3")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = variant[1].config.text_config
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](text, "cpu")
    ours = ops.rope_inv_freq(24, 500000.0, variant[3].config.text.rope_scaling)
    assert ours.shape == ref.shape == (12,)
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)
    assert (ours < ops.rope_inv_freq(24, 500000.0)).any()  # the scaling changed some frequencies


def test_tied_embeddings_share_one_tensor(variant):
    name, _, path, model = variant
    if name != "tied":
        assert model.net.lm_head.weight.data_ptr() != model.net.language_model.embed_tokens.weight.data_ptr()
        return
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert not any("lm_head" in k for k in f.keys())  # transformers saved no lm_head
    net = model.net
    assert net.lm_head.weight is net.language_model.embed_tokens.weight
    assert net.lm_head.weight.data_ptr() == net.language_model.embed_tokens.weight.data_ptr()
    params = list(net.parameters())  # memory counted once
    assert sum(p is net.lm_head.weight for p in params) == 1


def test_trainer_keeps_tied_embeddings_tied_and_saves_as_transformers(checkpoints, tmp_path):
    _, hf, path, _ = checkpoints("tied")
    from transformers import LlavaForConditionalGeneration

    from llava_fast.train import checkpoint as ckpt
    from llava_fast.train.trainer import trainable_parameters

    base = ckpt.load_base(path)
    net = base.net
    assert net.lm_head.weight is net.language_model.embed_tokens.weight
    llm, _ = trainable_parameters(net, stage=2, lora=False)
    names = [n for n, _ in llm]
    assert "language_model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len({id(p) for _, p in llm}) == len(llm)  # no parameter twice in the optimizer
    with torch.no_grad():
        net.language_model.embed_tokens.weight.add_(0.5)  # a "trained" embedding, seen by lm_head too
    assert torch.equal(net.lm_head.weight, net.language_model.embed_tokens.weight)
    ckpt.save_llava_hf(str(tmp_path), base, {"language_model.embed_tokens.weight": net.lm_head.weight})
    from safetensors import safe_open

    keys = []
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(tmp_path, f), "pt") as st:
                keys += list(st.keys())
    assert not any("lm_head" in k for k in keys)
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path))
    torch.testing.assert_close(reloaded.lm_head.weight, net.lm_head.weight.float())


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling of type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, r"rope_parameters of type 'longrope'"),
    ({"model_type": "qwen2"}, r"text model type 'qwen2' is not supported"),  # mistral is supported (LLaMA's math)
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
])
def test_unsupported_variants_name_the_field(change, message):
    with pytest.raises(CheckpointError, match=message):
        text_config_from_dict({"model_type": "llama", **change}, "ckpt/config.json")


def test_llama3_config_fields_are_read():
    t = text_config_from_dict({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192},
                               "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_size": 2048,
                               "num_attention_heads": 32, "tie_word_embeddings": True})
    assert (t.rope_theta, t.rope_scaling["rope_type"], t.rope_scaling["factor"]) == (500000.0, "llama3", 32.0)
    assert (t.eos_token_id, t.head_dim, t.tie_word_embeddings) == (128001, 64, True)


def test_tied_checkpoint_that_also_stores_lm_head_loads_tied(checkpoints, tmp_path):
    """The hub layout writes language_model.lm_head.weight even when tied; transformers ties it to
    embed_tokens on load, and so does llava-fast (one tensor, logits equal)."""
    _, hf, _, _ = checkpoints("tied")
    path = ck.write_checkpoint(hf, str(tmp_path), "hub")
    model = llava_fast.load(path, device=DEVICE, dtype="float32")
    net = model.net
    assert net.lm_head.weight.data_ptr() == net.language_model.embed_tokens.weight.data_ptr()
    row = _row(model, 30)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([row])).logits
    torch.testing.assert_close(model.logits([row]).cpu(), ref, atol=1e-4, rtol=0)
