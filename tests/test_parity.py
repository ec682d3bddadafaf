"""Parity with transformers' LlavaForConditionalGeneration on tiny random checkpoints in every layout.

Logits within 1e-4 in float32; greedy ids identical for 20 new tokens, single rows and batched rows of
different lengths (the oracle runs each row alone). The original-LLaVA linear projector has no transformers
model, so its oracle is composed from transformers' CLIPVisionModel and LlamaForCausalLM.
"""

import checkpoints as ck
import pytest
import torch
import torch.nn.functional as F
from checkpoints import DEVICE

import llava_fast

LAYOUTS = ["save_pretrained", "hub", "model_prefix", "original"]
VARIANTS = {  # (GQA, vision_feature_layer, select strategy)
    "gqa-layer-2-default": dict(gqa=True, feature_layer=-2, strategy="default"),
    "mha-layer-1-full": dict(gqa=False, feature_layer=-1, strategy="full"),
}
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, request):
    layout, variant = request.param
    hf = ck.make_hf_model(seed=hash(variant) % 1000, **VARIANTS[variant])
    path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp(f"{layout}-{variant}")), layout)
    return hf, llava_fast.load(path, device=DEVICE, dtype="float32")


CASES = [(layout, variant) for layout in LAYOUTS for variant in VARIANTS]
# Every layout on the torch path; the Triton kernels (the interpreter on a CPU, ~8 s a case) on two layouts: the
# layout changes only how weights are found and named, which the torch cases already cover, never the kernels.
TRITON_LAYOUTS = ("hub", "original")
BACKEND_CASES = [(case, backend) for case in CASES for backend in ("torch", "triton")
                 if backend == "torch" or case[0] in TRITON_LAYOUTS]


def _rows(model, seed=0):
    """Three rows of different lengths: one image mid-prompt, text only, two images."""
    g = torch.Generator().manual_seed(seed)
    n, img = model.num_image_tokens, model.image_token_id

    def text(k):
        return torch.randint(3, 32000, (k,), generator=g).tolist()

    rows = [
        [1] + text(5) + [img] * n + text(7),
        [1] + text(11),
        [1] + text(2) + [img] * n + text(3) + [img] * n + text(4),
    ]
    return rows, [1, 0, 2]


def _hf_ids(model, row):  # the oracle's vocabulary marks images with 32000
    return torch.tensor([[32000 if t == model.image_token_id else t for t in row]])


@pytest.mark.parametrize(("checkpoint", "backend"), BACKEND_CASES, indirect=True,
                         ids=[f"{b}-{a}-{v}" for (a, v), b in BACKEND_CASES])
def test_logits_and_greedy_match_transformers(checkpoint, backend):
    hf, model = checkpoint
    size = model.config.vision.image_size
    rows, images_per_row = _rows(model)
    pixels = ck.random_pixels(sum(images_per_row), size, seed=1)
    per_row_pixels = torch.split(pixels, images_per_row)

    # Logits, row by row (transformers takes the same expanded ids).
    for row, pv in zip(rows, per_row_pixels):
        ours = model.logits([row], pv if len(pv) else None).cpu()
        with torch.no_grad():
            ref = hf(input_ids=_hf_ids(model, row), pixel_values=pv if len(pv) else None).logits
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)

    # Greedy ids: each row alone in transformers; all rows batched, and each row alone, in llava-fast.
    batched = model.generate_ids(rows, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    for row, pv, got in zip(rows, per_row_pixels, batched):
        with torch.no_grad():
            image_kw = {"pixel_values": pv} if len(pv) else {}
            ref = hf.generate(_hf_ids(model, row), **image_kw, max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=32001)
        expected = ref[0, len(row):].tolist()
        assert len(expected) == NEW_TOKENS
        assert got == expected
        alone = model.generate_ids([row], pv if len(pv) else None, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        assert alone[0] == expected


@pytest.fixture(scope="module")
def linear_checkpoint(tmp_path_factory):
    hf = ck.make_hf_model(seed=7, gqa=True, feature_layer=-2, strategy="default")
    path = str(tmp_path_factory.mktemp("original-linear"))
    w, b = ck.write_original_linear(hf, path)
    return hf, w, b, llava_fast.load(path, device=DEVICE, dtype="float32")


def _composed_oracle_logits(hf, w, b, ids, pixel_values, image_token_id):
    """CLIPVisionModel hidden state -2, CLS dropped, linear projector, LlamaForCausalLM on inputs_embeds."""
    vision = hf.model.vision_tower if hasattr(hf, "model") else hf.vision_tower
    lm = hf.model.language_model if hasattr(hf, "model") else hf.language_model.model
    lm_head = hf.lm_head if hasattr(hf, "lm_head") else hf.language_model.lm_head
    is_img = ids == image_token_id
    embeds = lm.embed_tokens(ids.masked_fill(is_img, 0))
    if pixel_values is not None:
        feats = vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        embeds = embeds.masked_scatter(is_img.unsqueeze(-1), F.linear(feats, w, b).reshape(-1, embeds.shape[-1]))
    return lm_head(lm(inputs_embeds=embeds).last_hidden_state)


def test_original_linear_projector_matches_composed_oracle(linear_checkpoint, backend):
    hf, w, b, model = linear_checkpoint
    assert model.config.projector_type == "linear" and model.config.layout == "original"
    assert model.image_token_id == 32064  # no <image> row in an original vocabulary: the id after the last
    rows, images_per_row = _rows(model, seed=3)
    pixels = ck.random_pixels(sum(images_per_row), model.config.vision.image_size, seed=2)
    per_row = torch.split(pixels, images_per_row)
    batched = model.generate_ids(rows, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    for row, pv, got in zip(rows, per_row, batched):
        pv = pv if len(pv) else None
        ids = torch.tensor([row])
        with torch.no_grad():
            ref = _composed_oracle_logits(hf, w, b, ids, pv, model.image_token_id)
        torch.testing.assert_close(model.logits(ids, pv).cpu(), ref, atol=1e-4, rtol=0)
        expected = []  # greedy, no cache: recompute the whole sequence each step
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                nxt = int(_composed_oracle_logits(hf, w, b, ids, pv, model.image_token_id)[0, -1].argmax())
                expected.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == expected


def test_vision_layers_after_feature_layer_are_never_built(tmp_path):
    hf = ck.make_hf_model(seed=1, vision_layers=4, feature_layer=-2)
    model = llava_fast.load(ck.write_checkpoint(hf, str(tmp_path), "hub"), device=DEVICE)
    names = dict(model.net.named_parameters())
    assert len(model.net.vision_tower.encoder.layers) == 3  # 4 layers, feature layer -2 = output of layer 3
    assert not any("post_layernorm" in n or "encoder.layers.3." in n for n in names)
