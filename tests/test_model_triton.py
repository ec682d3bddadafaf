"""The whole model with LLAVA_FAST_KERNELS=triton (the interpreter, on a CPU) against the torch path.

Logits within 1e-3 in float32; greedy ids identical, batched and single. The backend is switched in-process
(ops.use_backend), exactly as the environment variable does at import: the same custom ops then run the
kernels. The interpreter is slow, so this runs
one checkpoint and short generations; the full parity suite runs with the kernels on a GPU
(LLAVA_FAST_KERNELS=triton pytest tests/test_parity.py).
"""

import checkpoints as ck
import pytest
import torch
from checkpoints import DEVICE

import llava_fast
from llava_fast import ops


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = ck.make_hf_model(seed=21, gqa=True, feature_layer=-2)
    return llava_fast.load(ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("tri")), "hub"), device=DEVICE)


@pytest.fixture
def triton_backend():
    before = ops.BACKEND
    ops.use_backend("triton")
    assert ops.implementation("rotary_cached_attention") is not ops.TORCH_OPS["rotary_cached_attention"]
    yield
    ops.use_backend(before)


def _rows(model):
    g = torch.Generator().manual_seed(0)
    n, img = model.num_image_tokens, model.image_token_id
    rows = [[1] + torch.randint(3, 32000, (6,), generator=g).tolist() + [img] * n + [13, 1724],
            [1] + torch.randint(3, 32000, (3,), generator=g).tolist(),
            [1, 450] + [img] * n + torch.randint(3, 32000, (9,), generator=g).tolist()]
    return rows, ck.random_pixels(2, model.config.vision.image_size, seed=5)


def test_triton_logits_and_greedy_match_torch(model, triton_backend):
    rows, pixels = _rows(model)
    with torch.no_grad():
        ops.use_backend("torch")
        ref_logits = [model.logits([rows[0]], pixels[:1]), model.logits([rows[2]], pixels[1:])]
        ref_ids = model.generate_ids(rows, pixels, max_new_tokens=6, eos_token_id=None)
        ops.use_backend("triton")
        got_logits = [model.logits([rows[0]], pixels[:1]), model.logits([rows[2]], pixels[1:])]
        got_ids = model.generate_ids(rows, pixels, max_new_tokens=6, eos_token_id=None)
        single = model.generate_ids([rows[1]], None, max_new_tokens=6, eos_token_id=None)
    for ref, got in zip(ref_logits, got_logits):
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
    assert got_ids == ref_ids
    assert single[0] == ref_ids[1]


def test_triton_training_loss_and_grads_match_torch(model, triton_backend):
    rows, pixels = _rows(model)
    ids = torch.tensor([rows[0][:12], rows[2][:12]])  # both keep their 4 image tokens
    labels = ids.clone()
    labels[:, :6] = -100
    net = model.net
    params = [net.multi_modal_projector.linear_1.weight, net.language_model.layers[0].mlp.gate_up_proj.weight]
    results = {}
    for backend in ("torch", "triton"):
        ops.use_backend(backend)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        loss = net.loss(ids, labels, pixels)
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in params])
    for p in params:
        p.requires_grad_(False)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    for got, ref in zip(results["triton"][1], results["torch"][1]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
