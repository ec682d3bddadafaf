"""What only a GPU shows: CUDA-graph decode, and the Triton path in bf16/fp16 against the torch path.

Marked `gpu`: skipped without CUDA (conftest), run on a machine with a CUDA GPU (bench/gpu_check.py runs them).
"""

import checkpoints as ck
import pytest
import torch

import llava_fast
from llava_fast import ops

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    hf = ck.make_hf_model(seed=31, gqa=True, text_layers=3)
    return ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("gpu")), "hub")


@pytest.fixture
def triton_backend():
    before = ops.BACKEND
    ops.use_backend("triton")
    yield
    ops.use_backend(before)


def _rows(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, img = model.num_image_tokens, model.image_token_id
    rows = [[1] + torch.randint(3, 32000, (9,), generator=g).tolist() + [img] * n + [13],
            [1] + torch.randint(3, 32000, (4,), generator=g).tolist(),
            [1, 450] + [img] * n + torch.randint(3, 32000, (17,), generator=g).tolist()]
    return rows, ck.random_pixels(2, model.config.vision.image_size, seed=seed)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("batch", [1, 3])  # 3 rows pad to the 4-row graph bucket
def test_cuda_graph_decode_equals_eager_decode(ckpt_dir, triton_backend, dtype, batch):
    model = llava_fast.load(ckpt_dir, device="cuda", dtype=dtype)
    rows, pixels = _rows(model)
    rows = rows[:batch]
    pixels = pixels[: sum(r.count(model.image_token_id) for r in rows) // model.num_image_tokens]
    model.cuda_graphs = False
    eager = model.generate_ids(rows, pixels, max_new_tokens=40, eos_token_id=None)
    model.cuda_graphs = True
    graphed = model.generate_ids(rows, pixels, max_new_tokens=40, eos_token_id=None)
    assert model._graph_decoders and next(iter(model._graph_decoders.values())).graph is not None
    assert graphed == eager
    again = model.generate_ids(rows, pixels, max_new_tokens=40, eos_token_id=None)  # graph replayed, not recaptured
    assert again == eager
    model.release_workspace()
    assert not model._graph_decoders
    assert model.generate_ids(rows, pixels, max_new_tokens=40, eos_token_id=None) == eager  # recaptured
    sampled = [model.generate("Describe.", ck.IMAGE_DIR + "/waterview.jpg", max_new_tokens=20, temperature=0.9,
                              seed=s) for s in (1, 1)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.05), ("float16", 0.01)])
def test_triton_path_tracks_torch_path_in_half_precision(ckpt_dir, dtype, tolerance):
    model = llava_fast.load(ckpt_dir, device="cuda", dtype=dtype)
    rows, pixels = _rows(model, seed=1)
    before = ops.BACKEND
    try:
        ops.use_backend("torch")
        ref = model.logits([rows[0]], pixels[:1]).float()
        ops.use_backend("triton")
        got = model.logits([rows[0]], pixels[:1]).float()
    finally:
        ops.use_backend(before)
    # Both paths round differently in half precision; compare relative to the logits' scale.
    assert (got - ref).abs().max() <= tolerance * ref.abs().max()


@pytest.mark.parametrize("compile", [False, True])
def test_generate_has_no_host_sync_per_token(ckpt_dir, triton_backend, compile):
    """Read-backs happen once per 16-token chunk on a GPU (plus the first token, for time to first token),
    eager and with the compiled decode step under the CUDA graph."""
    model = llava_fast.load(ckpt_dir, device="cuda", dtype="bfloat16", compile=compile)
    model.generate_ids([[1, 5, 6]], None, max_new_tokens=3, eos_token_id=None)  # compiles outside the count
    rows, pixels = _rows(model)
    calls = []
    real_stack = torch.stack

    def counting_stack(tensors, *a, **k):
        out = real_stack(tensors, *a, **k)
        calls.append(len(tensors))
        return out

    torch.stack = counting_stack
    try:
        model.generate_ids(rows[:1], pixels[:1], max_new_tokens=33, eos_token_id=None)
    finally:
        torch.stack = real_stack
    assert calls == [1, 16, 16]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_cuda_graph_decode_equals_eager(ckpt_dir, backend):
    """The compiled step captured in the CUDA graph (either backend: the compiled path never syncs)."""
    before = ops.BACKEND
    ops.use_backend(backend)
    try:
        model = llava_fast.load(ckpt_dir, device="cuda", dtype="bfloat16")
        rows, pixels = _rows(model)
        model.cuda_graphs = False
        eager = model.generate_ids(rows, pixels, max_new_tokens=24, eos_token_id=None)
        model = llava_fast.load(ckpt_dir, device="cuda", dtype="bfloat16", compile=True)
        compiled = model.generate_ids(rows, pixels, max_new_tokens=24, eos_token_id=None)
        assert next(iter(model._graph_decoders.values())).graph is not None
        assert model.last_stats["compile_s"] > 0
        assert compiled == eager
        assert model.generate_ids(rows, pixels, max_new_tokens=24, eos_token_id=None) == eager
        assert model.last_stats["compile_s"] == 0.0
    finally:
        ops.use_backend(before)
