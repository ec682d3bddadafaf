"""torchrun with 2 gloo processes on the CPU gives the losses of 1 process with the same global batch:
1 process x batch 2 x 2 accumulation steps == 2 processes x batch 2, with DDP and with FSDP2 (whose sharded
resumable state is also resumed)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainutil import make_records, write_data

from llava_fast.train import TrainArgs, train


def _weights(directory):
    out = {}
    for f in glob.glob(os.path.join(directory, "model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny_ckpt, image_folder, tmp_path, sharding):
    data = write_data(tmp_path / "data.json", make_records(16, turns=2))  # text-only rows included
    common = ["--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-folder", image_folder,
              "--max-steps", "3", "--lr", "1e-3", "--no-gradient-checkpointing"]
    one = train(TrainArgs(stage=2, model=tiny_ckpt, data=data, image_folder=image_folder, output=str(tmp_path / "one"),
                          batch_size=2, grad_accum=2, max_steps=3, lr=1e-3, gradient_checkpointing=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llava_fast.train", *common, "--batch-size", "2", "--output", str(tmp_path / "two")]
    if sharding == "fsdp":  # and a resumable checkpoint, written as sharded torch.distributed.checkpoint files
        cmd += ["--fsdp", "--save-every", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "two" / "train_log.jsonl") as f:
        lines = f.readlines()
    two = [json.loads(line) for line in lines]
    assert [m["step"] for m in two] == [1, 2, 3]
    assert [m["samples"] for m in two] == [4, 4, 4]
    for (_, want), got in zip(one.losses, two):
        assert abs(got["loss"] - want) <= 1e-5 * abs(want)
    a, b = _weights(str(tmp_path / "one")), _weights(str(tmp_path / "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    if sharding == "fsdp":  # resuming the sharded state reproduces step 3 exactly
        resumed = tmp_path / "resumed"
        shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed / "checkpoint-2")
        (resumed / "train_log.jsonl").write_text("".join(lines[:2]) + '{"step": 3, "lo')  # torn by the crash
        cmd[cmd.index(str(tmp_path / "two"))] = str(resumed)
        done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(resumed / "train_log.jsonl") as f:
            again = [json.loads(line) for line in f]
        assert [(m["step"], m["loss"]) for m in again] == [(m["step"], m["loss"]) for m in two]
