"""`llava-fast bench train --against transformers`: llava-fast's training step beside what a user would
otherwise write, one table.

The alternative is a plain transformers loop: `LlavaForConditionalGeneration` (its default SDPA attention), the
loss from `labels`, `loss.backward()`, gradient clipping at 1.0 (`--max-grad-norm`), `torch.optim.AdamW`; LoRA
through `peft` (adapters on the decoder's q/k/v/o/gate/up/down, as LLaVA-1.5's recipe, plus the full projector);
bfloat16 as torch.autocast(bfloat16) over float32 weights, the mixed precision the transformers docs teach.
llava-fast runs its trainer's step (`trainable_parameters`, `MasterWeights`, `LlavaForCausalLM.loss`, AdamW):
in bfloat16 the model holds bf16 weights and the optimizer float32 masters, the bf16 gradients kept until the
step, which makes each tensor's float32 gradient just before its update (`StepFromModelGrads`); in stage 2 full
each decoder MLP keeps only its input for backward (`train --recompute-mlp`) and, on the CPU, the freed heap goes
back to the OS two (bfloat16) or four (float32) times a step (`return_freed_heap`: glibc's malloc_trim, no
allocator setting, so the transformers loop in the same process keeps glibc's defaults). With
`--max-grad-norm 0` neither engine clips and llava-fast steps each parameter inside backward
(`train --step-in-backward`), which clipping rules out; `--two-pass-clipping` clips with llava-fast's norm from a
first, norm-only backward and steps inside a second (`train --two-pass-clipping`). Stepping in backward, bfloat16
stage 2 full keeps no bf16 copy of the trained weights (the trainer's `casts_weights_on_use`).

Same for both: the weights (llava-fast's random weights rounded to float16, the dtype LLaVA-1.5's checkpoints
store, and loaded from that float16 copy by both: transformers into float32 parameters, llava-fast as train holds a
half-precision checkpoint, in float32 runs its frozen matrices kept float16 and widened where an op reads them;
peft's lora_A is llava-fast's draw, so the first-step losses agree to float tolerance; the table shows both), the
batch (B rows of BOS + image tokens + random text, random pixels), the optimizer's settings, the trained parameters
per row:

    stage 1        the projector (vision tower and LLM frozen)
    stage 2 full   projector + LLM (vision tower frozen)
    stage 2 LoRA   projector + LoRA adapters (r, alpha) on the LLM's linear layers

Timing: the rows' two engines alternate step by step, the order rotating per round (a shared host's noise
hits both alike); the median step is reported. tokens/s counts every position, image tokens included.

Peak memory: on the CPU the growth of the resident set (VmHWM, reset through /proc/self/clear_refs) over the
engine's build, and over its first steps on top of what the build left (weights, gradients, optimizer state,
activations), with freed heap returned to the OS (malloc_trim) before each span, so that one engine's freed
memory does not hide the other's; on CUDA torch.cuda.max_memory_allocated over the same spans. Both engines
are built before either steps, so that the run's last row can free the source weights both were copied from.

MFU: the trainer's model FLOPs (`step_flops`, every position's logits counted, LoRA's adapters not) / step
time / the measured matmul peak of the row's dtype on this device.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import sys

import torch

from llava_fast.bench.report import figure, find_one, fmt, header_lines, md_table
from llava_fast.bench.timing import Clock, summarize, time_repeats

LORA_TARGETS_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MODES = (("1", 1, False), ("2", 2, False), ("2-lora", 2, True))  # (row label, stage, LoRA)
PRECISIONS = ("float32", "bfloat16")
ENGINES = ("llava-fast", "transformers")
CHECKPOINT_DTYPE = torch.float16  # the weights' dtype in LLaVA-1.5's checkpoints


# ------------------------------------------------------------------------------------------------------
# Memory: resident-set peaks on the CPU, allocator peaks on CUDA
# ------------------------------------------------------------------------------------------------------


def _trim_heap():
    """Return freed heap pages to the OS (glibc), so that a later peak counts the memory it touches anew."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Bytes of peak growth over a span: `with PeakMemory(device) as m: ...; m.bytes`."""

    def __init__(self, device):
        self.device, self.bytes, self.end = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
            self.end = torch.cuda.memory_allocated(self.device) - self.base
        else:
            self.bytes = _status_kib("VmHWM") * 1024 - self.base
            _trim_heap()  # what the span leaves live: heap it freed and kept would count again in the next span
            self.end = _status_kib("VmRSS") * 1024 - self.base
        return False


# ------------------------------------------------------------------------------------------------------
# The two engines: a model, its optimizer, and one step
# ------------------------------------------------------------------------------------------------------


class Engine:
    """One trainer's state for one row; step() runs one optimizer step and returns the loss (a float)."""

    def __init__(self, name, step_fn, state):
        self.name, self._step, self.state = name, step_fn, state
        self.losses = []

    def step(self):
        loss = self._step()
        self.losses.append(float(loss))


def build_llava_fast(source, stage, lora, dtype, settings):
    """The trainer's step on a copy of `source` (float16 weights, as the checkpoint holds them): frozen weights
    and the model in `dtype`, float32 masters of the trained ones (the parameters themselves in float32), AdamW
    over the masters; in float32 the frozen matrices stay float16, widened where an op reads them, as train
    holds a half-precision checkpoint's (`widened_on_use`)."""
    from llava_fast.train.lora import add_lora
    from llava_fast.train.trainer import (
        MasterWeights,
        OptimizerInBackward,
        StepFromModelGrads,
        clip_factor,
        clip_or_norm,
        fuse_frozen_projections,
        keep_embedding_grad_sparse,
        make_optimizer,
        return_freed_heap,
        return_freed_heap_after_decoder_backward,
        sparse_embedding_grad,
        step_row_sparse,
        trainable_parameters,
        trains_llm_weight,
        widened_on_use,
    )

    def held(name, p):  # as train loads the checkpoint (load_base's frozen_dtype and keeps_stored)
        if name.startswith("multi_modal_projector.") or trains_llm_weight(name, stage, lora):
            return p.detach().to(torch.float32, copy=True)
        if dtype == torch.float32 and widened_on_use(name, p):
            return p.detach().clone()
        return p.detach().to(dtype, copy=True)

    # each weight copied straight into the form train holds it in: no float32 copy of the whole model first (3.6
    # GiB at 7B shapes with 2 layers, which a bfloat16 run's peak then measured)
    weights = {id(p): torch.nn.Parameter(held(n, p), requires_grad=False) for n, p in source.named_parameters()}
    net = copy.deepcopy(source, memo=weights)
    del weights
    if lora:
        add_lora(net, settings["lora_r"], settings["lora_alpha"], 0.0, seed=0)
    llm, projector = trainable_parameters(net, stage, lora)
    fuse_frozen_projections(net, stage)
    if stage == 2 and not lora:  # train --recompute-mlp: the MLPs' inner activations are recomputed in backward
        net.recompute_mlp_activations()
    for p in net.parameters():
        if not p.requires_grad and not (dtype == torch.float32 and p.dtype == CHECKPOINT_DTYPE):
            p.data = p.data.to(dtype)
    max_norm = settings.get("max_grad_norm", 1.0)
    # the trainer's paths for one micro-batch a step in one process
    two_pass = settings.get("two_pass_clipping", False)  # train --two-pass-clipping
    # bfloat16 stepping in backward: no bf16 copy of the trained weights (the trainer's casts_weights_on_use)
    cast_on_use = dtype != torch.float32 and (two_pass or max_norm == 0) and not lora
    masters = MasterWeights(llm + projector, dtype, net if cast_on_use else None)
    masters.widen_frozen_on_use(net)  # float32: the float16 matrices widened where an op reads them
    device = source.lm_head.weight.device
    optimizer = make_optimizer([{"params": masters.masters, "lr": settings["lr"]}], 0.0, device)
    from_model_grads = (StepFromModelGrads(optimizer, masters) if dtype != torch.float32 and max_norm > 0
                        and not two_pass else None)
    if not from_model_grads:
        masters.fold_grads_in_backward()
    in_backward = OptimizerInBackward(optimizer, masters, net) if max_norm == 0 or two_pass else None
    if sparse_embedding_grad(net, stage, lora, dtype):
        keep_embedding_grad_sparse(net)
    net.train()
    ids, labels, pixels = settings["batch"]
    pixels = pixels.to(dtype)
    trim = device.type == "cpu" and stage == 2 and not lora  # the trainer's rule (trims_heap)
    trim_in_backward = trim and dtype == torch.float32
    if trim_in_backward:
        return_freed_heap_after_decoder_backward(net)

    def step():
        if two_pass:  # the first pass only takes the norm (the trainer's _Stepper.step)
            in_backward.arm(device, norm_only=True)
            with masters.casting():
                first = net.loss(ids, labels, pixels)
            if trim_in_backward:
                return_freed_heap()
            first.backward()
            del first
            if trim:
                return_freed_heap()
            in_backward.arm(device, scale=clip_factor(in_backward.disarm(), max_norm))
        elif in_backward:
            in_backward.arm(device)
        with masters.casting():
            loss = net.loss(ids, labels, pixels)
        if trim_in_backward:  # the trainer's: freed heap back to the OS (return_freed_heap)
            return_freed_heap()
        loss.backward()
        if trim:
            return_freed_heap()
        if from_model_grads:
            from_model_grads.step(max_norm)
        elif not in_backward:
            masters.accumulate_grads()
            clip_or_norm(masters.masters, max_norm)
            step_row_sparse(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            masters.copy_to_model()
        if in_backward:
            in_backward.disarm()
        if trim:
            return_freed_heap()
        return loss.detach()

    return Engine("llava-fast", step, (net, masters, optimizer))


def hf_name(name):
    """llava-fast's parameter name -> transformers' LlavaForConditionalGeneration module path."""
    for ours, theirs in (("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name  # lm_head.weight


def transformers_model(source):
    """transformers' LlavaForConditionalGeneration with `source`'s weights (float32, SDPA attention)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_fast.train.checkpoint import llava_hf_config

    config = LlavaConfig(**llava_hf_config(source.cfg, torch.float32))
    with torch.device(source.lm_head.weight.device):
        hf = LlavaForConditionalGeneration(config)
    state = {hf_name(n): t for n, t in source.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # CLIP's post_layernorm is not on LLaVA's feature path (the features are a hidden state before it), nor are
    # the layers after vision_feature_layer (LLaVA-1.5's -2: layer 24 of 24), which llava-fast does not build;
    # transformers keeps (and runs) them with its own initialisation, which the features do not depend on
    unused = tuple(f".encoder.layers.{i}." for i in range(source.cfg.num_vision_layers_run,
                                                          source.cfg.vision.num_layers))
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)
               and ".post_layernorm." not in n
               and not (n.startswith("model.vision_tower.") and any(u in n for u in unused))]
    if missing or unexpected:
        raise RuntimeError(f"weight names do not map: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return hf


def build_transformers(source, stage, lora, dtype, settings):
    """A plain transformers loop (peft for LoRA); bfloat16 as autocast over float32 weights."""
    hf = transformers_model(source)
    hf.requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        hf = get_peft_model(hf, LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                                           target_modules=LORA_TARGETS_REGEX))
        _copy_lora_a(hf, settings)
    elif stage == 2:
        hf.model.language_model.requires_grad_(True)
        hf.lm_head.requires_grad_(True)
    base = hf.get_base_model() if lora else hf
    base.model.multi_modal_projector.requires_grad_(True)
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    hf.train()
    ids, labels, pixels = settings["batch"]
    device = ids.device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    max_norm = settings.get("max_grad_norm", 1.0)

    def step():
        with autocast:
            loss = hf(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Engine("transformers", step, (hf, optimizer))


def _copy_lora_a(peft_model, settings):
    """peft's lora_A <- the draw llava-fast's add_lora makes (seed 0), so both runs follow the same path
    (lora_B starts at zero in both)."""
    from llava_fast.train.lora import LoraLinear, add_lora

    source = settings["source"]
    # the modules copied, the weights shared: at 7B shapes a full copy here would be GBs inside the peak span
    probe = copy.deepcopy(source, memo={id(p): p for p in source.parameters()})
    add_lora(probe, settings["lora_r"], settings["lora_alpha"], 0.0, seed=0)
    ours = {n: m.lora_A for n, m in probe.named_modules() if isinstance(m, LoraLinear)}
    copied = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                key = name[name.index("language_model."):]
                module.lora_A["default"].weight.copy_(ours[key])
                copied += 1
    if copied != len(ours):
        raise RuntimeError(f"peft adapted {copied} layers, llava-fast {len(ours)}")


BUILDERS = {"llava-fast": build_llava_fast, "transformers": build_transformers}


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


def matmul_peak_tflops(device, dtype):
    """Best-of-5 TFLOP/s of a 2048^3 matmul in `dtype` on `device` (bf16 on the CPU runs on AMX where present)."""
    g = torch.Generator(device=device).manual_seed(0)
    n = 2048
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    times = time_repeats(lambda: a @ b, device=device, repeats=5, warmup=2)
    return 2 * n**3 / min(times) / 1e12


def measure_row(source, mode, stage, lora, precision, settings, device, peak_tflops, release_source=False):
    """Build both engines, then their first steps, then their steps interleaved. Each engine's peak memory is
    that of its build, or what its build left plus the peak of its first steps, whichever is more. With
    release_source (the run's last row) the source's weights are freed once both engines are built, before
    any step (at 7B shapes a third copy of the weights decides what fits). Returns the row's figures and each
    engine's losses of steps 1 and 2."""
    from llava_fast.bench.train_bench import step_flops

    dtype = getattr(torch, precision)
    batch, seq_len = settings["batch"][0].shape
    warmup = max(2, settings["warmup"])  # steps 1 and 2: their losses are the comparison's check
    engines, built, memory = {}, {}, {}
    for name in ENGINES:
        with PeakMemory(device) as built[name]:
            engines[name] = BUILDERS[name](source, stage, lora, dtype, settings)
    if release_source:
        with torch.no_grad():
            for t in [*source.parameters(), *source.buffers()]:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    for name in ENGINES:  # step 1 (the loss compared) and the warm-up steps, inside the memory span
        with PeakMemory(device) as m:
            for _ in range(warmup):
                engines[name].step()
        memory[name] = max(built[name].bytes, built[name].end + m.bytes)
    clock, times = Clock(device), {name: [] for name in ENGINES}
    for r in range(settings["repeats"]):
        order = ENGINES[r % 2:] + ENGINES[: r % 2]
        for name in order:
            t0 = clock.now()
            engines[name].step()
            times[name].append(clock.now() - t0)
    flops = step_flops(source.cfg, batch, seq_len, stage, lora)
    lab = dict(stage=mode, batch=batch, seq_len=seq_len, precision=precision)
    figs = []
    for name in ENGINES:
        e = dict(lab, engine=name)
        figs.append(figure("train_step_time", "ms", higher_is_better=False,
                           samples=[1e3 * t for t in times[name]], **e))
        figs.append(figure("train_throughput", "tokens/s", higher_is_better=True,
                           samples=[batch * seq_len / t for t in times[name]], **e))
        figs.append(figure("train_mfu", "%", higher_is_better=True, peak="measured",
                           value=100 * flops / summarize(times[name])["median"] / 1e12 / peak_tflops, **e))
        figs.append(figure("train_peak_memory", "bytes", higher_is_better=False, value=max(memory[name], 0), **e))
    ours, theirs = (summarize(times[n])["median"] for n in ENGINES)
    figs.append(figure("train_speedup", "x", higher_is_better=True, value=theirs / ours, engine="llava-fast",
                       baseline="transformers", **lab))
    print(f"bench train --against: stage {mode} {precision}: llava-fast {1e3 * ours:.0f} ms, transformers "
          f"{1e3 * theirs:.0f} ms per step ({theirs / ours:.2f}x); peak memory {memory['llava-fast'] / 2**20:.0f} vs "
          f"{memory['transformers'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    losses = {name: engines[name].losses[:2] for name in ENGINES}
    del engines
    _trim_heap()
    return figs, losses


def run_against(doc, net, settings, device):
    """Every row (stage 1, stage 2 full, stage 2 LoRA) x precision, both engines; fills doc in place."""
    import importlib.util

    from llava_fast.bench.train_bench import make_batch
    from llava_fast.errors import InputError

    absent = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if absent:
        raise InputError(f"--against transformers needs {' and '.join(absent)} (pip install {' '.join(absent)})")
    # the checkpoint both engines load: the random weights rounded to float16, as LLaVA-1.5's checkpoints (the
    # original's and llava-hf's) store them; transformers reads them into float32 (exact)
    source = net.float()
    source.requires_grad_(False)
    for p in source.parameters():
        p.data = p.data.to(CHECKPOINT_DTYPE)
    batch = settings["batch_sizes"][0]
    settings["batch"] = make_batch(source.cfg, batch, settings["seq_len"], device, torch.float32)
    settings["source"] = source
    settings.setdefault("lr", 1e-5)
    checks = doc["checks"].setdefault("first_step_loss", {})
    modes = [m for m in MODES if (m[0] in settings["rows"] if settings.get("rows") else m[1] in settings["stages"])]
    rows = [(precision, *m) for precision in settings["precisions"] for m in modes]
    try:
        for i, (precision, mode, stage, lora) in enumerate(rows):
            if precision not in doc["checks"].setdefault("matmul_tflops", {}):
                doc["checks"]["matmul_tflops"][precision] = matmul_peak_tflops(device, getattr(torch, precision))
            peak = doc["checks"]["matmul_tflops"][precision]
            figs, losses = measure_row(source, mode, stage, lora, precision, settings, device, peak,
                                       release_source=i == len(rows) - 1)
            doc["figures"] += figs
            checks[f"{mode}/{precision}"] = losses
    finally:
        del settings["batch"], settings["source"]


def markdown(doc):
    s = doc["settings"]
    figs = doc["figures"]
    lines = [f"## llava-fast bench train --against transformers: {s['model_name']} on {doc['device']['name']}, "
             f"batch {s['batch_sizes'][0]} x {s['seq_len']} tokens, LoRA r={s['lora_r']} alpha={s['lora_alpha']:g}, "
             f"gradient checkpointing off, AdamW, " + (f"clipping at {clip:g}" if (clip := s.get("max_grad_norm", 1.0))
                                                          else "no clipping (llava-fast steps in backward)")
             + (" (llava-fast: --two-pass-clipping)" if s.get("two_pass_clipping") else "")
             + "; both load the random weights rounded to float16, as LLaVA-1.5's checkpoints store them", ""]
    lines += [f"- {x}" for x in header_lines(doc)] + [""]
    names = {"1": "stage 1 (projector)", "2": "stage 2 full", "2-lora": "stage 2 LoRA"}
    rows = []
    for f in figs:
        if f["name"] != "train_speedup":
            continue
        lab = {k: f["labels"][k] for k in ("stage", "precision", "batch", "seq_len")}
        cells = {}
        for engine in ENGINES:
            cells[engine] = {n: find_one(figs, n, engine=engine, **lab) for n in
                             ("train_step_time", "train_throughput", "train_mfu", "train_peak_memory")}
        peaks = [cells[engine]["train_peak_memory"]["value"] for engine in ENGINES]
        mem = peaks[0] / max(1, peaks[1])
        loss = doc["checks"]["first_step_loss"][f"{lab['stage']}/{lab['precision']}"]
        for engine in ENGINES:
            c = cells[engine]
            ours = engine == "llava-fast"
            rows.append([names[lab["stage"]], lab["precision"], engine, fmt(c["train_step_time"]["value"]),
                         fmt(c["train_throughput"]["value"]), fmt(c["train_mfu"]["value"], "%"),
                         fmt(c["train_peak_memory"]["value"], "bytes"), f"{loss[engine][0]:.5f}",
                         fmt(f["value"], "x") if ours else "", f"{mem:.2f}x" if ours else ""])
    lines.append(md_table(["row", "precision", "engine", "step ms", "tokens/s", "MFU", "peak memory", "step-1 loss",
                           "tokens/s vs transformers", "memory vs transformers"], rows))
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
