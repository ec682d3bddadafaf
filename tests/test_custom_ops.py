"""The op boundary (llava_fast/ops.py): every op as a torch.library custom op, on both backends.

- torch.library.opcheck on each registered op (schema and mutation declarations, fake implementation vs real
  output metadata, autograd registration, AOT dispatch), with the torch backend and with the Triton one
  (its interpreter on a CPU: small fp32 shapes; AOT dispatch of the backward is torch-backend only).
- Fake-tensor shapes: the model traced under FakeTensorMode gives the eager shapes.
- Gradients through the boundary equal plain autograd through the references (what the trainer computed
  before the boundary existed), for every differentiable op.
- The fused q/k/v and gate/up projections give the split model's logits (fp32, 1e-5), and state_dict()
  keeps the split names.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llava_fast import ops

OP = torch.ops.llava_fast


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=_g(seed)).requires_grad_(grad)


def op_cases(grad):
    """(op, args) for every registered op: odd sizes, random inputs, fp32."""
    B, T, H, Hkv, D, C, Tmax = 2, 5, 4, 2, 16, 24, 12
    cos, sin = ops.rope_tables(D, Tmax, 10000.0)
    x, w = randn(B, T, C, seed=1, grad=grad), randn(C, seed=2, grad=grad)
    q, k, v = randn(B, T, H, D, seed=3, grad=grad), randn(B, T, Hkv, D, seed=4, grad=grad), \
        randn(B, T, Hkv, D, seed=5, grad=grad)
    ids = torch.tensor([[1, 9, 9, 4, 5], [9, 9, 7, 3, 2]])  # 9 = the image token: two images of 2 rows
    V, Cv = 11, 6
    cases = {
        "rms_norm": (OP.rms_norm, (x, w, 1e-5)),
        "add_rms_norm": (OP.add_rms_norm, (x, w, 1e-5, randn(B, T, C, seed=6, grad=grad))),
        "layer_norm": (OP.layer_norm, (x, w, randn(C, seed=7, grad=grad), 1e-5)),
        "swiglu": (OP.swiglu, (x, randn(B, T, C, seed=8, grad=grad))),
        "quick_gelu": (OP.quick_gelu, (x,)),
        "splice_image_embeddings": (OP.splice_image_embeddings, (
            ids, randn(V, C, seed=9, grad=grad), randn(2, 2, Cv, seed=10, grad=grad), 9,
            randn(C, Cv, seed=11, grad=grad), randn(C, seed=12, grad=grad), randn(C, C, seed=13, grad=grad),
            randn(C, seed=14, grad=grad))),
        "rotary_causal_attention": (OP.rotary_causal_attention, (q, k, v, cos, sin)),
        "vision_attention": (OP.vision_attention, (q, randn(B, T, H, D, seed=15, grad=grad),
                                                   randn(B, T, H, D, seed=16, grad=grad))),
        "linear_cross_entropy": (OP.linear_cross_entropy, (
            randn(7, C, seed=17, grad=grad), randn(V, C, seed=18, grad=grad),
            torch.tensor([1, 4, -100, 10, 0, 3, 3]), -100, grad, grad)),
        "patch_embed": (OP.patch_embed, (randn(2, 3, 28, 28, seed=19), randn(C, 3, 14, 14, seed=20),
                                         randn(C, seed=21), randn(5, C, seed=22), randn(C, seed=23),
                                         randn(C, seed=24), 1e-5)),
    }
    caches = lambda: (randn(B, Hkv, Tmax, D, seed=25), randn(B, Hkv, Tmax, D, seed=26))  # noqa: E731
    start = torch.tensor([3, 0], dtype=torch.int32)
    cases["rotary_cached_attention/prefill"] = (OP.rotary_cached_attention, (q.detach(), k.detach(), v.detach(),
                                                cos, sin, *caches(), None, None))
    cases["rotary_cached_attention/padded"] = (OP.rotary_cached_attention, (
        q.detach(), k.detach(), v.detach(), cos, sin, *caches(), start, torch.tensor([5, 2], dtype=torch.int32)))
    cases["rotary_cached_attention/decode"] = (OP.rotary_cached_attention, (
        q[:, :1].detach(), k[:, :1].detach(), v[:, :1].detach(), cos, sin, *caches(), start, None))
    return cases


def test_every_op_is_registered():
    registered = {name for name in dir(OP) if not name.startswith("_")}
    assert set(ops.OP_NAMES) | {"add_rms_norm"} <= registered


@pytest.mark.parametrize("name", sorted(op_cases(False)))
def test_opcheck(name, backend):
    op, args = op_cases(grad=name not in ("patch_embed",) and not name.startswith("rotary_cached"))[name]
    if backend == "torch":
        torch.library.opcheck(op, args)
    else:
        # Not test_aot_dispatch_*: those trace the backward with fake tensors, and the Triton backward (the
        # kernels' autograd.Functions, recomputed) launches kernels directly, which need real storage. So a
        # compiled *training* step needs the torch backend; inference compiles with either.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_cached_attention_declares_its_cache_writes():
    schema = torch.ops.llava_fast.rotary_cached_attention.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"k_cache", "v_cache"}


def test_fake_tensor_shapes_match_eager():
    """The whole model (vision tower, splice, decoder with a cache) traced with fake tensors."""
    from llava_fast.checkpoints.config import LlavaConfig, TextConfig, VisionConfig
    from llava_fast.model import KVCache, LlavaForCausalLM

    cfg = LlavaConfig(vision=VisionConfig(hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                                          image_size=28),
                      text=TextConfig(vocab_size=50, hidden_size=48, intermediate_size=56, num_layers=2, num_heads=4,
                                      num_kv_heads=2, max_position_embeddings=64), vision_feature_layer=-1,
                      image_token_id=49)
    torch.manual_seed(0)
    net = LlavaForCausalLM(cfg).eval()
    net.init_rope()
    ids = torch.tensor([[1] + [49] * cfg.num_image_tokens + [5, 6, 7]])
    pixels = torch.randn(1, 3, 28, 28)

    def run(ids, pixels):
        cache = KVCache(cfg.text, 1, 20, ids.device, torch.float32)
        logits = net(ids, pixels)
        hidden = net.decode_hidden(net.embed(ids, pixels), cache, None, None)
        return logits.shape, hidden.shape, cache.k.shape

    with torch.no_grad():
        eager = run(ids, pixels)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = run(mode.from_tensor(ids), mode.from_tensor(pixels))
    assert fake == eager == (torch.Size([1, 8, 50]), torch.Size([1, 8, 48]), torch.Size([2, 1, 2, 20, 12]))


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "layer_norm", "swiglu", "quick_gelu",
                                  "splice_image_embeddings", "rotary_causal_attention", "vision_attention",
                                  "linear_cross_entropy"])
def test_gradients_through_the_boundary_equal_plain_autograd(name, backend):
    """The op's backward (recompute + the backend's own backward) against autograd through the backend's
    implementation called directly, which is what the trainer ran before the boundary."""
    op, args = op_cases(grad=True)[name]
    public = {"add_rms_norm": lambda x, w, eps, r: ops.rms_norm(x, w, eps, r),
              "rms_norm": lambda x, w, eps: ops.rms_norm(x, w, eps)[0],
              "linear_cross_entropy": lambda h, w, labels, ii, *_: ops.linear_cross_entropy(h, w, labels, ii)}
    direct_impl = ops.implementation("rms_norm" if name == "add_rms_norm" else name, differentiable=True)
    direct = {"add_rms_norm": lambda x, w, eps, r: direct_impl(x, w, eps, r),
              "rms_norm": lambda x, w, eps: direct_impl(x, w, eps)[0],
              "linear_cross_entropy": lambda h, w, labels, ii, *_: direct_impl(h, w, labels, ii)}
    through_op = public[name] if name in public else getattr(ops, name)
    plain = direct.get(name, direct_impl)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for fn in (through_op, plain):
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        weights = [torch.randn(o.shape, generator=_g(i + 40)) for i, o in enumerate(outs)]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        results.append(torch.autograd.grad(loss, leaves))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_projections_give_the_split_logits(tmp_path):
    import checkpoints as ck

    import llava_fast

    hf = ck.make_hf_model(seed=5, gqa=True)
    model = llava_fast.load(ck.write_checkpoint(hf, str(tmp_path), "hub"), device="cpu", dtype="float32")
    net = model.net
    assert net.language_model.layers[0].self_attn.qkv_proj is not None  # load() fused them
    split_state = net.state_dict()
    assert "language_model.layers.0.self_attn.q_proj.weight" in split_state
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in split_state)

    from llava_fast.model import LlavaForCausalLM

    with torch.device("meta"):
        split = LlavaForCausalLM(net.cfg)
    split.load_state_dict(split_state, assign=True, strict=True)
    split.init_rope()
    g = _g(3)
    ids = torch.randint(3, 32000, (2, 13), generator=g)
    with torch.no_grad():
        fused_logits, split_logits = net(ids), split(ids)
    torch.testing.assert_close(fused_logits, split_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)
