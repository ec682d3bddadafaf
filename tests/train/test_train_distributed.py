"""torchrun with 2 gloo processes on the CPU gives the losses of 1 process with the same global batch:
1 process x batch 2 x 2 accumulation steps == 2 processes x batch 2, with DDP and with FSDP2 (whose sharded
resumable state is also resumed)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainutil import make_records, write_data

from llava_fast.train import TrainArgs, train
from llava_fast.train import checkpoint as ckpt


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


def test_ctrl_c_under_torchrun_stops_both_processes_after_the_same_step(tiny_ckpt, image_folder, tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both of its workers (one process group) at once, and the agent
    then sends each worker a SIGINT of its own: each worker finishes its step, the two agree on where to stop, and
    rank 0 writes checkpoint-N holding N whole steps (log lines, trainer state, every AdamW step count) before
    the agent's 30 s grace ends. torchrun itself exits non-zero, with its own traceback."""
    data = write_data(tmp_path / "data.json", make_records(8))
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llava_fast.train", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-folder",
           image_folder, "--output", str(out), "--batch-size", "2", "--max-steps", "60", "--lr", "1e-3",
           "--no-gradient-checkpointing", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def as_from_a_shell():  # a new process group (the terminal's), Ctrl-C at its default and unblocked
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=as_from_a_shell)
    try:
        for line in proc.stderr:
            if line.startswith("step 1/60"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    steps = ckpt.list_checkpoints(str(out))
    assert len(steps) == 1 and 1 <= steps[0] < 60, err[-3000:]
    n = steps[0]
    assert f"interrupted: saved step {n} of 60" in err, err[-3000:]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == n
    assert ckpt.read_json(str(out / f"checkpoint-{n}" / "trainer_state.json"))["step"] == n
    optim = torch.load(out / f"checkpoint-{n}" / "state.pt")["optim"]["state"]
    assert optim and all(int(s["step"]) == n for s in optim.values())
    assert code != 0
