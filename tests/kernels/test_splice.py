"""kernels/splice.py against llava_fast.ops.splice_image_embeddings, forward and backward.

Accuracy rule (flash-attention's): the reference runs in fp64; the kernel's max error (output and every
gradient) must be at most 2x the error plain PyTorch makes in the same dtype, plus a small atol scaled by the
tensor's magnitude (fp32 PyTorch is near-exact, so there the atol is the whole budget).
"""

import pytest
import torch

from llava_fast import ops
from llava_fast.kernels.splice import splice_image_embeddings

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}
V, CV, C = 11, 24, 40  # a tiny vocabulary so text ids repeat and the embedding grads accumulate
NIMG = 5

# (B, T, image runs as (row, first position)); each run fills NIMG consecutive positions.
LAYOUTS = {
    "one_image_mid": (1, 13, [(0, 7)]),
    "three_images_start_adjacent_end": (1, 37, [(0, 0), (0, 5), (0, 32)]),
    "three_rows_uneven": (3, 37, [(0, 1), (1, 10), (1, 31)]),  # row 2 is text only
    "no_images": (3, 13, []),
}


def make_case(layout, dtype, projector, image_token_id, seed=0, nimg=NIMG):
    B, T, runs = LAYOUTS[layout] if isinstance(layout, str) else layout
    g = torch.Generator().manual_seed(seed)
    text_ids = [i for i in range(V) if i != image_token_id]
    input_ids = torch.tensor(text_ids)[torch.randint(len(text_ids), (B, T), generator=g)]
    for row, start in runs:
        input_ids[row, start : start + nimg] = image_token_id
    C1 = C if projector == "mlp2x_gelu" else None
    params = dict(
        embed_weight=torch.randn(V, C, generator=g),
        image_features=torch.randn(len(runs), nimg, CV, generator=g),
        w1=torch.randn(C1 or C, CV, generator=g) * CV**-0.5,
        b1=0.1 * torch.randn(C1 or C, generator=g),
        w2=torch.randn(C, C1, generator=g) * C1**-0.5 if C1 else None,
        b2=0.1 * torch.randn(C, generator=g) if C1 else None,
    )
    grad_out = torch.randn(B, T, C, generator=g)
    return input_ids, {k: v.to(dtype) if v is not None else None for k, v in params.items()}, grad_out.to(dtype)


def run(fn, input_ids, params, image_token_id, grad_out, cast=None):
    """Forward + backward of fn on leaf copies of params; returns (out, {name: grad})."""
    leaves = {k: (v if cast is None else v.to(cast)).clone().requires_grad_(True) if v is not None else None
              for k, v in params.items()}
    out = fn(input_ids, leaves["embed_weight"], leaves["image_features"], image_token_id,
             leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"])
    out.backward(grad_out.to(out.dtype))
    return out, {k: v.grad for k, v in leaves.items() if v is not None}


def assert_flash_rule(name, got, torch_got, ref, dtype):
    if ref is None:
        assert got is None and torch_got is None, name
        return
    assert got.shape == ref.shape and got.dtype == torch_got.dtype, name
    kernel_err = (got.double() - ref).abs().max().item()
    torch_err = (torch_got.double() - ref).abs().max().item()
    atol = ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert kernel_err <= 2 * torch_err + atol, f"{name}: kernel err {kernel_err:.3g} vs torch err {torch_err:.3g}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_splice_matches_reference_forward_and_backward(layout, projector, dtype):
    image_token_id = -200 if layout != "three_rows_uneven" else 7  # outside and inside the table
    input_ids, params, grad_out = make_case(layout, dtype, projector, image_token_id)
    out, grads = run(splice_image_embeddings, input_ids, params, image_token_id, grad_out)
    torch_out, torch_grads = run(ops.splice_image_embeddings, input_ids, params, image_token_id, grad_out)
    ref, ref_grads = run(ops.splice_image_embeddings, input_ids, params, image_token_id, grad_out, torch.float64)

    assert_flash_rule("out", out, torch_out, ref, dtype)
    for name in params:
        assert_flash_rule(f"grad {name}", grads.get(name), torch_grads.get(name), ref_grads.get(name), dtype)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_splice_many_feature_rows(projector):
    """R = 4 * 17 = 68 feature rows: several GEMM row blocks and, under the interpreter's 16-row tiles,
    more than one GROUP_M group, so the grouped program order and the row-scatter are both exercised."""
    layout = (2, 80, [(0, 3), (0, 40), (1, 0), (1, 63)])
    input_ids, params, grad_out = make_case(layout, torch.float32, projector, -200, seed=2, nimg=17)
    out, grads = run(splice_image_embeddings, input_ids, params, -200, grad_out)
    torch_out, torch_grads = run(ops.splice_image_embeddings, input_ids, params, -200, grad_out)
    ref, ref_grads = run(ops.splice_image_embeddings, input_ids, params, -200, grad_out, torch.float64)
    assert_flash_rule("out", out, torch_out, ref, torch.float32)
    for name in params:
        assert_flash_rule(f"grad {name}", grads.get(name), torch_grads.get(name), ref_grads.get(name), torch.float32)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_splice_stage1_trains_only_the_projector(projector):
    """Embedding table and features frozen: only projector grads, matching the reference."""
    input_ids, params, grad_out = make_case("three_rows_uneven", torch.float32, projector, -200, seed=1)
    trainable = {"w1", "b1", "w2", "b2"}
    results = []
    for fn in (splice_image_embeddings, ops.splice_image_embeddings):
        leaves = {k: v.clone().requires_grad_(k in trainable) if v is not None else None
                  for k, v in params.items()}
        fn(input_ids, *(leaves[k] for k in ("embed_weight", "image_features")), -200,
           *(leaves[k] for k in ("w1", "b1", "w2", "b2"))).backward(grad_out)
        results.append(leaves)
    ours, reference = results
    for name, leaf in ours.items():
        if leaf is None:
            continue
        if name in trainable:
            torch.testing.assert_close(leaf.grad, reference[name].grad, rtol=1e-5, atol=1e-5)
        else:
            assert leaf.grad is None


def test_splice_only_w2_trains():
    """Only the second projector layer trains: the GELU derivative path (and its saved input) is skipped."""
    input_ids, params, grad_out = make_case("one_image_mid", torch.float32, "mlp2x_gelu", -200)
    w2 = params["w2"].clone().requires_grad_(True)
    splice_image_embeddings(input_ids, params["embed_weight"], params["image_features"], -200,
                            params["w1"], params["b1"], w2, params["b2"]).backward(grad_out)
    w2_ref = params["w2"].clone().requires_grad_(True)
    ops.splice_image_embeddings(input_ids, params["embed_weight"], params["image_features"], -200,
                                params["w1"], params["b1"], w2_ref, params["b2"]).backward(grad_out)
    torch.testing.assert_close(w2.grad, w2_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_splice_without_autograd(mode):
    input_ids, params, _ = make_case("three_images_start_adjacent_end", torch.float16, "mlp2x_gelu", -200)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = splice_image_embeddings(input_ids, *(params[k] for k in ("embed_weight", "image_features")), -200,
                                      *(params[k] for k in ("w1", "b1", "w2", "b2")))
    ref = ops.splice_image_embeddings(input_ids, *(params[k].double() for k in ("embed_weight", "image_features")),
                                      -200, *(params[k].double() for k in ("w1", "b1", "w2", "b2")))
    assert not out.requires_grad
    assert (out.double() - ref).abs().max().item() < 1e-2


@pytest.mark.parametrize("features", ["none", "zero_images"])
def test_splice_without_features_gathers_only(features):
    """image_features None or K = 0: a pure gather; image tokens read embedding row 0 as in the reference,
    and their grads go to row 0."""
    input_ids, params, grad_out = make_case("three_rows_uneven", torch.float32, "linear", 7)
    params["image_features"] = None if features == "none" else params["image_features"][:0]
    out, grads = run(splice_image_embeddings, input_ids, params, 7, grad_out)
    ref, ref_grads = run(ops.splice_image_embeddings, input_ids, params, 7, grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(grads["embed_weight"], ref_grads["embed_weight"], rtol=1e-6, atol=1e-6)
    assert grads["w1"] is None and grads["b1"] is None


def test_splice_count_mismatch_stays_in_bounds():
    """The caller must match image positions to K * Nimg (checking here would sync the host). When it does
    not, nothing is written out of place: surplus positions get row 0, surplus feature rows are dropped."""
    input_ids, params, _ = make_case("three_images_start_adjacent_end", torch.float32, "linear", -200)
    args = (params["embed_weight"], -200, params["w1"], params["b1"])
    projected = ops.project_image_features(params["image_features"], params["w1"], params["b1"]).reshape(-1, C)
    with torch.no_grad():
        surplus_positions = splice_image_embeddings(input_ids, args[0], params["image_features"][:2], *args[1:])
        surplus_features = splice_image_embeddings(input_ids[:, :20], args[0], params["image_features"], *args[1:])
    torch.testing.assert_close(surplus_positions[0, 32:37], params["embed_weight"][0].expand(NIMG, C))
    torch.testing.assert_close(surplus_positions[0, :10], projected[:10])
    torch.testing.assert_close(surplus_features[0, :10], projected[:10])
    text = input_ids[0, 10:20]
    torch.testing.assert_close(surplus_features[0, 10:20], params["embed_weight"][text])


def test_splice_dispatch_table():
    from llava_fast.kernels import TRITON_OPS

    assert TRITON_OPS["splice_image_embeddings"] is splice_image_embeddings
