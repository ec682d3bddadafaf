"""What `llava-fast train` and `merge-lora` write and refuse:

- every preprocessor_config.json they write is read by transformers (AutoImageProcessor, the oracle) as the
  preprocessing llava-fast applies, padding included, on the bundled non-square photos;
- the command line: a mismatched adapter, an existing output, a missing file are one line on stderr and exit
  code 2 (subprocesses, as a user runs them);
- zero is not "unset": invalid values are errors, valid zeros (a learning rate of 0) are kept.
"""

import json
import math
import os
import subprocess
import sys
import types

import checkpoints as ck
import numpy as np
import PIL.Image
import pytest
import torch
from trainutil import make_records, write_data

import llava_fast
from llava_fast.cli import main as cli_main
from llava_fast.errors import InputError
from llava_fast.image import ImageProcessor
from llava_fast.train import TrainArgs, train

PHOTOS = [os.path.join(ck.IMAGE_DIR, n) for n in ("extreme_ironing.jpg", "waterview.jpg")]  # the non-square ones


def cli(*args):
    """The command as a user runs it (a subprocess: ~10 s on a loaded 2-core host, so used sparingly)."""
    return subprocess.run([sys.executable, "-m", "llava_fast", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli_here(capsys):
    """The same entry point (llava_fast.cli.main, whose error handling makes the exit code and stderr) in this
    process."""
    def run(*args):
        code = cli_main(list(args))
        return types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
    return run


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-fast: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def runs(tiny_ckpt, image_folder, tmp_path_factory):
    """One-step runs: stage 1 (square), stage 2 (pad), LoRA (pad) and its merge."""
    root = tmp_path_factory.mktemp("runs")
    data = write_data(root / "data.json", make_records(4, text_only_every=0))
    common = dict(model=tiny_ckpt, data=data, image_folder=image_folder, batch_size=2, max_steps=1, lr=1e-3,
                  gradient_checkpointing=False, log_every=1000)
    out = {}
    for name, kw in (("stage1", dict(stage=1)), ("stage2", dict(stage=2)),
                     ("lora", dict(stage=2, lora_r=2, lora_alpha=4.0))):
        out[name] = str(root / name)
        train(TrainArgs(output=out[name], **common, **kw))
    out["merged"] = str(root / "merged")
    assert cli_main(["merge-lora", "--adapter", out["lora"], "--output", out["merged"]]) == 0
    return out


# ------------------------------------------------------------------------------------------------------
# 2. preprocessor_config.json: transformers and llava-fast preprocess identically
# ------------------------------------------------------------------------------------------------------


def transformers_processor(directory):
    """AutoImageProcessor's choice for the directory, on its PIL backend (transformers 5 prefers torchvision's
    antialiased resize when torchvision is installed, which differs from PIL's by a few levels)."""
    import transformers

    chosen = transformers.AutoImageProcessor.from_pretrained(directory)
    name = type(chosen).__name__.removesuffix("Fast")
    pil = getattr(transformers, name if name.endswith("Pil") else name + "Pil", None)
    return chosen, (pil.from_pretrained(directory) if pil is not None else chosen)


@pytest.mark.parametrize("run,pads", [("stage1", False), ("stage2", True), ("merged", True)])
def test_written_preprocessor_means_the_same_to_transformers(runs, run, pads):
    directory = runs[run]
    chosen, oracle = transformers_processor(directory)
    assert bool(getattr(chosen, "do_pad", False)) is pads  # transformers itself pads (LlavaImageProcessor do_pad)
    ours = llava_fast.load(directory, device="cpu", dtype="float32")
    assert ours.processor.image_aspect_ratio == ("pad" if pads else None)
    unpadded = ImageProcessor.from_pretrained(directory, image_aspect_ratio=None, backend="python")
    for photo in PHOTOS:
        image = PIL.Image.open(photo)
        assert image.width != image.height
        want = torch.from_numpy(np.asarray(oracle(image, return_tensors=None)["pixel_values"][0]))
        got = ours.pixel_values([photo])[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # The comparison can fail: padding moves these photos' pixels by far more than the tolerance.
        assert (unpadded(photo)[0] - want).abs().max() > 0.1 if pads else True


def test_both_preprocessor_forms_are_read(runs, tmp_path):
    """The new form (LlavaImageProcessor + do_pad) and the one llava-fast wrote before (CLIPImageProcessor +
    image_aspect_ratio, which transformers ignores) both mean padding to llava-fast."""
    written = json.load(open(os.path.join(runs["stage2"], "preprocessor_config.json")))
    assert written["image_processor_type"] == "LlavaImageProcessor" and written["do_pad"] is True
    assert "image_aspect_ratio" not in written
    for name, edit in (("new", {}), ("old", {"image_processor_type": "CLIPImageProcessor", "do_pad": None,
                                             "image_aspect_ratio": "pad"}),
                       ("off", {"do_pad": False})):
        config = {k: v for k, v in {**written, **edit}.items() if v is not None}
        (tmp_path / name).mkdir()
        json.dump(config, open(tmp_path / name / "preprocessor_config.json", "w"))
        expected = None if name == "off" else "pad"
        assert ImageProcessor.from_pretrained(tmp_path / name).image_aspect_ratio == expected, name


# ------------------------------------------------------------------------------------------------------
# 3. The command line: mismatches and existing outputs
# ------------------------------------------------------------------------------------------------------


def test_merge_lora_of_an_adapter_of_another_shape_is_one_line(runs, tmp_path):
    """The runs' adapters were trained on a GQA model (2 K/V heads); merging one onto an MHA base (4 K/V heads,
    so k_proj has twice the rows) is a shape mismatch naming both files, not a RuntimeError."""
    mha = ck.write_checkpoint(ck.make_hf_model(seed=0, gqa=False), str(tmp_path / "mha"), "hub")
    r = cli("merge-lora", "--adapter", runs["lora"], "--model", mha, "--output", str(tmp_path / "m"))
    assert_one_line_error(r, "adapter_model.safetensors", mha, "k_proj", "(32, 2)", "(64, 2)")
    assert not os.path.exists(tmp_path / "m" / "config.json")


def test_merge_lora_refuses_an_existing_output_unless_overwrite(runs, tmp_path, cli_here):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli_here("merge-lora", "--adapter", runs["lora"], "--output", str(out))
    assert_one_line_error(r, str(out), "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and not (out / "config.json").exists()
    assert cli_here("merge-lora", "--adapter", runs["lora"], "--output", str(out), "--overwrite").returncode == 0
    assert (out / "config.json").exists()
    r = cli_here("merge-lora", "--adapter", runs["lora"], "--output", runs["lora"], "--overwrite")
    assert_one_line_error(r, "is --adapter directory")


def test_merge_lora_missing_and_broken_files(runs, tmp_path, cli_here):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.load(open(os.path.join(runs["lora"], "adapter_config.json")))
    json.dump({**config, "base_model": str(tmp_path / "gone")}, open(adapter / "adapter_config.json", "w"))
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = cli_here("merge-lora", "--adapter", str(adapter), "--output", str(tmp_path / "o"))
    assert_one_line_error(r, str(tmp_path / "gone"), "--model")
    r = cli_here("merge-lora", "--adapter", str(adapter), "--model", config["base_model"], "--output",
                 str(tmp_path / "o"))
    assert_one_line_error(r, "adapter_model.safetensors")
    json.dump({"r": 2}, open(adapter / "adapter_config.json", "w"))
    r = cli_here("merge-lora", "--adapter", str(adapter), "--output", str(tmp_path / "o"))
    assert_one_line_error(r, "adapter_config.json", "alpha, base_model")


def test_train_refuses_an_existing_output_unless_overwrite(runs, tiny_ckpt, image_folder, tmp_path, cli_here):
    data = write_data(tmp_path / "d.json", make_records(2, text_only_every=0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # someone's checkpoint
    args = ["train", "--stage", "1", "--model", tiny_ckpt, "--data", data, "--image-folder", image_folder,
            "--output", str(out), "--max-steps", "1", "--batch-size", "2"]
    assert_one_line_error(cli(*args), str(out), "--overwrite")
    assert (out / "config.json").read_text() == "{}"
    assert_one_line_error(cli_here(*args, "--overwrite", "--resume"), "contradict")
    fresh = args[:-5] + [str(tmp_path / "new"), "--max-steps", "1"]
    assert_one_line_error(cli_here(*fresh, "--batch-size", "0"), "--batch-size must be an integer >= 1, got 0")
    assert_one_line_error(cli_here(*fresh, "--projector", str(tmp_path / "nope.safetensors")), "nope.safetensors")
    assert cli_here(*args, "--overwrite").returncode == 0 and (out / "train_log.jsonl").exists()


def test_output_is_never_a_directory_the_command_reads(tiny_ckpt, image_folder, tmp_path, cli_here):
    """With --overwrite, train --output the --model directory cleared it and replaced the checkpoint the run started
    from; merge-lora compared paths as written, so a symlink to its base model (or adapter) got through."""
    import shutil

    base = str(tmp_path / "base")
    shutil.copytree(tiny_ckpt, base)
    os.symlink(base, tmp_path / "link")
    before = sorted(os.listdir(base))
    data = write_data(tmp_path / "d.json", make_records(2, text_only_every=0))
    for out in (base, str(tmp_path / "link"), base + "/."):
        r = cli_here("train", "--stage", "2", "--model", base, "--data", data, "--image-folder", image_folder,
                     "--output", out, "--max-steps", "1", "--batch-size", "2", "--overwrite")
        assert_one_line_error(r, f"--output {out} is --model directory")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    json.dump({"r": 2, "alpha": 4, "base_model": base}, open(adapter / "adapter_config.json", "w"))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    os.symlink(adapter, tmp_path / "adapter-link")
    for out, what in ((tmp_path / "link", "the base model"), (tmp_path / "adapter-link", "--adapter")):
        r = cli_here("merge-lora", "--adapter", str(adapter), "--output", str(out), "--overwrite")
        assert_one_line_error(r, f"--output {out} is {what} directory")
    assert sorted(os.listdir(base)) == before and sorted(os.listdir(adapter)) == ["adapter_config.json",
                                                                                 "adapter_model.safetensors"]


# ------------------------------------------------------------------------------------------------------
# 6. Zero is not "unset"
# ------------------------------------------------------------------------------------------------------


def args(**kw):
    return TrainArgs(stage=kw.pop("stage", 2), model="m", data="d", output="o", **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=0), "--batch-size must be an integer >= 1, got 0"),
    (dict(grad_accum=0), "--grad-accum must be an integer >= 1"),
    (dict(max_length=0), "--max-length must be an integer >= 1"),
    (dict(max_steps=0), "--max-steps must be an integer >= 1"),
    (dict(epochs=0), "--epochs must be a finite number > 0"),
    (dict(lr=-1e-5), "--lr must be a finite number >= 0"),
    (dict(lr=float("nan")), "--lr must be a finite number >= 0"),
    (dict(projector_lr=-1.0), "--projector-lr must be a finite number >= 0"),
    (dict(lora_r=0, lora_alpha=1.0), "--lora-r must be an integer >= 1"),
    (dict(lora_r=2, lora_alpha=0.0), "--lora-alpha must be a finite number > 0"),
    (dict(lora_dropout=1.0), r"--lora-dropout must be a finite number in \[0, 1\)"),
    (dict(warmup_ratio=1.5), r"--warmup-ratio must be in \[0, 1\]"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm must be a finite number >= 0"),
    (dict(step_in_backward=True), "--step-in-backward .* --max-grad-norm 0"),
    (dict(step_in_backward=True, max_grad_norm=0.0, fsdp=True), "--step-in-backward runs in one process"),
    (dict(log_every=0), "--log-every must be an integer >= 1"),
    (dict(batch_size=2.5), "--batch-size must be an integer >= 1, got 2.5"),
])
def test_invalid_training_settings_are_errors(kw, message):
    with pytest.raises(InputError, match=message):
        args(**kw).resolved()


def test_valid_zeros_are_kept(runs, tiny_ckpt, image_folder, tmp_path):
    a = args(lr=0.0, projector_lr=0.0, weight_decay=0.0, warmup_ratio=0.0, lora_dropout=0.0, save_every=0,
             workers=0, seed=0).resolved()
    assert (a.lr, a.projector_lr, a.warmup_ratio, a.workers, a.seed) == (0.0, 0.0, 0.0, 0, 0)
    assert args(stage=1, lr=0.0).resolved().projector_lr == 0.0  # follows --lr, zero included
    assert args(lora_r=2, lora_alpha=4.0, projector_lr=0.0).resolved().projector_lr == 0.0
    assert args().resolved().lr == 2e-5 and args(stage=1).resolved().batch_size == 32  # None: the defaults
    # A learning rate of 0 trains nothing: the written projector equals the input's.
    data = write_data(tmp_path / "d.json", make_records(2, text_only_every=0))
    result = train(TrainArgs(stage=1, model=tiny_ckpt, data=data, image_folder=image_folder, output=str(tmp_path / "o"),
                             batch_size=2, max_steps=1, lr=0.0, gradient_checkpointing=False, log_every=1000))
    assert result.losses and math.isfinite(result.losses[0][1])
    before = llava_fast.load(tiny_ckpt, device="cpu").net.multi_modal_projector.state_dict()
    after = llava_fast.load(str(tmp_path / "o"), device="cpu").net.multi_modal_projector.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
