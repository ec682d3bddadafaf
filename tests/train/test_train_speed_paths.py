"""The trainer's faster paths give the numbers of the plain ones: cached image features (the frozen tower run
once per image) against the tower every step; eager training through the references against the custom ops'
recompute formulas; float32 training without master copies; bfloat16 with float32 masters."""

import json
from functools import partial

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


# ------------------------------------------------------------------------------------------------------
# Hand-written backwards of the eager training path, against autograd through the references
# ------------------------------------------------------------------------------------------------------


def _rms_norm_outputs_and_grads(fn, x, weight, residual, grad_out, grad_hidden):
    out, hidden = fn(x, weight, 1e-5, residual)
    loss = (out.double() * grad_out.double()).sum() + (hidden.double() * grad_hidden.double()).sum()
    wanted = [t for t in (x, weight, residual) if t is not None and t.requires_grad]
    return [out, hidden, *torch.autograd.grad(loss, wanted)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("weight_trains", [False, True], ids=["frozen-weight", "trained-weight"])
def test_rms_norm_training_backward_matches_autograd_through_the_reference(dtype, with_residual, weight_trains):
    """Outputs bitwise the reference's; dx, dresidual and dweight within float32 rounding of autograd through the
    reference in float32, and in bfloat16 at most 2x the reference's own error against float64."""
    g = torch.Generator().manual_seed(1)
    shape = (3, 37, 123)  # odd rows and width

    def rand(*s):
        return torch.randn(*s, generator=g)

    x32, r32, go32, gh32 = rand(*shape), rand(*shape) * 3, rand(*shape), rand(*shape)
    w32 = torch.rand(shape[-1], generator=g) + 0.5

    def inputs(dt):
        x = x32.to(dt).requires_grad_(True)
        r = r32.to(dt).requires_grad_(True) if with_residual else None
        return x, w32.to(dt).requires_grad_(weight_trains), r

    ours = _rms_norm_outputs_and_grads(ops.rms_norm, *inputs(dtype), go32.to(dtype), gh32.to(dtype))
    ref = _rms_norm_outputs_and_grads(ops.rms_norm_reference, *inputs(dtype), go32.to(dtype), gh32.to(dtype))
    exact = _rms_norm_outputs_and_grads(ops.rms_norm_reference, *inputs(torch.float64), go32.double(),
                                        gh32.double())
    assert len(ours) == 2 + 1 + with_residual + weight_trains
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    for a, b, e in zip(ours[2:], ref[2:], exact[2:]):
        assert a.dtype == dtype and a.shape == b.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            ref_err = (b.double() - e).abs().max().item()
            assert (a.double() - e).abs().max().item() <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_merged_lora_linear_matches_the_two_path_form(dtype, bias):
    """LoraLinear without dropout runs one GEMM on W + s B A; its output and the gradients of x, A and B
    (and a trained bias) against the two-path form y = x W^T + s (x A^T) B^T, in float32 to rounding and in
    bfloat16 within 2x the two-path form's own error against float64."""
    import torch.nn.functional as F

    from llava_fast.train.lora import LoraLinear

    g = torch.Generator().manual_seed(2)
    n_in, n_out, r = 45, 77, 5
    weight = torch.randn(n_out, n_in, generator=g) / 7
    b = torch.randn(n_out, generator=g) if bias else None
    A, B = torch.randn(r, n_in, generator=g) / 7, torch.randn(n_out, r, generator=g) / 3  # B non-zero: trained
    x, gy = torch.randn(2, 9, n_in, generator=g), torch.randn(2, 9, n_out, generator=g)

    def run(dt, merged):
        layer = LoraLinear(torch.nn.Parameter(weight.to(dt), requires_grad=False), r, 2.0 * r, 0.0,
                           torch.nn.Parameter(b.to(dt)) if bias else None)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.to(dt)
        xi = x.to(dt).requires_grad_(True)
        if merged:
            y = layer(xi)
        else:
            adapter = F.linear(F.linear(xi, layer.lora_A), layer.lora_B)
            y = F.linear(xi, layer.weight, layer.bias) + adapter * layer.scaling
        params = [xi, layer.lora_A, layer.lora_B] + ([layer.bias] if bias else [])
        return [y, *torch.autograd.grad(y, params, gy.to(dt))]

    ours, two_path, exact = run(dtype, True), run(dtype, False), run(torch.float64, False)
    for a, t, e in zip(ours, two_path, exact):
        assert a.dtype == dtype and a.shape == t.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-5)
        else:
            assert (a.double() - e).abs().max() <= 2 * (t.double() - e).abs().max() + 1e-6


def test_lora_linear_over_512_by_512_takes_the_two_path_form():
    """A weight over MERGED_MAX_WEIGHT (here 513 x 511) runs x W^T + s (x A^T) B^T, whose backward has no full
    weight-gradient GEMM (the adapter added by addmm, its scale folded into B): its output and gradients equal
    that form's to float32 rounding; 512 x 512 stays merged."""
    import torch.nn.functional as F

    from llava_fast.train.lora import MERGED_MAX_WEIGHT, LoraLinear

    g = torch.Generator().manual_seed(3)
    for n_out, n_in in ((513, 511), (512, 512)):
        layer = LoraLinear(torch.nn.Parameter(torch.randn(n_out, n_in, generator=g) / 20, requires_grad=False),
                           3, 6.0, 0.0)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(n_out, 3, generator=g))
        x = torch.randn(7, n_in, generator=g, requires_grad=True)
        y = layer(x)
        assert (type(y.grad_fn).__name__ == "_MergedLoraLinearBackward") == (n_out * n_in <= MERGED_MAX_WEIGHT)
        if n_out * n_in > MERGED_MAX_WEIGHT:
            ref = F.linear(x, layer.weight) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
            gy = torch.randn(7, n_out, generator=g)
            params = [x, layer.lora_A, layer.lora_B]
            for a, b in zip([y, *torch.autograd.grad(y, params, gy)], [ref, *torch.autograd.grad(ref, params, gy)]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_recomputed_swiglu_mlp_matches_autograd_through_the_linears(dtype, bias):
    """ops.swiglu_mlp_recomputed (only x kept; gate, up and the SwiGLU recomputed in backward): its output and
    the gradients of x, the three weights and biases against autograd through F.linear and swiglu_reference,
    in float32 to rounding and in bfloat16 within 2x the plain path's own error against float64."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(4)
    C, inter = 23, 37
    x, gy = torch.randn(3, 5, C, generator=g), torch.randn(3, 5, C, generator=g)
    weights = [torch.randn(inter, C, generator=g) / 5, torch.randn(inter, C, generator=g) / 5,
               torch.randn(C, inter, generator=g) / 6]
    biases = [torch.randn(w.shape[0], generator=g) for w in weights] if bias else [None] * 3

    def run(dt, recomputed):
        xi = x.to(dt).requires_grad_(True)
        ws = [w.to(dt).requires_grad_(True) for w in weights]
        bs = [b.to(dt).requires_grad_(True) if bias else None for b in biases]
        if recomputed:
            y = ops.swiglu_mlp_recomputed(xi, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2])
        else:
            y = F.linear(ops.swiglu_reference(F.linear(xi, ws[0], bs[0]), F.linear(xi, ws[1], bs[1])), ws[2], bs[2])
        inputs = [xi, *ws] + (bs if bias else [])
        return [y, *torch.autograd.grad(y, inputs, gy.to(dt))]

    ours, plain, exact = run(dtype, True), run(dtype, False), run(torch.float64, False)
    assert len(ours) == (8 if bias else 5)
    for a, p, e in zip(ours, plain, exact):
        assert a.dtype == dtype and a.shape == p.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-5)
        else:
            assert (a.double() - e).abs().max() <= 2 * (p.double() - e).abs().max() + 1e-6


def test_recomputed_mlps_give_the_same_loss_and_gradients(tiny_ckpt):
    """A stage-2 loss with every decoder MLP recomputed in backward: the loss bitwise, every trained gradient to
    float32 rounding, against the plain path; fused or LoRA MLP linears are refused."""
    from llava_fast.train import checkpoint as ckpt
    from llava_fast.train.lora import add_lora

    net = ckpt.load_base(tiny_ckpt, device="cpu", seed=0).net.float().train()
    net.requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    cfg = net.cfg
    R = cfg.num_image_tokens
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, R), cfg.image_token_id),
                     torch.randint(3, 30000, (2, 11), generator=g)], 1)
    labels = ids.clone()
    labels[:, : R + 1] = -100
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    trained = [p for n, p in net.named_parameters() if not n.startswith("vision_tower.")]
    plain_loss = net.loss(ids, labels, pixels)
    plain = torch.autograd.grad(plain_loss, trained)
    ours_loss = net.recompute_mlp_activations().loss(ids, labels, pixels)
    ours = torch.autograd.grad(ours_loss, trained)
    assert torch.equal(ours_loss, plain_loss)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    net.recompute_mlp_activations(False)
    add_lora(net, 4, 8.0)
    with pytest.raises(ValueError, match="plain gate/up/down"):
        net.recompute_mlp_activations()


def test_loss_on_target_rows_equals_the_full_rows_path(tiny_ckpt):
    """LlavaForCausalLM.loss runs the last layer's o_proj, MLP and the final norm on the target rows only; its
    loss and every gradient against the whole sequence through the decoder and the reference cross-entropy,
    with targets that skip positions inside the text (float32)."""
    from llava_fast.train import checkpoint as ckpt

    net = ckpt.load_base(tiny_ckpt, device="cpu", seed=0).net.float().train()
    net.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    cfg = net.cfg
    R = cfg.num_image_tokens
    ids = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.full((3, R), cfg.image_token_id),
                     torch.randint(3, 30000, (3, 13), generator=g)], 1)
    labels = ids.clone()
    labels[:, : R + 1] = -100
    labels[1, R + 4: R + 9] = -100  # a second prompt turn inside the text
    labels[2, -3:] = -100  # right padding
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    trained = [p for n, p in net.named_parameters() if not n.startswith("vision_tower.")]
    rows_loss = net.loss(ids, labels, pixels)
    rows_grads = torch.autograd.grad(rows_loss, trained)
    hidden = net.decode_hidden(net.embed(ids, pixels))  # (B, T, C) every position
    full_loss = ops.linear_cross_entropy_reference(hidden[:, :-1].reshape(-1, hidden.shape[-1]), net.lm_head.weight,
                                                   labels[:, 1:].reshape(-1))
    full_grads = torch.autograd.grad(full_loss, trained)
    torch.testing.assert_close(rows_loss, full_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(rows_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Gradients folded into the masters in backward, and the optimizer's step inside backward
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_step_in_backward_gives_the_plain_steps_losses(tiny_ckpt, image_folder, tmp_path, precision, lora):
    """Six steps (grad accumulation 2, so the hooks also fold and accumulate across micro-batches) without
    clipping: every loss and gradient norm of --step-in-backward against the plain step (all gradients, then
    AdamW over all parameters). float32: bit-equal losses; bfloat16: within 1e-6 relative (the same sums)."""
    records = make_records(8)
    extra = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0) if lora else {}
    common = dict(precision=precision, max_grad_norm=0.0, epochs=3, batch_size=2, grad_accum=2, **extra)
    plain = run(tiny_ckpt, image_folder, tmp_path, records, "plain", **common)
    inside = run(tiny_ckpt, image_folder, tmp_path, records, "inside", step_in_backward=True, **common)
    assert len(plain.losses) == 6 and len({round(v, 4) for _, v in plain.losses}) > 3
    if precision == "fp32":
        assert plain.losses == inside.losses
    else:
        for (s1, a), (s2, b) in zip(plain.losses, inside.losses):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-6)
    log = [json.loads(line) for line in open(tmp_path / "plain" / "train_log.jsonl")]
    log_in = [json.loads(line) for line in open(tmp_path / "inside" / "train_log.jsonl")]
    # float32 stage 2 full sums lm_head's squares by 1024-row chunks, torch's norm over its whole 32064 x 512
    # gradient: that one's float32 error is ~1e-4 relative (2.6e-4 on randn 32064 x 256 against float64), the
    # chunks' ~1e-6
    rel = 3e-4 if precision == "fp32" and not lora else 1e-5
    for a, b in zip(log, log_in):
        assert a["grad_norm"] > 0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel)


def test_bf16_one_micro_batch_steps_from_the_model_grads_as_in_backward(tiny_ckpt, image_folder, tmp_path):
    """bfloat16, one micro-batch a step, no clipping: the plain run keeps the bf16 gradients in the model until
    the step (StepFromModelGrads) and --step-in-backward updates inside backward; both make the same float32
    gradients and per-tensor AdamW updates, so four steps' losses are equal bit for bit."""
    common = dict(precision="bf16", max_grad_norm=0.0, epochs=2, batch_size=4)
    plain = run(tiny_ckpt, image_folder, tmp_path, make_records(8), "plain", **common)
    inside = run(tiny_ckpt, image_folder, tmp_path, make_records(8), "inside", step_in_backward=True, **common)
    assert len(plain.losses) == 4 and len({round(v, 4) for _, v in plain.losses}) > 2
    assert plain.losses == inside.losses


def test_step_in_backward_refuses_clipping_and_distributed_runs(tiny_ckpt, image_folder, tmp_path):
    """Clipping needs the global norm before any parameter steps: --step-in-backward with clipping is an input
    error naming the fix, as is FSDP (its gradients are reduced after backward)."""
    from llava_fast.errors import InputError

    records = make_records(4)
    with pytest.raises(InputError, match="--max-grad-norm 0"):
        run(tiny_ckpt, image_folder, tmp_path, records, "clip", step_in_backward=True)
    with pytest.raises(InputError, match="one process"):
        run(tiny_ckpt, image_folder, tmp_path, records, "fsdp", step_in_backward=True, max_grad_norm=0.0, fsdp=True)
    assert not (tmp_path / "clip").exists()


def test_recompute_mlp_training_gives_the_plain_runs_losses(tiny_ckpt, image_folder, tmp_path):
    """train --recompute-mlp (stage 2 full, no checkpointing): the first loss bitwise, the next within float32
    rounding of the plain run's; with checkpointing, LoRA or stage 1 it is an input error naming the need."""
    from llava_fast.errors import InputError

    records = make_records(4)
    common = dict(epochs=2, batch_size=2)
    plain = run(tiny_ckpt, image_folder, tmp_path, records, "plain", **common)
    ours = run(tiny_ckpt, image_folder, tmp_path, records, "recompute", recompute_mlp=True, **common)
    assert len(plain.losses) == 4 and plain.losses[0] == ours.losses[0]
    for (s1, a), (s2, b) in zip(plain.losses, ours.losses):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    for bad in (dict(gradient_checkpointing=True), dict(lora_r=4, lora_alpha=8), dict(stage=1)):
        with pytest.raises(InputError, match="--recompute-mlp .*--no-gradient-checkpointing"):
            run(tiny_ckpt, image_folder, tmp_path, records, "bad", recompute_mlp=True, **bad)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("recompute_mlp", [True, False], ids=["recomputed-mlp", "plain-mlp"])
def test_decoder_weights_hand_their_gradients_to_the_step_by_row_chunks(tiny_ckpt, image_folder, tmp_path, monkeypatch,
                                                                       recompute_mlp):
    """float32 stage 2 full with --step-in-backward (grad accumulation 2, so the last micro-batch's rows add to the
    first's accumulated gradient): every decoder layer's q/k/v/o and gate/up/down weight gradient goes from its op's
    backward to the step in 16-row chunks (the test model's 136-wide MLP: eight whole chunks and an 8-row tail), each
    row once per step, none as a whole gradient; the losses equal the plain step's bit for bit."""
    from llava_fast.train import trainer

    handed, step_rows = [], trainer.OptimizerInBackward._step_rows
    monkeypatch.setattr(ops, "WEIGHT_GRAD_ROWS_PER_CHUNK", 16)
    monkeypatch.setattr(trainer.OptimizerInBackward, "_step_rows", lambda self, p, lo, hi, g: (
        handed.append((p, lo, hi, tuple(g.shape))), step_rows(self, p, lo, hi, g)))
    records = make_records(8)
    common = dict(epochs=3, batch_size=2, grad_accum=2, max_grad_norm=0.0, recompute_mlp=recompute_mlp)
    plain = run(tiny_ckpt, image_folder, tmp_path, records, "plain", **common)
    assert not handed
    ours = run(tiny_ckpt, image_folder, tmp_path, records, "inside", step_in_backward=True, **common)
    layers = ours.net.language_model.layers
    weights = [getattr(block, n).weight for layer in layers for block, names in (
        (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj")))
        for n in names]
    for w in weights:
        rows = sorted((lo, hi, shape) for p, lo, hi, shape in handed if p is w)
        chunks = [(lo, min(lo + 16, w.shape[0]), (min(16, w.shape[0] - lo), w.shape[1]))
                  for lo in range(0, w.shape[0], 16)]
        assert rows == sorted(chunks * 6)  # every step's rows, once each
    assert max(w.shape[0] for w in weights) == 136 and (128, 136, (8, 64)) in [h[1:] for h in handed]
    head = ours.net.lm_head.weight  # the loss's vocabulary chunks are the rest
    assert {id(p) for p, *_ in handed} == {id(w) for w in weights} | {id(head)}
    assert len(plain.losses) == 6 and plain.losses == ours.losses


def test_linear_weight_grad_to_sink_gives_autograds_gradients_by_rows():
    """ops.linear_weight_grad_to_sink with a sink: the output, dx and the bias gradient are F.linear's under
    autograd bit for bit, the weight's gradient reaches the sink as its rows in 16-row chunks (a 37-row weight: 16,
    16, 5), equal to autograd's rows, after dx is formed (the sink may change the weight), and never reaches .grad."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(11)
    lin = torch.nn.Linear(23, 37)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 23, generator=g))
        lin.bias.copy_(torch.randn(37, generator=g))
    x0, gy = torch.randn(3, 7, 23, generator=g), torch.randn(3, 7, 37, generator=g)
    x = x0.clone().requires_grad_(True)
    y_ref = F.linear(x, lin.weight, lin.bias)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, lin.weight, lin.bias), gy)
    rows, w0 = [], lin.weight.detach().clone()

    def sink(weight, lo, hi, grad):
        assert weight is lin.weight
        rows.append((lo, hi, grad.clone()))
        with torch.no_grad():
            weight[lo:hi] -= 100.0  # a step: the rows' later use must not read it

    saved = ops.WEIGHT_GRAD_ROWS_PER_CHUNK
    ops.WEIGHT_GRAD_ROWS_PER_CHUNK = 16
    try:
        xs = x0.clone().requires_grad_(True)
        y = ops.linear_weight_grad_to_sink(xs, lin, sink)
        y.backward(gy)
    finally:
        ops.WEIGHT_GRAD_ROWS_PER_CHUNK = saved
    assert torch.equal(y, y_ref) and torch.equal(xs.grad, dx_ref) and torch.equal(lin.bias.grad, db_ref)
    assert lin.weight.grad is None and [(lo, hi) for lo, hi, _ in rows] == [(0, 16), (16, 32), (32, 37)]
    assert torch.equal(torch.cat([r for *_, r in rows]), dw_ref)
    assert torch.equal(lin.weight.detach(), w0 - 100.0)
    assert ops.linear_weight_grad_to_sink(x0, lin, None).grad_fn is not None  # no sink: the nn.Linear itself
    with torch.no_grad():
        assert ops.linear_weight_grad_to_sink(x0, lin, sink).grad_fn is None


def test_bf16_grads_fold_into_the_masters_in_backward():
    """With the fold hooks, a backward leaves no bf16 gradient and adds each into its float32 master gradient,
    across two backwards (accumulation), equal to accumulate_grads after each backward."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(7, 5, generator=g)
    xs = [torch.randn(3, 5, generator=g).to(torch.bfloat16) for _ in range(2)]

    def grads(fold):
        w = torch.nn.Parameter(w0.clone())
        m = MasterWeights([("w", w)], torch.bfloat16)
        if fold:
            m.fold_grads_in_backward()
        for x in xs:
            (x @ w.t()).square().sum().backward()
            if fold:
                assert w.grad is None
            m.accumulate_grads()
        return m.masters[0].grad

    folded, plain = grads(True), grads(False)
    assert folded.dtype == torch.float32 and folded.abs().sum() > 0
    assert torch.equal(folded, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_in_backward_frees_each_gradient_and_equals_the_plain_step(dtype):
    """Two layers, two steps: when the first layer's gradient is final, the last layer's has already been
    applied and freed (the whole set never exists); after backward no gradient is left, and the parameters and
    the gradient norm equal those of backward, then AdamW over all parameters (bitwise)."""
    from llava_fast.train.trainer import OptimizerInBackward, make_optimizer

    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(5, 6, generator=g), torch.randn(4, 5, generator=g)
    xs = [torch.randn(3, 6, generator=g) for _ in range(2)]

    def train(inside):
        layers = [torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone())]
        masters = MasterWeights([("w1", layers[0]), ("w2", layers[1])], dtype)
        masters.fold_grads_in_backward()
        optimizer = make_optimizer([{"params": masters.masters, "lr": 1e-2}], 0.0, torch.device("cpu"))
        seen = []
        layers[0].register_post_accumulate_grad_hook(lambda p: seen.append(masters.masters[1].grad is None))
        in_backward = OptimizerInBackward(optimizer, masters) if inside else None
        norms = []
        for x in xs:
            if inside:
                in_backward.arm(torch.device("cpu"))
            (torch.tanh(x.to(dtype) @ layers[0].t()) @ layers[1].t()).float().square().sum().backward()
            if inside:
                assert all(m.grad is None for m in masters.masters)
                norms.append(in_backward.disarm())
            else:
                norms.append(torch.nn.utils.get_total_norm([m.grad for m in masters.masters]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                masters.copy_to_model()
        return [m.detach().clone() for m in masters.masters], [p.detach().clone() for p in layers], norms, seen

    masters_in, params_in, norms_in, seen = train(True)
    masters_plain, params_plain, norms_plain, _ = train(False)
    assert seen == [True, True]
    assert not torch.equal(masters_in[0], w1)  # it trained
    for a, b in zip(masters_in + params_in, masters_plain + params_plain):
        assert torch.equal(a, b)
    for a, b in zip(norms_in, norms_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_norm", [0.05, 0.0], ids=["clipped", "unclipped"])
def test_step_from_model_grads_equals_folding_then_the_plain_step(max_norm):
    """bf16 model, float32 masters, three layers (one 97 x 61), three steps: the bf16 gradients stay in the model
    until the step (no float32 gradient after backward), then the norm, the clipped update and the rounded
    parameters equal the fold in backward + clip_grad_norm_ + AdamW over all tensors bit for bit."""
    from llava_fast.train.trainer import StepFromModelGrads, clip_or_norm, make_optimizer

    g = torch.Generator().manual_seed(6)
    shapes = [(61, 7), (97, 61), (5, 97)]
    weights = [torch.randn(*s, generator=g) / s[1] ** 0.5 for s in shapes]
    xs = [torch.randn(9, 7, generator=g) for _ in range(3)]

    def train(from_model):
        layers = [torch.nn.Parameter(w.clone()) for w in weights]
        masters = MasterWeights([(f"w{i}", p) for i, p in enumerate(layers)], torch.bfloat16)
        optimizer = make_optimizer([{"params": masters.masters, "lr": 1e-2}], 0.01, torch.device("cpu"))
        stepper = StepFromModelGrads(optimizer, masters) if from_model else masters.fold_grads_in_backward()
        norms = []
        for x in xs:
            h = x.to(torch.bfloat16)
            for p in layers:
                h = torch.tanh(h @ p.t())
            h.float().square().sum().backward()
            if from_model:
                assert all(m.grad is None for m in masters.masters)
                assert all(p.grad.dtype == torch.bfloat16 for p in layers)
                norms.append(stepper.step(max_norm))
                assert all(p.grad is None and m.grad is None for p, m in zip(layers, masters.masters))
            else:
                norms.append(clip_or_norm(masters.masters, max_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                masters.copy_to_model()
        return masters.masters + layers, norms, optimizer.state_dict()

    ours, ours_norms, ours_state = train(True)
    plain, plain_norms, plain_state = train(False)
    assert not torch.equal(ours[1], weights[1])  # it trained
    if max_norm:
        assert min(plain_norms) > 2 * max_norm  # the clipping applied on every step
    for a, b in zip(ours + ours_norms, plain + plain_norms):
        assert torch.equal(a, b)
    for k, state in plain_state["state"].items():  # the moments and step counts a checkpoint saves
        assert all(torch.equal(v, ours_state["state"][k][n]) for n, v in state.items())


def test_stage1_fused_frozen_projections_give_the_same_losses_and_checkpoint(tiny_ckpt, image_folder, tmp_path,
                                                                            monkeypatch):
    """Stage 1 fuses the frozen decoder's q/k/v and gate/up: three steps' losses against the unfused model's,
    and the written checkpoint has the split names and the same tensors."""
    from safetensors.torch import load_file

    from llava_fast.train import trainer

    records = make_records(8)
    fused = run(tiny_ckpt, image_folder, tmp_path, records, "fused", stage=1, epochs=1, batch_size=2, lr=1e-2)
    assert fused.net.language_model.layers[0].self_attn.qkv_proj is not None
    monkeypatch.setattr(trainer, "fuse_frozen_projections", lambda net, stage, fsdp=False: None)
    plain = run(tiny_ckpt, image_folder, tmp_path, records, "plain", stage=1, epochs=1, batch_size=2, lr=1e-2)
    assert plain.net.language_model.layers[0].self_attn.qkv_proj is None
    assert len(fused.losses) == 3  # 6 image records (stage 1 skips the text-only ones), batch 2
    for (s1, a), (s2, b) in zip(fused.losses, plain.losses):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    ours, theirs = (load_file(tmp_path / n / "mm_projector.safetensors") for n in ("fused", "plain"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6)
    files = sorted(p.name for p in (tmp_path / "fused").glob("model-*.safetensors"))
    names = set().union(*(load_file(tmp_path / "fused" / f).keys() for f in files))
    assert any(n.endswith("self_attn.q_proj.weight") for n in names) and not any("qkv_proj" in n for n in names)


@pytest.mark.parametrize("stage,lora", [(1, False), (2, True), (2, False)])
def test_frozen_weights_load_straight_into_bfloat16_with_the_cast_bits(tiny_ckpt, stage, lora):
    """A bfloat16 run reads each weight it does not train straight into bfloat16 (a 7B LoRA run never holds
    its frozen weights in float32), with the bits the float32 load then the trainer's cast gave; the trained
    ones stay float32."""
    from llava_fast.train import checkpoint as ckpt
    from llava_fast.train.trainer import trains_llm_weight

    def trains(name):
        return name.startswith("multi_modal_projector.") or trains_llm_weight(name, stage, lora)

    reference = dict(ckpt.load_base(tiny_ckpt, seed=0).net.named_parameters())
    direct = dict(ckpt.load_base(tiny_ckpt, seed=0, frozen_dtype=torch.bfloat16, trains=trains).net.named_parameters())
    assert direct.keys() == reference.keys()
    frozen = [n for n in direct if not trains(n)]
    assert frozen and any(n.startswith("language_model.layers.") for n in frozen) == (stage == 1 or lora)
    for name, p in direct.items():
        want = reference[name] if trains(name) else reference[name].to(torch.bfloat16)
        assert p.dtype == want.dtype, name
        assert torch.equal(p, want), name


@pytest.mark.parametrize("max_norm", [0.05, 0.0], ids=["clipped", "unclipped"])
def test_row_sparse_adamw_equals_torch_adamw_on_the_dense_gradient(max_norm):
    """A 37 x 23 table (odd rows and width) beside a dense 5 x 23 weight, four steps, weight decay, row chunks
    of 16 (16, 16 and 5 rows): each step looks up a few rows (some twice, some rows never), so untouched rows move
    only by their decaying moments. The embedding's sparse gradient, stepped by row chunks, leaves the table, its
    moments and step count equal bit for bit to the dense gradient's fused AdamW; the global norm is equal within
    float32 rounding (its squares are summed in another order), so with clipping (clip_grad_norm_ on the dense
    side) everything is equal within 1e-5 relative."""
    from llava_fast.train.trainer import clip_or_norm, make_optimizer, step_row_sparse

    g = torch.Generator().manual_seed(7)
    table0, w0 = torch.randn(37, 23, generator=g), torch.randn(5, 23, generator=g)
    batches = [torch.randint(0, 37, (2, 6), generator=g) for _ in range(4)]
    batches[1][0, :3] = 36  # the last row, in the last (short) chunk, three times
    targets = [torch.randn(2, 6, 5, generator=g) for _ in range(4)]

    def train(sparse):
        table, w = torch.nn.Parameter(table0.clone()), torch.nn.Parameter(w0.clone())
        optimizer = make_optimizer([{"params": [table, w], "lr": 3e-2}], 0.01, torch.device("cpu"))
        norms = []
        for ids, y in zip(batches, targets):
            out = torch.nn.functional.embedding(ids, table, sparse=sparse) @ w.t()
            (out - y).square().sum().backward()
            assert table.grad.is_sparse == sparse
            if sparse:
                norms.append(clip_or_norm([table, w], max_norm))
            elif max_norm:
                norms.append(torch.nn.utils.clip_grad_norm_([table, w], max_norm))
            else:
                norms.append(torch.nn.utils.get_total_norm([table.grad, w.grad]))
            step_row_sparse(optimizer, rows_per_chunk=16)
            assert table.grad is None or not sparse
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return table.detach(), w.detach(), norms, optimizer.state_dict()

    ours, ours_w, ours_norms, ours_state = train(True)
    plain, plain_w, plain_norms, plain_state = train(False)
    untouched = sorted(set(range(37)) - set(torch.cat([b.flatten() for b in batches]).tolist()))
    assert untouched and not torch.equal(ours[untouched[0]], table0[untouched[0]])  # moved by its moments
    if max_norm:
        assert min(plain_norms) > 2 * max_norm  # the clipping applied on every step
    for a, b in zip(ours_norms, plain_norms):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # unclipped: bit for bit; clipped: the clip factor comes from the norm, equal within float32 rounding
    same = torch.equal if not max_norm else partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)
    for a, b in [(ours, plain), (ours_w, plain_w)] + [
            (v, ours_state["state"][k][n]) for k, state in plain_state["state"].items() for n, v in state.items()]:
        assert same(a, b) in (True, None)  # the moments and step counts a checkpoint saves too
    with pytest.raises(ValueError, match="multiple of 16"):
        step_row_sparse(torch.optim.AdamW([torch.nn.Parameter(table0.clone())]), rows_per_chunk=5)


def test_float32_stage2_keeps_the_embedding_gradient_sparse_with_the_dense_runs_losses(tiny_ckpt, image_folder,
                                                                                      tmp_path, monkeypatch):
    """Float32 stage 2 full keeps the embedding table's gradient as its rows (sparse); bfloat16 and LoRA do not.
    Four clipped steps give the dense gradient's first loss bit for bit and the next ones within float32
    rounding (the global norm's sum order), and so do the trained weights."""
    from llava_fast.train import trainer

    records = make_records(8)
    common = dict(epochs=2, batch_size=4, max_grad_norm=0.5)
    ours = run(tiny_ckpt, image_folder, tmp_path, records, "sparse", **common)
    assert ours.net.language_model.embed_tokens.sparse
    monkeypatch.setattr(trainer, "sparse_embedding_grad", lambda *args: False)
    plain = run(tiny_ckpt, image_folder, tmp_path, records, "dense", **common)
    assert not plain.net.language_model.embed_tokens.sparse
    assert len(ours.losses) == 4 and ours.losses[0] == plain.losses[0]
    for (s1, a), (s2, b) in zip(ours.losses, plain.losses):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6)
    log = [json.loads(line) for line in open(tmp_path / "sparse" / "train_log.jsonl")]
    assert all(m["grad_norm"] > 0.5 for m in log)  # clipped on every step
    for (n, a), (_, b) in zip(ours.net.state_dict().items(), plain.net.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_sparse_embedding_gradient_rule():
    """Only float32 stage 2 full in one process, with untied embeddings."""
    from llava_fast.train.trainer import sparse_embedding_grad

    class Net(torch.nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.language_model = torch.nn.Module()
            self.language_model.embed_tokens = torch.nn.Embedding(11, 4)
            self.lm_head = torch.nn.Linear(4, 11, bias=False)
            if tied:
                self.lm_head.weight = self.language_model.embed_tokens.weight

    net, tied = Net(False), Net(True)
    assert sparse_embedding_grad(net, 2, False, torch.float32)
    assert not sparse_embedding_grad(tied, 2, False, torch.float32)
    assert not sparse_embedding_grad(net, 2, False, torch.bfloat16)
    assert not sparse_embedding_grad(net, 2, True, torch.float32)
    assert not sparse_embedding_grad(net, 1, False, torch.float32)
    assert not sparse_embedding_grad(net, 2, False, torch.float32, distributed=True)


@pytest.mark.parametrize("max_norm", [0.05, 0.0], ids=["two-pass-clipped", "in-backward-unclipped"])
def test_in_backward_steps_the_sparse_embedding_and_lm_head_by_rows_as_the_plain_step(monkeypatch, max_norm):
    """A 37-token vocabulary (embedding and untied lm_head 37 x 24, a 24 x 24 layer between), three steps of 2 x 6
    tokens, weight decay, lm_head's gradient in 16-row vocabulary chunks (16, 16, 5): stepping in backward, the
    embedding's gradient is its rows (sparse) and lm_head's never reaches .grad, each chunk stepped as the loss
    hands it over. Unclipped, the parameters, moments and step counts equal backward + AdamW on the dense
    gradients bit for bit; with --two-pass-clipping's two passes against clip_grad_norm_ within float32 rounding
    (the norm's squares are summed in another order)."""
    from llava_fast.train.trainer import (
        OptimizerInBackward,
        clip_factor,
        keep_embedding_grad_sparse,
        make_optimizer,
    )

    monkeypatch.setattr(ops, "VOCAB_ROWS_PER_GRAD_CHUNK", 16)
    g = torch.Generator().manual_seed(8)
    embed0, head0, mid0 = (torch.randn(37, 24, generator=g), torch.randn(37, 24, generator=g) * 0.3,
                           torch.randn(24, 24, generator=g) * 0.3)
    batches = [torch.randint(0, 37, (2, 6), generator=g) for _ in range(3)]
    labels = [torch.where(torch.rand(2, 6, generator=g) < 0.25, -100, torch.randint(0, 37, (2, 6), generator=g))
              for _ in range(3)]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = torch.nn.Module()
            self.language_model.embed_tokens = torch.nn.Embedding(37, 24, _weight=embed0.clone())
            self.mid = torch.nn.Parameter(mid0.clone())
            self.lm_head = torch.nn.Linear(24, 37, bias=False)
            self.lm_head.weight = torch.nn.Parameter(head0.clone())
            self.lm_head_grad_sink = None

        def loss(self, ids, y):
            x = torch.tanh(self.language_model.embed_tokens(ids) @ self.mid.t()).reshape(-1, 24)
            return ops.linear_cross_entropy_target_rows(x, self.lm_head.weight, y.reshape(-1),
                                                        weight_grad_sink=self.lm_head_grad_sink)

    def train(inside):
        net = Net()
        named = [("embed", net.language_model.embed_tokens.weight), ("mid", net.mid), ("head", net.lm_head.weight)]
        masters = MasterWeights(named, torch.float32)
        optimizer = make_optimizer([{"params": masters.masters, "lr": 3e-2}], 0.01, torch.device("cpu"))
        spans, norms = [], []
        if inside:
            keep_embedding_grad_sparse(net)
            in_backward = OptimizerInBackward(optimizer, masters, net)
            net.language_model.embed_tokens.weight.register_hook(lambda grad: spans.append(grad.is_sparse))
            net.lm_head.weight.register_hook(lambda grad: None if grad is None else spans.append("head's gradient"))
        for ids, y in zip(batches, labels):
            if inside and max_norm:
                in_backward.arm(torch.device("cpu"), norm_only=True)
                net.loss(ids, y).backward()
                in_backward.arm(torch.device("cpu"), scale=clip_factor(in_backward.disarm(), max_norm))
            elif inside:
                in_backward.arm(torch.device("cpu"))
            net.loss(ids, y).backward()
            if inside:
                assert all(p.grad is None for _, p in named) and net.lm_head_grad_sink is not None
                norms.append(in_backward.disarm())
                assert net.lm_head_grad_sink is None
            else:
                norms.append(torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm) if max_norm else
                             torch.nn.utils.get_total_norm([p.grad for _, p in named]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return [p.detach() for _, p in named], norms, optimizer.state_dict(), spans

    ours, ours_norms, ours_state, spans = train(True)
    plain, plain_norms, plain_state, _ = train(False)
    assert spans == [True] * (3 * (2 if max_norm else 1))  # sparse rows, and no whole lm_head gradient
    assert not torch.equal(ours[2], head0)
    if max_norm:
        assert min(plain_norms) > 2 * max_norm
    for a, b in zip(ours_norms, plain_norms):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    same = torch.equal if not max_norm else partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)
    for a, b in list(zip(ours, plain)) + [
            (v, ours_state["state"][k][n]) for k, state in plain_state["state"].items() for n, v in state.items()]:
        assert same(a, b) in (True, None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_pass_clipping_gives_the_clipped_steps_losses(tiny_ckpt, image_folder, tmp_path, precision):
    """--two-pass-clipping (a norm-only backward, then each clipped gradient stepped inside a second backward)
    against the plain step (every gradient, clip_grad_norm_, AdamW), four steps clipped at 0.5 (below every
    step's norm): the first loss bit for bit, the next, the logged norms and the trained weights within float32
    rounding (the norm's squares are summed in another order; bf16: its roundings of the weights)."""
    common = dict(precision=precision, max_grad_norm=0.5, epochs=2, batch_size=4)
    plain = run(tiny_ckpt, image_folder, tmp_path, make_records(8), "plain", **common)
    ours = run(tiny_ckpt, image_folder, tmp_path, make_records(8), "two-pass", two_pass_clipping=True, **common)
    # float32: the embedding's gradient as its rows; lm_head's to the in-backward step by vocabulary chunks
    assert ours.net.language_model.embed_tokens.sparse == (precision == "fp32")
    assert ours.net.lm_head_grad_sink is None and ours.net.lm_head.weight.grad is None
    assert len(plain.losses) == 4 and len({round(v, 4) for _, v in plain.losses}) > 2
    assert ours.losses[0] == plain.losses[0]
    # bf16: each matrix's squares summed by row chunks (OptimizerInBackward._step_made) move the clip factor by up to
    # 4e-4 relative, which moves some bf16 roundings of the weights by an ulp
    for (s1, a), (s2, b) in zip(plain.losses, ours.losses):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6 if precision == "fp32" else 1e-4)
    logs = [[json.loads(line) for line in open(tmp_path / n / "train_log.jsonl")] for n in ("plain", "two-pass")]
    rel = 3e-4 if precision == "fp32" else 1e-3  # lm_head's (bf16: every matrix's) squares by chunks, see above
    for a, b in zip(*logs):
        assert a["grad_norm"] > 1.0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel)
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=1e-2, atol=1e-3)  # bf16: an ulp at most
    for (n, a), (_, b) in zip(plain.net.state_dict().items(), ours.net.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n, **tol)


@pytest.mark.parametrize("mode", ["two-pass", "in-backward", "in-backward-accumulated"])
def test_bf16_weights_made_on_use_give_the_copys_losses_and_weights(tiny_ckpt, image_folder, tmp_path, monkeypatch,
                                                                   mode):
    """bfloat16 stage 2 full stepping in backward (--two-pass-clipping clipped at 0.5; --step-in-backward, one
    micro-batch a step or grad accumulation 2): the model keeps no bf16 copy of a trained weight (its parameters are
    the float32 masters, each read rounded to bf16, saved for backward as a recipe and made again there). With one
    micro-batch a step each matrix's bf16 gradient goes to the step whole and is made float32 by 16-row chunks (the
    norm's squares summed by chunks), so: unclipped, every loss and trained weight equals the copy path's bit for
    bit (MasterWeights with bf16 parameters, folded gradients), the logged norms to float32 rounding (bit for bit
    when accumulated, the float32 gradients whole); clipped (two-pass), the first loss bit for bit and the rest to
    rounding, the clip factor coming from that norm."""
    from llava_fast.train import trainer

    common = {"two-pass": dict(epochs=2, batch_size=4, two_pass_clipping=True, max_grad_norm=0.5),
              "in-backward": dict(epochs=2, batch_size=4, max_grad_norm=0.0, step_in_backward=True),
              "in-backward-accumulated": dict(epochs=3, batch_size=2, grad_accum=2, max_grad_norm=0.0,
                                              step_in_backward=True)}[mode]
    made, init, stepped, step_made = [], trainer.MasterWeights._cast_on_use, [], trainer.OptimizerInBackward._step_made
    monkeypatch.setattr(trainer.MasterWeights, "_cast_on_use", lambda self, net, dtype: (
        made.append(self), init(self, net, dtype)))
    monkeypatch.setattr(trainer.OptimizerInBackward, "_step_made", lambda self, m, g: (
        stepped.append((m, g.dtype)), step_made(self, m, g)))
    monkeypatch.setattr(ops, "VOCAB_ROWS_PER_GRAD_CHUNK", 16)
    ours = run(tiny_ckpt, image_folder, tmp_path, make_records(8), "made", precision="bf16", **common)
    assert len(made) == 1 and made[0].made is None  # the parametrizations removed after the run
    matrices = {id(m) for m in made[0].masters if m.dim() == 2}
    if mode == "in-backward-accumulated":  # the last micro-batch's gradient adds to the first's in float32
        assert not stepped
    else:  # every matrix's bf16 gradient to the row chunks' step, every pass of every step
        passes = 2 * 4 if mode == "two-pass" else 4
        assert {id(m) for m, _ in stepped} == matrices and len(stepped) == passes * len(matrices)
        assert {dtype for _, dtype in stepped} == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for n, p in ours.net.named_parameters() if not n.startswith("vision_tower."))
    monkeypatch.setattr(trainer, "casts_weights_on_use", lambda *args: False)
    copy = run(tiny_ckpt, image_folder, tmp_path, make_records(8), "copy", precision="bf16", **common)
    assert len(made) == 1 and len(copy.losses) >= 4 and len({round(v, 4) for _, v in copy.losses}) > 2
    logs = [[json.loads(line)["grad_norm"] for line in open(tmp_path / name / "train_log.jsonl")]
            for name in ("made", "copy")]
    # torch's float32 norm of a whole tensor is off by ~1e-4 relative (see the step-in-backward test), the chunks' sum
    # by ~1e-6: up to 4e-4 apart here
    assert min(logs[0]) > 0 and logs[0] == pytest.approx(logs[1], rel=1e-3)
    a, b = ours.net.state_dict(), copy.net.state_dict()
    assert list(a) == list(b)
    if mode == "two-pass":
        assert ours.losses[0] == copy.losses[0] and ours.losses != copy.losses  # the chunks' norm moved a bit
        for (s1, x), (s2, y) in zip(ours.losses, copy.losses):
            assert s1 == s2 and x == pytest.approx(y, rel=1e-4)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-2, atol=1e-3, msg=n)  # bf16: an ulp at most
        return
    assert ours.losses == copy.losses and (logs[0] == logs[1]) == (mode == "in-backward-accumulated")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    from safetensors.torch import load_file

    written = [{k: v for f in sorted((tmp_path / name).glob("model*.safetensors")) for k, v in load_file(f).items()}
               for name in ("made", "copy")]
    assert written[0].keys() == written[1].keys() and all(torch.equal(written[0][k], written[1][k]) for k in written[0])


def test_bf16_weights_made_on_use_are_not_kept_for_backward():
    """MasterWeights' cast on use: a linear's bf16 weight read in forward, and the recomputed MLP's three, are saved
    for backward as their recipes (no bf16 tensor of a weight alive between forward and backward), made again in
    backward from the master, and the master's gradient is the bf16 gradient made float32, as with a bf16 parameter
    whose gradient is folded."""
    from llava_fast.train.trainer import MasterWeights

    g = torch.Generator().manual_seed(5)
    w0, x = torch.randn(37, 23, generator=g), torch.randn(3, 5, 23, generator=g).to(torch.bfloat16)
    gy = torch.randn(3, 5, 37, generator=g).to(torch.bfloat16)

    import gc
    import warnings

    net = torch.nn.Sequential(torch.nn.Linear(23, 37, bias=False))
    net[0].weight = torch.nn.Parameter(w0.clone())
    ours = MasterWeights([("0.weight", net[0].weight)], torch.bfloat16, net)
    assert ours.masters[0] is ours.params[0] and ours.masters[0].dtype == torch.float32
    assert net[0].weight.dtype == torch.bfloat16 and torch.equal(net[0].weight, w0.to(torch.bfloat16))
    mlp = torch.nn.ModuleList(torch.nn.Linear(23, 29, bias=False) for _ in range(2))
    mlp.append(torch.nn.Linear(29, 23, bias=False))
    mlp_masters = MasterWeights([(f"{i}.weight", lin.weight) for i, lin in enumerate(mlp)], torch.bfloat16, mlp)
    with ours.casting(), mlp_masters.casting():
        y = net(x)
        z = ops.swiglu_mlp_recomputed(x, mlp[0].weight, None, mlp[1].weight, None, mlp[2].weight, None)
    gc.collect()
    with warnings.catch_warnings():  # gc's list holds deprecated module attributes that warn when looked at
        warnings.simplefilter("ignore")
        alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16
                 and o.shape in ((37, 23), (23, 37), (29, 23), (23, 29))]
    assert not alive  # neither a weight nor its transpose is kept for backward
    z.sum().backward()
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in mlp_masters.masters)
    y.backward(gy)

    copy_net = torch.nn.Sequential(torch.nn.Linear(23, 37, bias=False))
    copy_net[0].weight = torch.nn.Parameter(w0.clone())
    copy = MasterWeights([("0.weight", copy_net[0].weight)], torch.bfloat16)
    copy.fold_grads_in_backward()
    y_copy = copy_net(x)
    y_copy.backward(gy)
    assert torch.equal(y, y_copy) and copy.masters[0].grad is not None
    assert torch.equal(ours.masters[0].grad, copy.masters[0].grad)


def test_two_pass_clipping_refuses_what_would_change_its_second_pass(tiny_ckpt, image_folder, tmp_path):
    """Without clipping, with accumulation, beside --step-in-backward or with LoRA dropout: an input error
    naming the needs, before --output is made."""
    from llava_fast.errors import InputError

    records = make_records(4)
    for bad in (dict(max_grad_norm=0.0), dict(grad_accum=2), dict(step_in_backward=True, max_grad_norm=0.0),
                dict(lora_r=4, lora_alpha=8, lora_dropout=0.05)):
        with pytest.raises(InputError, match="--two-pass-clipping .*--grad-accum 1"):
            run(tiny_ckpt, image_folder, tmp_path, records, "bad", two_pass_clipping=True, **bad)
    assert not (tmp_path / "bad").exists()


def test_frozen_tower_runs_without_autograd_and_a_trained_one_records_its_graph(tiny_ckpt):
    """A training forward (grad enabled) runs a frozen vision tower as inference does: no autograd inside it, so
    the native quick_gelu writes fc1's output in place, and the features equal the no-grad call's bit for bit
    (the loss too). A tower whose weights train still records its graph, and those weights get gradients."""
    from llava_fast.bench.train_bench import make_batch
    from llava_fast.cpu import vision
    from llava_fast.train import checkpoint as ckpt

    net = ckpt.load_base(tiny_ckpt, seed=0).net.train()
    net.requires_grad_(False)
    net.multi_modal_projector.requires_grad_(True)
    ids, labels, pixels = make_batch(net.cfg, 2, net.cfg.num_image_tokens + 9, torch.device("cpu"), torch.float32)
    seen = []
    layers = net.vision_tower.encoder.layers
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(torch.is_grad_enabled()))
    native = []
    real = vision.quick_gelu_
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vision, "quick_gelu_", lambda x: native.append(real(x)) or native[-1])
        loss = net.loss(ids, labels, pixels)
        assert seen == [False] * len(layers)
        assert native and all(native)  # the one native pass, where the extension is built
        with torch.no_grad():
            want_features, want_loss = net.image_features(pixels), net.loss(ids, labels, pixels)
        assert torch.equal(net.image_features(pixels), want_features) and torch.equal(loss.detach(), want_loss)
        loss.backward()
        assert net.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in net.vision_tower.parameters())

        seen.clear()
        fc1 = layers[-1].mlp.fc1.weight
        fc1.requires_grad_(True)
        net.loss(ids, labels, pixels).backward()
        assert seen == [True] * len(layers)
        assert fc1.grad is not None and fc1.grad.abs().sum() > 0


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_stage2_fuses_the_frozen_towers_projections(tiny_ckpt, image_folder, tmp_path, monkeypatch, lora):
    """Stage 2 fuses the frozen vision tower's q/k/v into one weight per layer, as stage 1 does (its trained decoder
    stays apart): the losses follow the unfused run's within float32 rounding, and the written outputs equal its,
    the full checkpoint with the tower's split names and its weights as loaded."""
    from safetensors.torch import load_file

    from llava_fast.train import trainer

    records = make_records(8)
    extra = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0) if lora else {}
    fused = run(tiny_ckpt, image_folder, tmp_path, records, "fused", epochs=1, batch_size=2, **extra)
    attn = fused.net.vision_tower.encoder.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    assert fused.net.language_model.layers[0].self_attn.qkv_proj is None
    monkeypatch.setattr(trainer, "fuse_frozen_projections", lambda net, stage, fsdp=False: None)
    plain = run(tiny_ckpt, image_folder, tmp_path, records, "plain", epochs=1, batch_size=2, **extra)
    assert plain.net.vision_tower.encoder.layers[0].self_attn.qkv_proj is None
    assert len(fused.losses) == 4 and len({v for _, v in plain.losses}) > 2
    for (s1, a), (s2, b) in zip(fused.losses, plain.losses):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    names = ["adapter_model.safetensors"] if lora else sorted(p.name for p in (tmp_path / "plain").glob("model-*"))
    assert names
    for name in names:
        ours, theirs = (load_file(tmp_path / n / name) for n in ("fused", "plain"))
        assert ours.keys() == theirs.keys() and not any("qkv_proj" in k for k in ours)
        assert lora or any(k.endswith("self_attn.q_proj.weight") and "vision" in k for k in ours)
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6)
