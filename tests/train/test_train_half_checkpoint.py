"""Float32 training of a checkpoint stored in float16 / bfloat16 (as LLaVA's are): the frozen matrices stay in the
checkpoint's dtype and are widened to float32 where an op reads them (MasterWeights.widen_frozen_on_use). Widening is
exact, so the run must equal, bit for bit, the run of the same checkpoint stored in float32 (the widened values,
held in float32 throughout), while the frozen matrices really hold 2 bytes a parameter and autograd keeps no widened
copy from forward to backward."""

import copy

import checkpoints as ck
import pytest
import torch
from trainutil import make_records, write_data

from llava_fast.train import TrainArgs, train
from llava_fast.train.trainer import _setup

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def half_ckpts(tiny_hf, tmp_path_factory):
    """{dtype name: (the tiny checkpoint stored in that dtype, the same values stored in float32)}."""
    out = {}
    for name, dtype in HALF.items():
        half = copy.deepcopy(tiny_hf).to(dtype)
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        out[name] = (ck.write_checkpoint(half, str(root / "half"), "hub"),
                     ck.write_checkpoint(half.float(), str(root / "float32"), "hub"))
    return out


def settings(model, data, image_folder, output, mode):
    extra = {"lora": dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), "stage1": dict(stage=1),
             "full": dict(two_pass_clipping=True)}[mode]
    return TrainArgs(**{**dict(stage=2, model=model, data=data, image_folder=image_folder, output=output,
                               batch_size=3, epochs=2, lr=1e-3, precision="fp32", gradient_checkpointing=False,
                               log_every=1000), **extra})


@pytest.mark.parametrize("dtype, mode", [("bf16", "lora"), ("fp16", "lora"), ("bf16", "stage1"), ("fp16", "full")])
def test_half_checkpoint_trains_bit_equal_to_its_float32_copy(half_ckpts, image_folder, tmp_path, dtype, mode):
    """Every step's loss and every parameter after the run (LoRA's adapters, the projector, stage 2's LLM, and the
    frozen weights, float32 again after the run) equal the float32-stored checkpoint's run."""
    data = write_data(tmp_path / "data.json", make_records(9, text_only_every=0))
    half, full = half_ckpts[dtype]
    ours = train(settings(half, data, image_folder, str(tmp_path / "half"), mode))
    ref = train(settings(full, data, image_folder, str(tmp_path / "float32"), mode))
    assert len(ours.losses) == 6 and len({v for _, v in ref.losses}) > 3  # the weights moved
    assert ours.losses == ref.losses
    held, want = dict(ours.net.named_parameters()), dict(ref.net.named_parameters())
    assert set(held) == set(want)
    for name, p in want.items():
        assert held[name].dtype == torch.float32 and torch.equal(held[name], p), name


def frozen_matrices(net):
    """name -> (module, attribute) of every frozen matrix held widened on use."""
    return {name.replace(".parametrizations", "").removesuffix(".original"): name
            for name, p in net.named_parameters() if name.endswith(".original") and not p.requires_grad}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_frozen_matrices_stay_two_bytes_and_autograd_keeps_no_widened_copy(half_ckpts, image_folder, tmp_path,
                                                                          dtype):
    """The trainer's setup of a LoRA run: the tower's and the LoRA base layers' matrices hold the checkpoint's dtype
    (2-byte storage), read as their exact float32 widening; after a forward under casting() no widened weight is
    alive (autograd keeps the recipe), while without the hooks the base layers' widened weights are kept."""
    data = write_data(tmp_path / "data.json", make_records(3, text_only_every=0))
    a = settings(half_ckpts[dtype][0], data, image_folder, str(tmp_path / "o"), "lora").resolved()
    run = _setup(a, None, 0, 1, torch.device("cpu"), lambda *m: None)
    net, masters = run.net, run.masters
    held = frozen_matrices(net)
    base = [n for n in held if n.startswith("language_model.layers.")]
    tower = [n for n in held if n.startswith("vision_tower.")]
    cfg = net.cfg
    # the tower's q/k/v are one fused matrix per layer (fuse_frozen_projections), beside out_proj, fc1 and fc2
    assert len(base) == 7 * cfg.text.num_layers and len(tower) == 4 * cfg.num_vision_layers_run + 2
    half_bytes = 0
    for name, original in held.items():
        p = net.get_parameter(original)
        assert p.dtype == HALF[dtype] and p.untyped_storage().nbytes() == 2 * p.numel(), name
        half_bytes += p.untyped_storage().nbytes()
        w = net.get_parameter(original).float()
        read = net.get_submodule(name.rpartition(".")[0]).weight
        assert read.dtype == torch.float32 and torch.equal(read, w), name
    # everything else frozen is float32 (vectors, the embedding table, lm_head); nothing else is half
    for name, p in net.named_parameters():
        if name not in held.values():
            assert p.dtype == torch.float32, name
    assert half_bytes > 0.9 * sum(2 * net.get_parameter(o).numel() for o in held.values())

    batch = next(iter(run.loader))
    args = (batch.input_ids, batch.labels, batch.pixel_values)
    with masters.casting():
        loss = net.loss(*args)
        alive = [ref() for ref, _ in masters.made.values() if ref() is not None]
        assert alive == []
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n or "projector" in n)
    net.zero_grad(set_to_none=True)

    loss = net.loss(*args)  # no hooks: autograd keeps the widened base weights for backward
    kept = [ref() for ref, _ in masters.made.values() if ref() is not None]
    assert len(kept) >= len(base) and all(w.dtype == torch.float32 for w in kept)
    del kept
    loss.backward()
    for n, g in grads.items():  # the same gradients either way
        assert torch.equal(net.get_parameter(n).grad, g), n


def test_float32_checkpoint_is_held_as_it_is(tiny_ckpt, image_folder, tmp_path):
    data = write_data(tmp_path / "data.json", make_records(3, text_only_every=0))
    a = settings(tiny_ckpt, data, image_folder, str(tmp_path / "o"), "lora").resolved()
    run = _setup(a, None, 0, 1, torch.device("cpu"), lambda *m: None)
    assert run.masters.widened == [] and frozen_matrices(run.net) == {}
    assert all(p.dtype == torch.float32 for p in run.net.parameters())


def test_frozen_float32_holds_a_half_checkpoint_in_float32(half_ckpts, image_folder, tmp_path):
    """--frozen-float32: the half-precision checkpoint's frozen matrices are held in float32 (nothing widened on
    use); a bf16 run, whose frozen matrices are bf16 anyway, refuses it by name."""
    from llava_fast.errors import InputError

    data = write_data(tmp_path / "data.json", make_records(3, text_only_every=0))
    a = settings(half_ckpts["bf16"][0], data, image_folder, str(tmp_path / "o"), "lora")
    a.frozen_float32 = True
    run = _setup(a.resolved(), None, 0, 1, torch.device("cpu"), lambda *m: None)
    assert run.masters.widened == [] and frozen_matrices(run.net) == {}
    assert all(p.dtype == torch.float32 for p in run.net.parameters())
    a.precision = "bf16"
    with pytest.raises(InputError, match="--frozen-float32 applies to --precision fp32"):
        a.resolved()


def test_widen_scratch_reuses_a_buffer_only_when_nothing_holds_it():
    from llava_fast.train.trainer import WidenScratch

    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(37, 23, generator=g).half(), torch.randn(5, 7, generator=g).bfloat16()
    scratch = WidenScratch()
    a = scratch.widen(big)
    assert a.dtype == torch.float32 and torch.equal(a, big.float()) and a.is_contiguous()
    b = scratch.widen(small)  # `a` is alive: a buffer of its own
    assert len(scratch.buffers) == 2 and torch.equal(a, big.float()) and torch.equal(b, small.float())
    view = a.t()
    del a, b
    c = scratch.widen(small)  # the first buffer is still held through the view, the second is free
    assert len(scratch.buffers) == 2 and torch.equal(view.t(), big.float())
    assert c.untyped_storage().data_ptr() == scratch.buffers[1].untyped_storage().data_ptr()
    del view, c
    d = scratch.widen(small)  # both free: the first large enough, reused
    assert d.untyped_storage().data_ptr() == scratch.buffers[0].untyped_storage().data_ptr()
    assert len(scratch.buffers) == 2 and torch.equal(d, small.float())
    larger = torch.randn(41, 29, generator=g).half()
    e = scratch.widen(larger)  # none large enough: a new buffer, the free small one dropped, the held one kept
    assert [b.numel() for b in scratch.buffers] == [37 * 23, 41 * 29] and torch.equal(e, larger.float())
    assert torch.equal(d, small.float())


def _vm_flags(address):
    """The VmFlags of the mapping in /proc/self/smaps that holds `address`."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_widen_scratch_buffers_ask_for_huge_pages():
    """A widening buffer of 8 MiB or more is madvised for 2 MiB pages (VmFlags hg) before its first write, and
    still holds the exact widening."""
    from llava_fast.train.trainer import WidenScratch

    g = torch.Generator().manual_seed(3)
    source = torch.randn(1537, 2049, generator=g).to(torch.float16)  # 12 MiB widened, odd shape
    scratch = WidenScratch()
    w = scratch.widen(source)
    assert torch.equal(w, source.float())
    assert "hg" in _vm_flags(w.data_ptr() + w.numel() * 2)  # its middle: the madvised range starts page-aligned
