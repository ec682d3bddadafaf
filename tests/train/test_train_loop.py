"""The trainer against independent references: transformers' LlavaForConditionalGeneration (loss, gradients,
loading what we write), the input checkpoint (what each stage may change), and the uninterrupted run (resume).
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import checkpoints as ck
import pytest
import torch
from safetensors.torch import load_file
from trainutil import make_records, write_data

import llava_fast
from llava_fast.cli import main as cli_main
from llava_fast.prompts.templates import get_template
from llava_fast.train import TrainArgs, train
from llava_fast.train import checkpoint as ckpt
from llava_fast.train.data import Collate, EncodingSpec, LlavaDataset, check_records
from llava_fast.train.trainer import TrainingLoss, trainable_parameters


def tensors(directory):
    out = {}
    for f in glob.glob(os.path.join(directory, "model*.safetensors")):
        out.update(load_file(f))
    return out


def run(tiny_ckpt, image_folder, tmp_path, records, name="out", **kw):
    settings = dict(stage=2, model=tiny_ckpt, data=write_data(tmp_path / "data.json", records),
                    image_folder=image_folder, output=str(tmp_path / name), batch_size=4, max_steps=3, lr=1e-2,
                    gradient_checkpointing=False, log_every=1000)
    settings.update(kw)
    return train(TrainArgs(**settings))


def hf_name(name):  # ours -> transformers' in-memory names
    if name.startswith(("language_model.", "multi_modal_projector.")):
        return "model." + name
    return name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_loss_and_gradients_match_transformers(tiny_hf, tiny_ckpt, image_folder, checkpointing):
    base = ckpt.load_base(tiny_ckpt)
    net = base.net
    trainable_parameters(net, stage=2, lora=False)
    net.train().gradient_checkpointing = checkpointing
    spec = EncodingSpec(base.tokenizer, get_template("vicuna_v1"), net.cfg.image_token_id, net.cfg.num_image_tokens,
                        512, image_folder)
    records = make_records(4, turns=2)  # three rows with an image, one text-only; different lengths
    examples, _ = check_records(records, spec)
    dataset = LlavaDataset(records, examples, spec, base.processor)
    batch = Collate(base.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    assert len(set(batch.lengths)) > 1 and batch.pixel_values.shape[0] == 3

    loss = TrainingLoss(net)(batch.input_ids, batch.labels, batch.pixel_values, 1.0)
    loss.backward()
    mask = torch.arange(batch.input_ids.shape[1])[None] < torch.tensor(batch.lengths)[:, None]
    tiny_hf.zero_grad(set_to_none=True)
    ref = tiny_hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=mask.long(),
                  labels=batch.labels).loss
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    hf_params = dict(tiny_hf.named_parameters())
    checked = 0
    for name, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and name.startswith("vision_tower.")
            continue
        want = hf_params[hf_name(name)].grad
        assert want.norm() > 0, name
        assert (p.grad - want).norm() <= 1e-5 * want.norm(), name
        checked += 1
    assert checked == len([n for n in hf_params if not n.startswith("model.vision_tower.")])
    tiny_hf.zero_grad(set_to_none=True)


def test_stage1_changes_only_the_projector(tiny_ckpt, image_folder, tmp_path):
    result = run(tiny_ckpt, image_folder, tmp_path, make_records(10, text_only_every=5), stage=1)
    assert result.skipped["text-only record in stage 1 (only the projector trains: nothing to learn)"] == 2
    before, after = tensors(tiny_ckpt), tensors(str(tmp_path / "out"))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("multi_modal_projector.")} and len(changed) == 4
    projector = load_file(str(tmp_path / "out" / "mm_projector.safetensors"))
    assert set(projector) == changed and all(torch.equal(projector[k], after[k]) for k in changed)
    # In memory as well, not only in the file: nothing but the projector moved. state_dict() names the frozen
    # decoder's fused q/k/v and gate/up weights (fused for speed in stage 1) by their split names.
    in_memory = result.net.state_dict()
    assert any(name.endswith(".q_proj.weight") for name in in_memory)
    compared = set()
    for name, p in in_memory.items():
        if not name.startswith("multi_modal_projector.") and ckpt.hub_name(name) in before:
            assert torch.equal(p.detach(), before[ckpt.hub_name(name)]), name
            compared.add(ckpt.hub_name(name))
    # Every decoder and projector tensor compared (the tower's unused top layers are not kept in memory)
    assert compared >= {k for k in before if not k.startswith("vision_tower.")} - changed


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_stage2_checkpoint_loads_in_transformers_and_llava_fast(tiny_hf, tiny_ckpt, image_folder, tmp_path, layout):
    from transformers import LlavaForConditionalGeneration

    source = tiny_ckpt if layout == "hub" else ck.write_checkpoint(tiny_hf, str(tmp_path / "original"), "original")
    result = run(source, image_folder, tmp_path, make_records(8))
    out = str(tmp_path / "out")
    before, after = tensors(tiny_ckpt), tensors(out)  # the hub checkpoint: the same weights, llava-hf names
    assert set(before) == set(after)
    for k in before:  # vision tower bitwise equal (its unbuilt last layer included); everything else trained
        assert torch.equal(before[k], after[k]) == k.startswith("vision_tower."), k
    ours = llava_fast.load(out, device="cpu", dtype="float32")
    loaded = ours.net.state_dict()  # split names: load() fuses q/k/v and gate/up, state_dict() splits them
    for name, p in result.net.state_dict().items():  # the file holds exactly what training produced (split names:
        assert torch.equal(loaded[name], p.detach()), name  # stage 2 fuses the frozen tower's q/k/v too)
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([[1]]), torch.randint(3, 32000, (1, 5), generator=g),
                     torch.full((1, ours.num_image_tokens), 32000), torch.randint(3, 32000, (1, 7), generator=g)], 1)
    pixels = ck.random_pixels(1, 28, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours.logits(ids, pixels), ref, atol=1e-4, rtol=0)


def test_tiny_model_overfits_eight_samples(tiny_ckpt, image_folder, tmp_path):
    result = run(tiny_ckpt, image_folder, tmp_path, make_records(8), batch_size=8, max_steps=60, lr=1e-2,
                 system="", warmup_ratio=0.1)
    losses = [loss for _, loss in result.losses]
    assert losses[0] > 5 and losses[-1] < 0.1


def test_resume_reproduces_the_uninterrupted_run(tiny_ckpt, image_folder, tmp_path):
    """LoRA with dropout and gradient checkpointing (RNG state matters), accumulation (data position)."""
    records = make_records(12, turns=2)
    common = dict(batch_size=2, grad_accum=2, max_steps=6, lr=1e-3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                  gradient_checkpointing=True, save_every=3, keep_checkpoints=3)
    full = run(tiny_ckpt, image_folder, tmp_path, records, "full", **common)
    assert ckpt.list_checkpoints(str(tmp_path / "full")) == [3]
    # What a crash after step 4 leaves: checkpoint-3, the log up to step 4, a half-written checkpoint dir.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", crashed / "checkpoint-3")
    (crashed / "checkpoint-4.tmp").mkdir()
    lines = (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    (crashed / "train_log.jsonl").write_text("\n".join(lines[:4]) + "\n")
    assert ckpt.list_checkpoints(str(crashed)) == [3]

    with pytest.raises(ValueError, match="settings differ.*--lr was 0.001, now 0.002"):
        run(tiny_ckpt, image_folder, tmp_path, records, "crashed", resume=True, **{**common, "lr": 2e-3})
    resumed = run(tiny_ckpt, image_folder, tmp_path, records, "crashed", resume=True, **common)
    assert resumed.losses == full.losses[3:]
    logged = [json.loads(line) for line in (crashed / "train_log.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"], m["lr"]) for m in logged] == \
        [(m["step"], m["loss"], m["lr"]) for m in map(json.loads, lines)]  # steps 5-6 replaced, not appended
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_then_merge_lora_writes_the_same_model(tiny_ckpt, image_folder, tmp_path):
    result = run(tiny_ckpt, image_folder, tmp_path, make_records(8), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    out, merged = str(tmp_path / "out"), str(tmp_path / "merged")
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all(adapter[k].abs().max() > 0 for k in adapter if k.endswith("lora_B"))
    assert cli_main(["merge-lora", "--adapter", out, "--output", merged]) == 0
    before, after = tensors(tiny_ckpt), tensors(merged)
    linear = ("_proj.weight",)
    for k in before:  # only the LLM's linear layers and the projector change
        trained = (k.startswith("language_model.model.layers.") and k.endswith(linear)) or \
            k.startswith("multi_modal_projector.")
        assert torch.equal(before[k], after[k]) != trained, k
    model = llava_fast.load(merged, device="cpu", dtype="float32")
    ids = torch.cat([torch.tensor([[1, 7, 9]]), torch.full((1, model.num_image_tokens), 32000),
                     torch.tensor([[11, 13, 400, 500]])], 1)
    pixels = ck.random_pixels(1, 28, seed=5)
    with torch.no_grad():
        want = result.net.eval()(ids, pixels)  # the trained model with its adapters unmerged
    torch.testing.assert_close(model.logits(ids, pixels), want, atol=2e-5, rtol=1e-5)


def test_stage1_from_llama_and_clip_then_stage2_from_its_projector(reference_dir, image_folder, tmp_path):
    """LLaVA's real starting point: a Vicuna (LlamaForCausalLM, SentencePiece tokenizer without <image>) and a
    CLIP checkpoint. The vocabulary gains <image> and <pad>, and the result is a llava-hf checkpoint."""
    from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    vision_cfg, text_cfg = ck.hf_configs()
    text_cfg.vocab_size, text_cfg.pad_token_id = 32000, 0  # Vicuna: no <image>, <pad>; pads with <unk>
    torch.manual_seed(0)
    llama, clip = LlamaForCausalLM(text_cfg), CLIPVisionModel(vision_cfg)
    llama_dir, clip_dir = str(tmp_path / "vicuna"), str(tmp_path / "clip")
    llama.save_pretrained(llama_dir)
    clip.save_pretrained(clip_dir)
    shutil.copy(os.path.join(reference_dir, "tokenizer", "tokenizer.model"), llama_dir)
    ck.write_preprocessor(clip_dir, 28)

    run(llama_dir, image_folder, tmp_path, make_records(8, text_only_every=0), stage=1, vision_tower=clip_dir)
    out = str(tmp_path / "out")
    after = tensors(out)
    llama_state, clip_state = llama.state_dict(), clip.state_dict()
    for k, v in clip_state.items():  # every CLIP layer, the unused last one and post_layernorm included
        assert torch.equal(after["vision_tower.vision_model." + k.removeprefix("vision_model.")], v), k
    embed = after["language_model.model.embed_tokens.weight"]
    assert embed.shape[0] == 32064 and torch.equal(embed[:32000], llama_state["model.embed_tokens.weight"])
    model = llava_fast.load(out, device="cpu", dtype="float32")
    assert model.tokenizer.token_to_id("<image>") == model.image_token_id == 32000
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.cat([torch.tensor([[1, 5, 6]]), torch.full((1, 4), 32000), torch.tensor([[7, 8]])], 1)
    pixels = ck.random_pixels(1, 28, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits,
                                   atol=1e-4, rtol=0)
    # Stage 2 starts from the same LLaMA and CLIP plus the stage-1 projector file.
    base = ckpt.load_base(llama_dir, vision_tower=clip_dir, projector=os.path.join(out, "mm_projector.safetensors"))
    for name, p in base.net.multi_modal_projector.named_parameters(prefix="multi_modal_projector"):
        assert torch.equal(p, after[name])


def _ctrl_c_as_from_a_shell():
    """A child's Ctrl-C at its default disposition and unblocked, as a shell starts a command: both are inherited
    across exec, and the test runner's process may have changed its own."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_saves_after_the_current_step_then_resume_continues_the_run(tiny_ckpt, image_folder, tmp_path):
    """`llava-fast train` (a subprocess, stepping inside backward, so that mid-step the weights would be
    half-updated) sent SIGINT once its first step is logged: it finishes that step, writes checkpoint-N, says
    where in one line and exits 130. The checkpoint holds N whole steps (log, trainer state, every parameter's
    AdamW step count), and resuming from it gives the uninterrupted run's losses from step N + 1."""
    records = make_records(8)
    common = dict(batch_size=2, max_steps=60, lr=1e-3, max_grad_norm=0.0, step_in_backward=True)
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "llava_fast", "train", "--stage", "2", "--model", tiny_ckpt,
           "--data", write_data(tmp_path / "data.json", records), "--image-folder", image_folder,
           "--output", str(out), "--batch-size", "2", "--max-steps", "60", "--lr", "1e-3", "--max-grad-norm", "0",
           "--step-in-backward", "--no-gradient-checkpointing", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the in-process runs' one thread (this folder's conftest)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_ctrl_c_as_from_a_shell)
    try:
        for line in proc.stderr:
            if line.startswith("step 1/60"):
                proc.send_signal(signal.SIGINT)
                break
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    said = [x for x in err.splitlines() if "interrupted" in x]
    assert code == 130 and "Traceback" not in err, err
    assert len(said) == 2 and said[0].endswith("(Ctrl-C again to quit without it)"), err
    steps = ckpt.list_checkpoints(str(out))
    assert len(steps) == 1 and 1 <= steps[0] < 60, err
    n = steps[0]
    assert said[1] == (f"llava-fast train: interrupted: saved step {n} of 60 in {out}/checkpoint-{n}; "
                       "continue with --resume")
    assert len((out / "train_log.jsonl").read_text().splitlines()) == n
    assert ckpt.read_json(str(out / f"checkpoint-{n}" / "trainer_state.json"))["step"] == n
    optim = torch.load(out / f"checkpoint-{n}" / "state.pt")["optim"]["state"]
    assert optim and all(int(s["step"]) == n for s in optim.values())

    full = run(tiny_ckpt, image_folder, tmp_path, records, "full", **common)
    resumed = run(tiny_ckpt, image_folder, tmp_path, records, "interrupted", resume=True, **common)
    assert resumed.losses == full.losses[n:]


# Run in a process of its own: signals reach the main thread of a process whose Ctrl-C is at its default, which a
# test runner's own process (a pytest-xdist worker) need not be.
SECOND_CTRL_C = """
import os, signal
from llava_fast.train.trainer import _Interrupt
with _Interrupt(main=False) as interrupt:
    os.kill(os.getpid(), signal.SIGINT)
    assert interrupt.requested and interrupt.agreed(None, None), "the first Ctrl-C was not taken as a request"
    try:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.1)  # a bytecode boundary at which the handler runs
        raise AssertionError("the second Ctrl-C did not interrupt at once")
    except KeyboardInterrupt:
        pass
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler was not restored"
signal.signal(signal.SIGINT, signal.SIG_IGN)
with _Interrupt(main=False) as interrupt:  # a run started with Ctrl-C ignored keeps ignoring it
    os.kill(os.getpid(), signal.SIGINT)
assert not interrupt.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "an ignored Ctrl-C was taken"
print("ok")
"""


def test_the_second_ctrl_c_interrupts_at_once_and_the_handler_is_restored():
    r = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], capture_output=True, text=True, timeout=120,
                       preexec_fn=_ctrl_c_as_from_a_shell)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


FORWARDED_CTRL_C = """
import os, signal
os.environ["TORCHELASTIC_RUN_ID"] = "run"  # as torchrun starts its workers
from llava_fast.train.trainer import _Interrupt
with _Interrupt(main=False) as interrupt:
    os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C
    os.kill(os.getpid(), signal.SIGINT)  # torchrun's agent forwarding it
    signal.sigtimedwait([], 0.1)
    assert interrupt.requested, "the Ctrl-C was not taken as a request"
    interrupt.first_at -= interrupt.FORWARDED_S  # later: a second Ctrl-C of the person
    try:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.1)
        raise AssertionError("the second Ctrl-C did not interrupt at once")
    except KeyboardInterrupt:
        pass
print("ok")
"""


def test_under_torchrun_the_agents_copy_of_a_ctrl_c_is_not_a_second_one():
    """torchrun's agent sends each worker a SIGINT of its own right after the terminal's: within FORWARDED_S it
    is the same request (the step finishes and the checkpoint is written); later, a second Ctrl-C quits at once."""
    r = subprocess.run([sys.executable, "-c", FORWARDED_CTRL_C], capture_output=True, text=True, timeout=120,
                       preexec_fn=_ctrl_c_as_from_a_shell)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_a_crash_while_saving_leaves_no_complete_looking_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    base = ckpt.load_base(tiny_ckpt)
    dst = str(tmp_path / "model")
    ckpt.save_llava_hf(dst, base, {})
    llava_fast.load(dst, device="cpu")  # complete
    real, calls = ckpt.save_tensors, []

    def dies_on_the_third_shard(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", dies_on_the_third_shard)
    changed = {n: p + 1 for n, p in base.net.named_parameters() if n.startswith("multi_modal_projector.")}
    with pytest.raises(OSError):
        ckpt.save_llava_hf(dst, base, changed, max_shard_bytes=2**20)
    assert not os.path.exists(os.path.join(dst, "config.json"))
    with pytest.raises(llava_fast.CheckpointError):
        llava_fast.load(dst, device="cpu")


def test_cli_user_errors_exit_2_with_one_line(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli_main(["train", "--stage", "2", "--model", tiny_ckpt, "--data", str(tmp_path / "nope.json"),
                     "--output", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.json: file not found" in err[0]
    data = write_data(tmp_path / "d.json", make_records(2))
    assert cli_main(["train", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--output", out, "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert cli_main(["merge-lora", "--adapter", str(tmp_path), "--output", out]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused_before_the_load(tiny_ckpt, image_folder, tmp_path, capsys,
                                                               monkeypatch):
    """A changed --max-steps (say, to train longer) was refused only after the checkpoint and the records loaded
    (a minute at 7B), naming the setting as max_steps and giving no way on. Now: before the load, the flag's own
    name, and what to do."""
    data = write_data(tmp_path / "d.json", make_records(4))
    out = str(tmp_path / "out")
    argv = ["train", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-folder", image_folder,
            "--output", out, "--batch-size", "2", "--save-every", "1", "--log-every", "1000"]
    assert cli_main(argv + ["--max-steps", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(ckpt, "load_base", lambda *a, **k: pytest.fail("the checkpoint loaded before the check"))
    assert cli_main(argv + ["--max-steps", "4", "--lr", "0.5", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-fast: error: --resume: settings differ from the run in ")
    assert "--max-steps was 2, now 4, --lr was 2e-05, now 0.5" in err[0] and "give those it started with" in err[0]


def test_skipped_records_are_pointed_at(tiny_ckpt, image_folder, tmp_path, capsys):
    """"2 x missing image file" in a file of 665k records left the user to hunt for them: each reason names the
    first record skipped for it, by position and id, in the warning and in --strict's refusal."""
    q, a = {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}
    records = make_records(4) + [{"id": "gone", "image": "nope.png", "conversations": [q, a]}, "not a record",
                                 {"image": "nope2.png", "conversations": [q, a]}]
    data = write_data(tmp_path / "d.json", records)
    argv = ["train", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-folder", image_folder,
            "--batch-size", "2", "--max-steps", "1", "--log-every", "1000"]
    assert cli_main(argv + ["--output", str(tmp_path / "out")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == ["llava-fast train: warning: skipping 3 of 7 records: 2 x missing image file (first: "
                       "records[4], id 'gone'), 1 x not a record with 'conversations' (first: records[5])"]
    assert cli_main(argv + ["--output", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("3 bad records in " + data + ": 2 x missing image file (first: "
                                             "records[4], id 'gone'), 1 x not a record with 'conversations' "
                                             "(first: records[5])"), err


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tiny_ckpt, image_folder, tmp_path, capsys,
                                                               monkeypatch):
    """--resume of a run that had finished ran its steps after the newest checkpoint again and rewrote its
    outputs, saying nothing. Now one line says it is finished (exit 0), before any load, and no file changes;
    asking for more steps is the usual refusal (exit 2)."""
    data = write_data(tmp_path / "d.json", make_records(6))
    out = tmp_path / "out"
    argv = ["train", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-folder", image_folder,
            "--output", str(out), "--batch-size", "2", "--max-steps", "3", "--save-every", "2", "--log-every", "1000"]
    assert cli_main(argv) == 0
    capsys.readouterr()

    def files():
        return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}

    before = files()
    assert "checkpoint-2/trainer_state.json" in before and len(before) > 6
    monkeypatch.setattr(ckpt, "load_base", lambda *a, **k: pytest.fail("the checkpoint loaded"))
    assert cli_main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llava-fast train: the run in {out} is finished: its 3 steps ran and its outputs are written; "
                   "nothing to resume (to train further, start a new run from what it wrote, in another --output)"]
    assert files() == before
    assert cli_main([a if a != "3" else "5" for a in argv] + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-steps was 3, now 5" in err[0], err
    assert files() == before
    monkeypatch.undo()
    assert cli_main(argv + ["--overwrite"]) == 0  # a replaced run is not finished until it finishes
    assert not (out / "checkpoint-2").exists() or files()["checkpoint-2/trainer_state.json"][1] != \
        before["checkpoint-2/trainer_state.json"][1]


def test_progress_writes_to_stderr_as_it_is_when_the_run_starts(monkeypatch):
    """Progress's stream was sys.stderr as it was when the trainer was imported: a run after stderr was replaced
    (and the old one closed, as a test's capture does) failed with "I/O operation on closed file"."""
    import io

    from llava_fast.train.trainer import Progress

    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    progress = Progress(2, 1)
    progress.update({"step": 2, "loss": 1.25, "lr": 1e-5, "tokens_per_s": 1234.0, "samples_per_s": 2.5}, 0)
    assert now.getvalue() == "step 2/2 | loss 1.2500 | lr 1.00e-05 | 1,234 tok/s | 2.5 samples/s | ETA 0:00:00\n"


def test_strict_refuses_bad_records_before_the_weights_load(tiny_ckpt, image_folder, tmp_path, capsys,
                                                             monkeypatch):
    """--strict found a bad record only after the base model loaded (a minute at 7B); the data is checked with
    the checkpoint's config and tokenizer alone, and so is a record past --max-length without --strict."""
    q, a = {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}
    data = write_data(tmp_path / "d.json", make_records(3) + [{"id": "x", "image": "nope.png",
                                                                "conversations": [q, a]}])
    monkeypatch.setattr(ckpt, "load_base", lambda *a, **k: pytest.fail("the checkpoint loaded before the check"))
    argv = ["train", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-folder", image_folder,
            "--output", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "1"]
    assert cli_main(argv + ["--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-fast: error: --strict: 1 bad record in ") and \
        "1 x missing image file (first: records[3], id 'x')" in err[0], err
    assert not os.path.exists(tmp_path / "out" / "train_log.jsonl")


def test_a_step_does_not_depend_on_how_its_batch_is_cut(tiny_ckpt, image_folder, tmp_path):
    """The loss is the mean over the global batch's target tokens: 8 x 1, 4 x 2 and 1 x 8 (batch x accumulation)
    give the same loss and gradient norm; a mean of micro-batch means would not."""
    records = make_records(8, turns=2)  # rows with different numbers of targets, text-only ones included
    logs = []
    for b in (8, 4, 1):
        run(tiny_ckpt, image_folder, tmp_path, records, f"b{b}", batch_size=b, grad_accum=8 // b, max_steps=1)
        logs.append(json.loads((tmp_path / f"b{b}" / "train_log.jsonl").read_text()))
    for m in logs[1:]:
        assert abs(m["loss"] - logs[0]["loss"]) <= 1e-6 * logs[0]["loss"]
        assert abs(m["grad_norm"] - logs[0]["grad_norm"]) <= 1e-5 * logs[0]["grad_norm"]
