"""`llava-fast bench train`: one optimizer step of LLaVA's stage 1 and stage 2 — tokens/s, MFU, peak memory.

The step is the trainer's (llava_fast.train.trainer), composed from its public pieces: the stage's trainable
parameters (`trainable_parameters`: stage 1 the projector; stage 2 projector + LLM; the vision tower always
frozen), float32 master weights beside bf16 compute on a GPU (`MasterWeights`), `LlavaForCausalLM.loss`
(fused linear + cross-entropy on the Triton backend), backward, gradient clipping at 1.0, AdamW (fused on
CUDA), the masters copied back. Gradient checkpointing of every decoder layer on a GPU, as the trainer does.
Batches: B samples of seq_len tokens = BOS + one image's tokens + random text; labels ignore BOS and the
image; pixels random. The data pipeline (JSON, tokenisation, image decoding) is not part of the step.

Full stage-2 fine-tuning of a 7B does not fit one 80 GB GPU (float32 masters, gradients and AdamW moments are
16 bytes x 7B); `--layers N` measures an N-layer decoder instead (MFU close to the full model's), or
`--lora-r R` trains stage 2 as LLaVA-1.5's LoRA recipe does (adapters on every decoder linear layer + the full
projector; alpha defaults to 2r, the recipe's 256/128), which fits. An out-of-memory stage is a note.

The table also projects each stage's wall-clock on 8 GPUs at the measured rate beside the paper's (LLaVA-1.5
7B on 8 A100s: stage 1 ~3.5 h for 558K samples, stage 2 ~10 h for 665K). `--transformers` adds the peak
memory of one forward + backward of transformers' LlavaForConditionalGeneration on the same batch (its
gradient checkpointing; with LoRA it trains the projector only: peft is not a dependency) beside ours
(`train_fwd_bwd_peak_memory`, CUDA only). `--against transformers` (bench/train_against.py) instead runs whole
optimizer steps of both trainers side by side, for stage 1, stage 2 full and LoRA in float32 and bfloat16.

MFU = model FLOPs (the trainer's `step_flops`: gradient-checkpointing recomputation and LoRA adapters not
counted, PaLM's convention) / step time / peak: the datasheet bf16 TFLOP/s of a known GPU (else the measured
bf16 matmul); on a CPU the measured fp32 matmul.
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


PAPER = {1: (558_000, 3.5), 2: (665_000, 10.0)}  # LLaVA-1.5 7B: samples per stage, hours on 8 A100s


def step_flops(cfg, batch: int, seq_len: int, stage: int, lora: bool = False) -> float:
    """The trainer's FLOP count of one step: B rows of seq_len tokens, one image each. With LoRA the LLM's
    weights get no gradients (the adapters' own FLOPs are not counted)."""
    from llava_fast.train.trainer import step_flops as trainer_step_flops

    return trainer_step_flops(cfg, [seq_len] * batch, batch, stage == 2 and not lora, True)


def projected_hours(stage: int, batch: int, step_ms: float, gpus: int = 8) -> float:
    """Hours for the paper's stage (PAPER's sample count) on `gpus` GPUs at one step of `batch` per step_ms."""
    return PAPER[stage][0] / (batch / (step_ms / 1e3) * gpus) / 3600


def build_net(settings, device, dtype, fused=True):
    """(net, name): the preset (optionally with `layers` decoder layers) with random weights, or a checkpoint.
    fused=False keeps q/k/v and gate/up as separate layers, as the trainer (and LoRA) has them."""
    from llava_fast.bench.generate_bench import load_model
    from llava_fast.errors import InputError
    from llava_fast.model import LlavaForCausalLM
    from llava_fast.presets import preset_config, random_init_

    if not settings.get("layers") and not (fused is False and settings["model"] is None):
        model, name = load_model(settings["preset"], settings["model"], device, dtype, settings.get("vision_tower"))
        return model.net, name
    if settings["model"]:
        raise InputError("--layers applies to a preset, not to --model")
    cfg = preset_config(settings["preset"])
    cfg.text.num_layers = settings.get("layers") or cfg.text.num_layers
    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    net = random_init_(net.to_empty(device=device).to(dtype), seed=0)
    net.requires_grad_(False).eval().init_rope(device)
    return net, settings["preset"] + (f"-{settings['layers']}-layers" if settings.get("layers") else "")


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
    from llava_fast.bench.device import Telemetry, command_line
    from llava_fast.checkpoints.load import resolve_device_dtype
    from llava_fast.errors import InputError

    device, dtype = resolve_device_dtype(settings["device"], settings["dtype"])
    previous_backend = ops.BACKEND
    doc = new_document("train", command_line(argv), settings)
    doc["device"] = device_info(device)
    if settings.get("against"):
        if settings["model"]:
            raise InputError("--against builds both engines from a preset's shapes (--preset, --layers), not --model")
        dtype = torch.float32  # the source weights; each row casts its own copy
    net, name = build_net(settings, device, dtype, fused=not settings.get("against"))
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
    settings["stages"] = sorted(settings["stages"])  # LoRA adapters are added before stage 2, after stage 1
    settings.setdefault("lora_r", None)
    if settings["lora_r"] and not settings.get("lora_alpha"):
        settings["lora_alpha"] = 2.0 * settings["lora_r"]
    telemetry = Telemetry(device).start()
    try:
        doc["ceilings"] = measure_ceilings(device)
        if settings.get("against"):
            from llava_fast.bench.train_against import run_against

            ops.use_backend(settings["backends"][0])
            run_against(doc, net, settings, device)
        for stage in [] if settings.get("against") else settings["stages"]:
            if stage == 2 and settings["lora_r"]:
                add_adapters(net, settings["lora_r"], settings["lora_alpha"], dtype)
            for batch in settings["batch_sizes"]:
                doc["figures"] += measure_stage(net, stage, batch, seq_len, settings, device, dtype,
                                                doc["ceilings"], doc["notes"])
                if settings.get("transformers"):
                    doc["figures"] += fwd_bwd_memory(net, stage, batch, seq_len, settings, device, dtype,
                                                     doc["notes"])
    finally:
        telemetry.stop()
        ops.use_backend(previous_backend)
        net.requires_grad_(False).eval()
        net.gradient_checkpointing = False
    doc["telemetry"] = telemetry.to_dict()
    if not doc["figures"]:
        raise InputError("no training step fitted in memory: " + "; ".join(doc["notes"]))
    return doc


def add_adapters(net, r, alpha, dtype):
    """LLaVA-1.5's LoRA on the decoder's linear layers, the adapters in the compute dtype (float32 masters)."""
    from llava_fast.train.lora import add_lora

    add_lora(net, r, alpha, 0.0)
    for p in net.parameters():
        p.data = p.data.to(dtype)  # add_lora creates the adapters in float32


def time_steps(net, stage, ids, labels, pixels, settings, device, dtype):
    """{backend: [seconds per step]} and {backend: peak bytes (CUDA)}: the trainer's step for each backend,
    interleaved (the order rotating per round). The optimizer and float32 masters live only in here."""
    from llava_fast.train.trainer import MasterWeights, trainable_parameters

    cuda = device.type == "cuda"
    llm, projector = trainable_parameters(net, stage, stage == 2 and bool(settings.get("lora_r")))
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


def _fwd_bwd_peak(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def fwd_bwd_memory(net, stage, batch, seq_len, settings, device, dtype, notes):
    """`train_fwd_bwd_peak_memory` of one forward + backward, llava-fast beside transformers' LLaVA built with
    the same shapes (its own random weights, its gradient checkpointing when ours is on). CUDA only."""
    if device.type != "cuda":
        note = "--transformers: peak memory is measured on CUDA only"
        notes.extend([note] if note not in notes else [])
        return []
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llava_fast.train.trainer import trainable_parameters

    lora = stage == 2 and bool(settings.get("lora_r"))
    backend = settings["backends"][0]
    ops.use_backend(backend)
    ids, labels, pixels = make_batch(net.cfg, batch, seq_len, device, dtype)
    trainable_parameters(net, stage, lora)
    net.train()
    try:
        ours = _fwd_bwd_peak(lambda: net.loss(ids, labels, pixels).backward(), device)
    finally:
        net.requires_grad_(False).eval()
        for p in net.parameters():
            p.grad = None
    cfg, t, v = net.cfg, net.cfg.text, net.cfg.vision
    hf_cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                       image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act),
        text_config=LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                                num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
                                max_position_embeddings=t.max_position_embeddings),
        image_token_index=cfg.image_token_id, vision_feature_layer=cfg.vision_feature_layer,
        image_seq_length=cfg.num_image_tokens)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(hf_cfg).to(dtype)
    hf.requires_grad_(False)
    if stage == 2 and not lora:
        hf.requires_grad_(True)
        hf.model.vision_tower.requires_grad_(False)
    hf.model.multi_modal_projector.requires_grad_(True)
    if settings["gradient_checkpointing"]:  # renamed activation_checkpointing_enable in transformers 5
        getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)()
    hf.train()

    def step(model=hf):
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()

    step()  # warm up
    hf.zero_grad(set_to_none=True)
    theirs = _fwd_bwd_peak(step, device)
    del hf, step
    torch.cuda.empty_cache()
    lab = dict(stage=stage, batch=batch, seq_len=seq_len)
    return [figure("train_fwd_bwd_peak_memory", "bytes", higher_is_better=False, value=peak_bytes, engine=engine,
                   **lab) for engine, peak_bytes in ((f"llava-fast/{backend}", ours), ("transformers", theirs))]


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

    flops = step_flops(cfg, batch, seq_len, stage, stage == 2 and bool(settings.get("lora_r")))
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
    if s.get("against"):
        from llava_fast.bench.train_against import markdown as against_markdown

        return against_markdown(doc)
    figs = doc["figures"]
    lora = f", stage 2 LoRA r={s['lora_r']} alpha={s['lora_alpha']:g}" if s.get("lora_r") else ""
    lines = [f"## llava-fast bench train: {s['model_name']} ({s['dtype']}) on {doc['device']['name']}, "
             f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}{lora}", ""]
    lines += [f"- {x}" for x in header_lines(doc)] + [""]
    rows = []
    for f in [f for f in figs if f["name"] == "train_step_time"]:
        lab = f["labels"]
        tput = find_one(figs, "train_throughput", **lab)
        mfu = find_one(figs, "train_mfu", **lab)
        mem = find_one(figs, "train_peak_memory", **lab)
        hours = projected_hours(lab["stage"], lab["batch"], f["value"])
        rows.append([lab["stage"], lab["engine"], lab["batch"], lab["seq_len"], fmt(f["value"]), fmt(tput["value"]),
                     fmt(mfu["value"], "%") if mfu else "-", fmt(mem["value"], "bytes") if mem else "-",
                     f"{hours:.3g} ({PAPER[lab['stage']][1]:g})"])
    lines.append(md_table(["stage", "engine", "batch", "tokens/sample", "step ms", "tokens/s", "MFU", "peak memory",
                           "8-GPU stage hours (paper, 8xA100)"], rows))
    for f in [f for f in figs if f["name"] == "train_fwd_bwd_peak_memory"]:
        lab = f["labels"]
        lines.append(f"forward + backward peak memory, stage {lab['stage']}, batch {lab['batch']}: {lab['engine']} "
                     f"{fmt(f['value'], 'bytes')}")
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
