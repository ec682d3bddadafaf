"""`llava-fast bench kernels`: each Triton kernel against its torch baseline, at the preset's shapes.

Baselines are the best plain torch has for the same work, not our eager references: SDPA (with RoPE and the
cache write done eagerly) for attention, conv2d + cat + add + LayerNorm for the patch embedding, embedding +
masked_scatter (+ the projector's F.linear) for the splice, F.layer_norm, and eager ops for the fused
pointwise ones (RMSNorm with residual, SwiGLU, quick_gelu) and for linear + cross-entropy.

Per kernel and implementation: median time; TFLOP/s from the FLOPs the math needs and/or GB/s from the
bytes the fused kernel must move at least (the same counts for the baseline, so the two rates compare
like for like: "effective" rates); % of the device's peak for the resource the kernel is bound by. Peak is
the datasheet value when the GPU is known, else the measured ceiling; compute % is only given where the
ceiling's precision matches the kernel's (bf16/fp16 on a GPU, fp32 on a CPU).

Timing: GPU: CUDA events, inputs rotated over enough copies to exceed twice the L2; CPU: wall clock.
On a CPU the Triton kernels run in Triton's interpreter and shapes default to 'small': those numbers check
that the harness works, they are not performance.

FLOP and byte counts (es = bytes per element; the attention ones follow the headers of kernels/attention_*.py):
  attention_prefill  causal, from an empty cache:  FLOPs 2*B*H*T^2*D;  bytes es*B*T*D*(2H + 4Hkv)
  attention_decode   one token against L cached:   FLOPs 4*B*H*L*D;    bytes es*2*B*Hkv*L*D (+ q, out)
  attention_vision   CLIP, non-causal:             FLOPs 4*N*H*T^2*D;  bytes es*4*N*T*H*D
  attention_train    causal forward + backward:    FLOPs 3.5 * 2*B*H*T^2*D (backward = 2.5x forward)
  rms_norm           residual add + norm:          bytes es*4*N*C (read x, residual; write normed, hidden)
  layer_norm                                       bytes es*2*N*C
  swiglu             silu(gate) * up:              bytes es*3*N*I
  quick_gelu                                       bytes es*2*n
  patch_embed        conv + cls + pos + LN:        FLOPs 2*N*L*K*C (K = 3*P*P); bytes pixels + pos + weight + out
  splice             gather + mlp2x projector:     FLOPs 2*R*(Cv*C + C*C); bytes text rows + out + features
                                                   + projector weights + the (R, C) intermediate twice
  linear_cross_entropy  lm_head + CE, fwd + bwd:   FLOPs 3 * 2*N*C*V
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_fast.bench.device import device_info, measure_ceilings, peak
from llava_fast.bench.report import figure, find_one, fmt, header_lines, md_table, new_document
from llava_fast.bench.timing import rotation_count, time_repeats

KERNELS = ("attention_prefill", "attention_decode", "attention_vision", "attention_train", "rms_norm",
           "layer_norm", "swiglu", "quick_gelu", "patch_embed", "splice", "linear_cross_entropy")

DEFAULTS = {
    "cpu": dict(preset="tiny", scale="small", batch_sizes=[1], repeats=3),
    "cuda": dict(preset="llava-1.5-7b", scale="full", batch_sizes=[1], repeats=50),
}


@dataclass
class Case:
    kernel: str
    shape: str
    make_inputs: object  # (generator) -> tuple of tensors (one rotation copy)
    ours: object  # (*inputs) -> output
    baseline: object
    baseline_name: str
    flops: float | None
    bytes: float | None
    bound: str  # "compute" or "memory"
    grad: bool = False  # times forward + backward


def _sizes(cfg, scale, batch, seq_len=None):
    """Shapes per kernel: 'full' = the model's real shapes, 'small' = what Triton's interpreter finishes;
    `seq_len` replaces the attention kernels' T (prefill, train) and L (decode) and the rows of the norms."""
    t, v = cfg.text, cfg.vision
    full = scale == "full"
    T = seq_len or (2048 if full else 64)
    return dict(
        B=batch, T=T, T_train=seq_len or (2048 if full else 32), L=seq_len or (2048 if full else 128),
        decode_B=max(batch, 8) if full else 2, rows=T * batch,
        ce_rows=2048 * batch if full else 16, N_img=8 if full else 1, R=cfg.num_image_tokens if full else 16,
        Tv=v.num_patches + 1 if full else 65,
        H=t.num_heads, Hkv=t.num_kv_heads, D=t.head_dim, C=t.hidden_size, I=t.intermediate_size, V=t.vocab_size,
        Hv=v.num_heads, Dv=v.head_dim, Cv=v.hidden_size, Iv=v.intermediate_size, S=v.image_size, P=v.patch_size,
    )


def _rand(g, *shape, dtype, device, scale=1.0, requires_grad=False):
    x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return x.requires_grad_(requires_grad)


def build_cases(cfg, scale, batch, device, dtype, names, seq_len=None):
    from llava_fast import ops
    from llava_fast.kernels import (
        activations,
        attention_backward,
        attention_prefill,
        cross_entropy,
        norms,
        patch_embed,
        splice,
    )

    s = _sizes(cfg, scale, batch, seq_len)
    es = torch.empty((), dtype=dtype).element_size()
    B, T, H, Hkv, D = s["B"], s["T"], s["H"], s["Hkv"], s["D"]
    gqa = H != Hkv
    kw = dict(dtype=dtype, device=device)
    cos, sin = ops.rope_tables(D, max(T, s["L"]) + 1, cfg.text.rope_theta, device=device)
    cases = {}

    def attention_inputs(g, b, t, cache_len):
        q, k, v = _rand(g, b, t, H, D, **kw), _rand(g, b, t, Hkv, D, **kw), _rand(g, b, t, Hkv, D, **kw)
        kc, vc = _rand(g, b, Hkv, cache_len, D, **kw), _rand(g, b, Hkv, cache_len, D, **kw)
        return q, k, v, kc, vc

    # prefill: T new tokens into an empty cache of T slots
    def prefill_inputs(g):
        q, k, v, kc, vc = attention_inputs(g, B, T, T)
        return (q, k, v, kc, vc, torch.zeros(B, dtype=torch.int32, device=device),
                torch.full((B,), T, dtype=torch.int32, device=device))

    def prefill_sdpa(q, k, v, kc, vc, start, lens):
        pos = torch.arange(T, device=device).expand(B, T)
        q, k = ops.apply_rope(q, cos, sin, pos), ops.apply_rope(k, cos, sin, pos)
        kc[:, :, :T] = k.transpose(1, 2)
        vc[:, :, :T] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, :T], vc[:, :, :T], is_causal=True,
                                             enable_gqa=gqa)
        return out.transpose(1, 2)

    cases["attention_prefill"] = Case(
        "attention_prefill", f"B={B} T={T} H={H} Hkv={Hkv} D={D}", prefill_inputs,
        lambda q, k, v, kc, vc, st, ln: attention_prefill.rotary_cached_attention(q, k, v, cos, sin, kc, vc, st, ln),
        prefill_sdpa, "RoPE + cache write + SDPA (causal)", 2 * B * H * T * T * D, es * B * T * D * (2 * H + 4 * Hkv),
        "compute")

    # decode: one token per row at position L-1 of an L-slot cache (attends to L keys)
    Bd, L = s["decode_B"], s["L"]

    def decode_inputs(g):
        q, k, v, kc, vc = attention_inputs(g, Bd, 1, L)
        return (q, k, v, kc, vc, torch.full((Bd,), L - 1, dtype=torch.int32, device=device),
                torch.ones(Bd, dtype=torch.int32, device=device))

    def decode_sdpa(q, k, v, kc, vc, start, lens):
        pos = torch.full((Bd, 1), L - 1, device=device)
        q, k = ops.apply_rope(q, cos, sin, pos), ops.apply_rope(k, cos, sin, pos)
        kc[:, :, L - 1] = k[:, 0]
        vc[:, :, L - 1] = v[:, 0]
        return F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, enable_gqa=gqa).transpose(1, 2)

    cases["attention_decode"] = Case(
        "attention_decode", f"B={Bd} L={L} H={H} Hkv={Hkv} D={D}", decode_inputs,
        lambda q, k, v, kc, vc, st, ln: attention_prefill.rotary_cached_attention(q, k, v, cos, sin, kc, vc, st, ln),
        decode_sdpa, "RoPE + cache write + SDPA", 4 * Bd * H * L * D, es * (2 * Bd * Hkv * L * D + 2 * Bd * H * D),
        "memory")

    N, Tv, Hv, Dv = s["N_img"], s["Tv"], s["Hv"], s["Dv"]
    cases["attention_vision"] = Case(
        "attention_vision", f"N={N} T={Tv} H={Hv} D={Dv}",
        lambda g: tuple(_rand(g, N, Tv, Hv, Dv, **kw) for _ in range(3)),
        attention_backward.vision_attention,
        lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2)).transpose(1, 2),
        "SDPA", 4 * N * Hv * Tv * Tv * Dv, es * 4 * N * Tv * Hv * Dv, "compute")

    Tt = s["T_train"]

    def train_inputs(g):
        q = _rand(g, B, Tt, H, D, requires_grad=True, **kw)
        k, v = (_rand(g, B, Tt, Hkv, D, requires_grad=True, **kw) for _ in range(2))
        return q, k, v, _rand(g, B, Tt, H, D, **kw)

    def train_ours(q, k, v, dout):
        out = attention_backward.rotary_causal_attention(q, k, v, cos, sin)
        return torch.autograd.grad(out, (q, k, v), dout)

    def train_sdpa(q, k, v, dout):
        pos = torch.arange(Tt, device=device).expand(B, Tt)
        qr, kr = ops.apply_rope(q, cos, sin, pos), ops.apply_rope(k, cos, sin, pos)
        out = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=gqa).transpose(1, 2)
        return torch.autograd.grad(out, (q, k, v), dout)

    cases["attention_train"] = Case(
        "attention_train", f"B={B} T={Tt} H={H} Hkv={Hkv} D={D}", train_inputs, train_ours, train_sdpa,
        "RoPE + SDPA (causal), forward + backward", 3.5 * 2 * B * H * Tt * Tt * D, None, "compute", grad=True)

    rows, C = s["rows"], s["C"]
    cases["rms_norm"] = Case(
        "rms_norm", f"N={rows} C={C}", lambda g: (_rand(g, rows, C, **kw), _rand(g, C, **kw), _rand(g, rows, C, **kw)),
        lambda x, w, r: norms.rms_norm(x, w, cfg.text.rms_norm_eps, r),
        lambda x, w, r: ops.TORCH_OPS["rms_norm"](x, w, cfg.text.rms_norm_eps, r),
        "eager add + RMSNorm", None, es * 4 * rows * C, "memory")
    vrows, Cv = N * Tv, s["Cv"]
    cases["layer_norm"] = Case(
        "layer_norm", f"N={vrows} C={Cv}",
        lambda g: (_rand(g, vrows, Cv, **kw), _rand(g, Cv, **kw), _rand(g, Cv, **kw)),
        lambda x, w, b: norms.layer_norm(x, w, b, cfg.vision.layer_norm_eps),
        lambda x, w, b: F.layer_norm(x, (Cv,), w, b, cfg.vision.layer_norm_eps),
        "F.layer_norm", None, es * 2 * vrows * Cv, "memory")
    inter = s["I"]
    cases["swiglu"] = Case(
        "swiglu", f"N={rows} I={inter}", lambda g: (_rand(g, rows, inter, **kw), _rand(g, rows, inter, **kw)),
        activations.swiglu, lambda a, b: F.silu(a) * b, "eager silu(gate) * up", None, es * 3 * rows * inter,
        "memory")
    Iv = s["Iv"]
    cases["quick_gelu"] = Case(
        "quick_gelu", f"N={vrows} I={Iv}", lambda g: (_rand(g, vrows, Iv, **kw),),
        activations.quick_gelu, lambda x: x * torch.sigmoid(1.702 * x), "eager x * sigmoid(1.702 x)", None,
        es * 2 * vrows * Iv, "memory")

    S, P = s["S"], s["P"]
    Lp, K = (S // P) ** 2, 3 * P * P
    eps = cfg.vision.layer_norm_eps
    cases["patch_embed"] = Case(
        "patch_embed", f"N={N} S={S} P={P} C={Cv}",
        lambda g: (_rand(g, N, 3, S, S, **kw), _rand(g, Cv, 3, P, P, scale=0.02, **kw), _rand(g, Cv, **kw),
                   _rand(g, Lp + 1, Cv, **kw), _rand(g, Cv, **kw), _rand(g, Cv, **kw)),
        lambda *a: patch_embed.patch_embed(*a, eps), lambda *a: ops.TORCH_OPS["patch_embed"](*a, eps),
        "conv2d + cat + add + LayerNorm", 2 * N * Lp * K * Cv,
        es * (N * 3 * S * S + (Lp + 1) * Cv + Cv * K + N * (Lp + 1) * Cv), "memory")

    R, V = s["R"], s["V"]
    Ts = max(T, R + 16)
    image_id = cfg.image_token_id

    def splice_inputs(g):
        ids = torch.randint(3, min(V, 32000), (1, Ts), generator=g, device=device)
        ids[0, 8: 8 + R] = image_id
        return (ids, _rand(g, V, C, scale=0.02, **kw), _rand(g, 1, R, Cv, **kw), _rand(g, C, Cv, scale=0.02, **kw),
                _rand(g, C, **kw), _rand(g, C, C, scale=0.02, **kw), _rand(g, C, **kw))

    cases["splice"] = Case(
        "splice", f"T={Ts} R={R} C={C} Cv={Cv}", splice_inputs,
        lambda ids, e, f, w1, b1, w2, b2: splice.splice_image_embeddings(ids, e, f, image_id, w1, b1, w2, b2),
        lambda ids, e, f, w1, b1, w2, b2: ops.TORCH_OPS["splice_image_embeddings"](ids, e, f, image_id, w1, b1, w2, b2),
        "embedding + F.linear projector + masked_scatter", 2 * R * (Cv * C + C * C),
        es * ((Ts - R) * C + Ts * C + R * Cv + C * Cv + C * C + 2 * R * C), "compute")

    ce_rows = s["ce_rows"]

    def ce_inputs(g):
        return (_rand(g, ce_rows, C, requires_grad=True, **kw), _rand(g, V, C, scale=0.02, requires_grad=True, **kw),
                torch.randint(0, V, (ce_rows,), generator=g, device=device))

    def ce(fn):
        def run(h, w, y):
            return torch.autograd.grad(fn(h, w, y), (h, w))
        return run

    cases["linear_cross_entropy"] = Case(
        "linear_cross_entropy", f"N={ce_rows} C={C} V={V}", ce_inputs, ce(cross_entropy.linear_cross_entropy),
        ce(ops.TORCH_OPS["linear_cross_entropy"]), "F.linear + F.cross_entropy, forward + backward",
        3 * 2 * ce_rows * C * V, None, "compute", grad=True)
    return [cases[n] for n in names]


def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _working_set(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def measure_case(case, device, repeats, warmup, seed=0):
    """(ours seconds, baseline seconds, max |ours - baseline| on the first output)."""
    g = torch.Generator(device=device).manual_seed(seed)
    first = case.make_inputs(g)
    copies = [first] + [case.make_inputs(g) for _ in range(rotation_count(_working_set(first), device) - 1)]
    context = torch.enable_grad if case.grad else torch.no_grad
    with context():
        a, b = _first_tensor(case.ours(*first)), _first_tensor(case.baseline(*first))
        diff = (a.float() - b.float()).abs().max().item()
        ours = time_repeats(case.ours, device=device, repeats=repeats, warmup=warmup, inputs=copies)
        base = time_repeats(case.baseline, device=device, repeats=repeats, warmup=warmup, inputs=copies)
    return ours, base, diff


def run(settings: dict, argv) -> dict:
    from llava_fast.bench.device import Telemetry, command_line
    from llava_fast.checkpoints.load import resolve_device_dtype
    from llava_fast.presets import preset_config

    device, dtype = resolve_device_dtype(settings["device"], settings["dtype"])
    if device.type == "cpu":
        # Triton's interpreter: must be set before llava_fast.kernels is imported (build_cases imports it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    doc = new_document("kernels", command_line(argv), settings)
    doc["device"] = device_info(device)
    if settings["model"]:
        from llava_fast.checkpoints.layouts import read_config

        cfg, _ = read_config(settings["model"], settings.get("vision_tower"))
        name = os.path.basename(os.path.normpath(settings["model"]))
        settings["preset"] = None
    else:
        cfg, name = preset_config(settings["preset"]), settings["preset"]
    settings.update(device=str(device), dtype=str(dtype).replace("torch.", ""), model_name=name,
                    triton_interpreted=device.type == "cpu")
    if device.type == "cpu":
        doc["notes"].append("Triton kernels ran in Triton's CPU interpreter: their times check the harness, "
                            "they are not performance")
    telemetry = Telemetry(device).start()
    diffs = {}
    try:
        doc["ceilings"] = measure_ceilings(device)
        for batch in settings["batch_sizes"]:
            for case in build_cases(cfg, settings["scale"], batch, device, dtype, settings["kernels"],
                                    settings.get("seq_len")):
                ours, base, diff = measure_case(case, device, settings["repeats"], settings["warmup"])
                diffs[f"{case.kernel} {case.shape}"] = diff
                doc["figures"] += case_figures(case, ours, base, dtype, doc["ceilings"], device)
    finally:
        telemetry.stop()
    doc["telemetry"] = telemetry.to_dict()
    doc["checks"]["max_abs_diff_vs_baseline"] = diffs
    return doc


def case_figures(case, ours, base, dtype, ceilings, device):
    figs = []
    labels = dict(kernel=case.kernel, shape=case.shape, dtype=str(dtype).replace("torch.", ""))
    compute_ok = (dtype in (torch.bfloat16, torch.float16)) == (device.type == "cuda")
    for impl, samples in (("triton", ours), ("torch", base)):
        lab = dict(labels, impl=impl)
        figs.append(figure("kernel_time", "ms", higher_is_better=False, samples=[1e3 * t for t in samples], **lab))
        tflops = bandwidth = None
        if case.flops:
            tflops = figure("kernel_tflops", "TFLOP/s", higher_is_better=True,
                            samples=[case.flops / t / 1e12 for t in samples], **lab)
            figs.append(tflops)
        if case.bytes:
            bandwidth = figure("kernel_bandwidth", "GB/s", higher_is_better=True,
                               samples=[case.bytes / t / 1e9 for t in samples], **lab)
            figs.append(bandwidth)
        if case.bound == "memory" and bandwidth:
            rate, (ceiling, source) = bandwidth["value"], peak(ceilings, "bandwidth")
        elif case.bound == "compute" and tflops and compute_ok:
            rate, (ceiling, source) = tflops["value"], peak(ceilings, "matmul")
        else:
            continue
        figs.append(figure("kernel_pct_of_peak", "%", higher_is_better=True, value=100 * rate / ceiling,
                           bound=case.bound, peak=source, **lab))
    figs.append(figure("kernel_speedup", "x", higher_is_better=True,
                       value=statistics.median(base) / statistics.median(ours),
                       impl="triton", baseline=case.baseline_name, **labels))
    return figs


def markdown(doc: dict) -> str:
    s = doc["settings"]
    figs = doc["figures"]
    lines = [f"## llava-fast bench kernels: {s['model_name']} shapes ({s['scale']}, {s['dtype']}) on "
             f"{doc['device']['name']}", ""] + [f"- {x}" for x in header_lines(doc)] + [""]
    rows = []
    for sp in [f for f in figs if f["name"] == "kernel_speedup"]:
        lab = {k: sp["labels"][k] for k in ("kernel", "shape", "dtype")}
        cells = {}
        for impl in ("triton", "torch"):
            t = find_one(figs, "kernel_time", impl=impl, **lab)
            tf = find_one(figs, "kernel_tflops", impl=impl, **lab)
            bw = find_one(figs, "kernel_bandwidth", impl=impl, **lab)
            pct = find_one(figs, "kernel_pct_of_peak", impl=impl, **lab)
            rate = " / ".join(x for x in (f"{fmt(tf['value'])} TFLOP/s" if tf else "",
                                          f"{fmt(bw['value'])} GB/s" if bw else "") if x)
            cells[impl] = (fmt(t["value"]) if t else "-", rate, fmt(pct["value"], "%") if pct else "-")
        rows.append([lab["kernel"], lab["shape"], sp["labels"]["baseline"], cells["torch"][0], cells["triton"][0],
                     fmt(sp["value"], "x"), cells["triton"][1], cells["triton"][2], cells["torch"][1],
                     cells["torch"][2]])
    lines.append(md_table(["kernel", "shape", "torch baseline", "torch ms", "triton ms", "speed-up", "triton rate",
                           "triton % peak", "torch rate", "torch % peak"], rows))
    worst = max(doc["checks"]["max_abs_diff_vs_baseline"].items(), key=lambda kv: kv[1], default=None)
    if worst:
        lines += ["", f"largest |triton - baseline| on the first output: {worst[1]:.2e} ({worst[0]})"]
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)

