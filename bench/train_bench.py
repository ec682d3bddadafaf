"""`llava-fast bench train`: one optimizer step of LLaVA's stage 1 and stage 2 — tokens/s, MFU, peak memory.

The step is the trainer's (llava_fast.train.trainer), composed from its public pieces: the stage's trainable
parameters (`trainable_parameters`: stage 1 the projector; stage 2 projector + LLM; the vision tower always
frozen), float32 master weights beside bf16 compute on a GPU (`MasterWeights`), `LlavaForCausalLM.loss`
(fused linear + cross-entropy on the Triton backend), backward, gradient clipping at 1.0, AdamW (fused on
CUDA), the masters copied back. Gradient checkpointing of every decoder layer on a GPU, as the trainer does.
Batches: B samples of seq_len tokens = BOS + one image's tokens + random text; labels ignore BOS and the
image; pixels random. The data pipeline (JSON, tokenisation, image decoding) is not part of the step.

Full stage-2 fine-tuning of a 7B does not fit one 80 GB GPU (float32 masters, gradients and AdamW moments are
16 bytes x 7B); `--layers N` measures an N-layer decoder instead (MFU close to the full model's), as the
trainer's own benchmark (python -m llava_fast.train.benchmark) does. An out-of-memory stage is a note.

MFU = model FLOPs (the trainer's `step_flops`: gradient-checkpointing recomputation not counted, PaLM's
convention) / step time / peak: the datasheet bf16 TFLOP/s of a known GPU (else the measured bf16 matmul);
on a CPU the measured fp32 matmul.
"""

from __future__ import annotations

import os

import torch

from llava_fast import ops
from llava_fast.bench.device import device_info, measure_ceilings, peak
from llava_fast.bench.report import figure, find_one, fmt, header_lines, md_table, new_document
from llava_fast.bench.timing import Clock, summarize

DEFAULTS = {
    "cpu": dict(preset="tiny", backends=["torch"], batch_sizes=[1], repeats=3, checkpointing=False),
    "cuda": dict(preset="llava-1.5-7b", backends=["triton", "torch"], batch_sizes=[8], repeats=10,
                 checkpointing=True),
}


def step_flops(cfg, batch: int, seq_len: int, stage: int) -> float:
    """The trainer's FLOP count of one step: B rows of seq_len tokens, one image each."""
    from llava_fast.train.trainer import step_flops as trainer_step_flops

    return trainer_step_flops(cfg, [seq_len] * batch, batch, stage == 2, True)


def build_net(settings, device, dtype):
    """(net, name): the preset (optionally with `layers` decoder layers) with random weights, or a checkpoint."""
    from llava_fast.bench.generate_bench import load_model
    from llava_fast.errors import InputError
    from llava_fast.model import LlavaForCausalLM
    from llava_fast.presets import preset_config, random_init_

    if not settings.get("layers"):
        model, name = load_model(settings["preset"], settings["model"], device, dtype, settings.get("vision_tower"))
        return model.net, name
    if settings["model"]:
        raise InputError("--layers applies to a preset, not to --model")
    cfg = preset_config(settings["preset"])
    cfg.text.num_layers = settings["layers"]
    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    net = random_init_(net.to_empty(device=device).to(dtype), seed=0)
    net.requires_grad_(False).eval().init_rope(device)
    return net, f"{settings['preset']}-{settings['layers']}-layers"


def make_batch(cfg, batch, seq_len, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = cfg.num_image_tokens
    text = torch.randint(3, min(cfg.text.vocab_size, 32000), (batch, seq_len - R - 1), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, R), cfg.image_token_id), text], 1)
    labels = ids.clone()
    labels[:, : R + 1] = -100
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids.to(device), labels.to(device), pixels.to(device, dtype)


def run(settings: dict, argv) -> dict:
    from llava_fast.api import resolve_device_dtype
    from llava_fast.bench.device import Telemetry, command_line
    from llava_fast.errors import InputError

    device, dtype = resolve_device_dtype(settings["device"], settings["dtype"])
    previous_backend = ops.BACKEND
    doc = new_document("train", command_line(argv), settings)
    doc["device"] = device_info(device)
    net, name = build_net(settings, device, dtype)
    cfg = net.cfg
    seq_len = settings["seq_len"]
    if seq_len is None:
        seq_len = 2048 if device.type == "cuda" else cfg.num_image_tokens + 64
    if seq_len <= cfg.num_image_tokens + 1:
        raise InputError(f"--seq-len {seq_len} leaves no text after BOS and {cfg.num_image_tokens} image tokens")
    if seq_len > cfg.text.max_position_embeddings:
        raise InputError(f"--seq-len {seq_len} exceeds the model's context of {cfg.text.max_position_embeddings}")
    settings.update(device=str(device), dtype=str(dtype).replace("torch.", ""), model_name=name, seq_len=seq_len,
                    decoder_layers=cfg.text.num_layers)
    if settings["model"]:
        settings["preset"] = None
    if device.type == "cpu" and "triton" in settings["backends"]:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        doc["notes"].append("llava-fast/triton on a CPU runs in Triton's interpreter: its times are not performance")
    net.gradient_checkpointing = settings["gradient_checkpointing"]
    telemetry = Telemetry(device).start()
    try:
        doc["ceilings"] = measure_ceilings(device)
        for stage in settings["stages"]:
            for batch in settings["batch_sizes"]:
                doc["figures"] += measure_stage(net, stage, batch, seq_len, settings, device, dtype,
                                                doc["ceilings"], doc["notes"])
    finally:
        telemetry.stop()
        ops.use_backend(previous_backend)
        net.requires_grad_(False).eval()
        net.gradient_checkpointing = False
    doc["telemetry"] = telemetry.to_dict()
    if not doc["figures"]:
        raise InputError("no training step fitted in memory: " + "; ".join(doc["notes"]))
    return doc


def time_steps(net, stage, ids, labels, pixels, settings, device, dtype):
    """{backend: [seconds per step]} and {backend: peak bytes (CUDA)}: the trainer's step for each backend,
    interleaved (the order rotating per round). The optimizer and float32 masters live only in here."""
    from llava_fast.train.trainer import MasterWeights, trainable_parameters

    cuda = device.type == "cuda"
    llm, projector = trainable_parameters(net, stage, False)
    masters = MasterWeights(llm + projector, dtype)
    optimizer = torch.optim.AdamW(masters.masters, lr=1e-5, weight_decay=0.0, fused=cuda)
    clock = Clock(device)
    backends = list(settings["backends"])
    times = {b: [] for b in backends}
    memory = {b: 0 for b in backends}

    def step(backend):
        ops.use_backend(backend)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = clock.now()
        net.loss(ids, labels, pixels).backward()
        masters.accumulate_grads()
        torch.nn.utils.clip_grad_norm_(masters.masters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.copy_to_model()
        elapsed = clock.now() - t0
        if cuda:
            memory[backend] = max(memory[backend], torch.cuda.max_memory_allocated(device))
        return elapsed

    net.train()
    try:
        for _ in range(settings["warmup"]):
            for b in backends:
                step(b)
        for r in range(settings["repeats"]):
            for b in backends[r % len(backends):] + backends[: r % len(backends)]:
                times[b].append(step(b))
    finally:
        net.eval()
        for p in net.parameters():
            p.grad = None
    return times, memory


def measure_stage(net, stage, batch, seq_len, settings, device, dtype, ceilings, notes):
    cuda = device.type == "cuda"
    cfg = net.cfg
    ids, labels, pixels = make_batch(cfg, batch, seq_len, device, dtype)
    try:
        times, memory = time_steps(net, stage, ids, labels, pixels, settings, device, dtype)
    except torch.cuda.OutOfMemoryError as e:
        notes.append(f"stage {stage}, batch {batch} x {seq_len} tokens, {cfg.text.num_layers} decoder layers: out "
                     f"of memory ({str(e).splitlines()[0][:160]}); --layers N measures a shallower decoder")
        times, memory = {}, {}
    if cuda:
        torch.cuda.empty_cache()  # the stage's optimizer state and masters are gone with time_steps' frame
    backends = list(settings["backends"])

    flops = step_flops(cfg, batch, seq_len, stage)
    compute_ok = (dtype in (torch.bfloat16, torch.float16)) == cuda
    peak_flops, source = peak(ceilings, "matmul")
    figs = []
    for backend, samples in times.items():
        if not samples:
            continue
        lab = dict(stage=stage, engine=f"llava-fast/{backend}", batch=batch, seq_len=seq_len)
        figs.append(figure("train_step_time", "ms", higher_is_better=False, samples=[1e3 * t for t in samples], **lab))
        figs.append(figure("train_throughput", "tokens/s", higher_is_better=True,
                           samples=[batch * seq_len / t for t in samples], **lab))
        if compute_ok:
            mfu = 100 * flops / summarize(samples)["median"] / 1e12 / peak_flops
            figs.append(figure("train_mfu", "%", higher_is_better=True, value=mfu, peak=source, **lab))
        if cuda:
            figs.append(figure("train_peak_memory", "bytes", higher_is_better=False, value=memory[backend], **lab))
    if len(times) == 2 and all(times.values()):
        a, b = backends
        ratio = summarize(times[b])["median"] / summarize(times[a])["median"]
        figs.append(figure("train_speedup", "x", higher_is_better=True, value=ratio, stage=stage,
                           engine=f"llava-fast/{a}", baseline=f"llava-fast/{b}", batch=batch, seq_len=seq_len))
    return figs


def markdown(doc: dict) -> str:
    s = doc["settings"]
    figs = doc["figures"]
    lines = [f"## llava-fast bench train: {s['model_name']} ({s['dtype']}) on {doc['device']['name']}, "
             f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}", ""]
    lines += [f"- {x}" for x in header_lines(doc)] + [""]
    rows = []
    for f in [f for f in figs if f["name"] == "train_step_time"]:
        lab = f["labels"]
        tput = find_one(figs, "train_throughput", **lab)
        mfu = find_one(figs, "train_mfu", **lab)
        mem = find_one(figs, "train_peak_memory", **lab)
        rows.append([lab["stage"], lab["engine"], lab["batch"], lab["seq_len"], fmt(f["value"]), fmt(tput["value"]),
                     fmt(mfu["value"], "%") if mfu else "-", fmt(mem["value"], "bytes") if mem else "-"])
    lines.append(md_table(["stage", "engine", "batch", "tokens/sample", "step ms", "tokens/s", "MFU", "peak memory"],
                          rows))
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
