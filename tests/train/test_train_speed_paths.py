"""The trainer's faster paths give the numbers of the plain ones: cached image features (the frozen tower run
once per image) against the tower every step; eager training through the references against the custom ops'
recompute formulas; float32 training without master copies; bfloat16 with float32 masters."""

import pytest
import torch
from trainutil import make_records, write_data

from llava_fast import ops
from llava_fast.train import TrainArgs, train
from llava_fast.train.trainer import ImageFeatureCache, MasterWeights


def run(tiny_ckpt, image_folder, tmp_path, records, name, **kw):
    settings = dict(stage=2, model=tiny_ckpt, data=write_data(tmp_path / "data.json", records),
                    image_folder=image_folder, output=str(tmp_path / name), batch_size=4, epochs=3, lr=1e-3,
                    gradient_checkpointing=False, log_every=1000)
    settings.update(kw)
    return train(TrainArgs(**settings))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cached_image_features_give_the_same_losses(tiny_ckpt, image_folder, tmp_path, lora):
    """Three epochs of eight records (two text-only, images shared between records): the cache serves epochs
    2 and 3, and every step's loss equals the run that runs the tower each step."""
    records = make_records(8)
    extra = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0) if lora else {}
    plain = run(tiny_ckpt, image_folder, tmp_path, records, "plain", **extra)
    cached = run(tiny_ckpt, image_folder, tmp_path, records, "cached", cache_image_features=True, **extra)
    assert len(plain.losses) == 6 and plain.losses[0][1] > 1
    assert len({round(v, 4) for _, v in plain.losses}) > 3  # the weights moved: losses differ step to step
    for (s1, a), (s2, b) in zip(plain.losses, cached.losses):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_cache_computes_each_image_once():
    class Tower(torch.nn.Module):
        calls = 0

        def image_features(self, pixels):
            Tower.calls += len(pixels)
            return pixels.flatten(1)[:, None, :4] * 2

    cache = ImageFeatureCache(Tower())
    pixels = torch.randn(3, 3, 2, 2)
    first = cache.features(pixels, [(0, 0), (5, 0), (5, 1)])
    again = cache.features(pixels[[2, 0]], [(5, 1), (0, 0)])
    assert Tower.calls == 3 and cache.bytes == 3 * 4 * 4
    torch.testing.assert_close(first, pixels.flatten(1)[:, None, :4] * 2)
    torch.testing.assert_close(again, first[[2, 0]])


def test_eager_training_gradients_equal_the_custom_op_path(tiny_ckpt):
    """The model's loss and every gradient through the references (eager training) against the same model
    through the custom ops, whose backward recomputes (the path before eager training used the references)."""
    from llava_fast.train import checkpoint as ckpt

    base = ckpt.load_base(tiny_ckpt, device="cpu", seed=0)
    net = base.net.float().train()
    net.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    cfg = net.cfg
    R = cfg.num_image_tokens
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, R), cfg.image_token_id),
                     torch.randint(3, 30000, (2, 9), generator=g)], 1)
    labels = ids.clone()
    labels[:, : R + 1] = -100
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    trained = [p for n, p in net.named_parameters() if not n.startswith("vision_tower.")]
    ops.use_backend("torch")
    eager = net.loss(ids, labels, pixels)
    eager_grads = torch.autograd.grad(eager, trained)
    inline = ops._inline_reference
    try:
        ops._inline_reference = lambda: False  # the public functions call the custom ops
        hidden = net.decode_hidden(net.embed(ids, pixels))
        C = hidden.shape[-1]
        via_ops = ops._linear_cross_entropy_op(hidden[:, :-1].reshape(-1, C), net.lm_head.weight,
                                               labels[:, 1:].reshape(-1), -100, True, True)[0]
        op_grads = torch.autograd.grad(via_ops, trained)
    finally:
        ops._inline_reference = inline
    torch.testing.assert_close(eager, via_ops, atol=1e-6, rtol=1e-6)
    for a, b in zip(eager_grads, op_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_float32_masters_are_the_parameters_and_bf16_masters_are_float32_copies():
    w = torch.nn.Parameter(torch.randn(5, 3))
    m = MasterWeights([("w", w)], torch.float32)
    assert m.masters[0] is w  # no copy: float32 parameters are their own masters
    v = torch.nn.Parameter(torch.randn(5, 3))
    original = v.detach().clone()
    m = MasterWeights([("v", v)], torch.bfloat16)
    assert v.dtype == torch.bfloat16 and m.masters[0].dtype == torch.float32
    torch.testing.assert_close(m.masters[0], original)
    v.grad = torch.randn(5, 3).to(torch.bfloat16)
    m.accumulate_grads()
    assert v.grad is None and m.masters[0].grad.dtype == torch.float32
