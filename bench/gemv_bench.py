"""`llava-fast bench gemv`: the native CPU GEMV (csrc/gemv.cpp) on one decode step's linear layers.

In: SmolLM2-135M-Instruct's weights when `bench real` has cached them (~/.cache/llava-fast/smollm2/llava;
nothing is fetched here), else random weights of the same shapes: per decoder layer fused q/k/v (960 x 576),
o (576 x 576), fused gate/up (3072 x 576), down (576 x 1536), times 30, plus lm_head (49152 x 576): the 121
GEMVs of one decode step. Each format (float32, bfloat16, int8, int4 group 32) is packed as `load(...,
quantize=...)` packs it.

Out: per format, the time of the whole set of GEMVs at M rows (default 1) called back to back through
`llava_fast._C.gemv` (the binding the native decode step's calls compare with: no Python wrapper), in GB/s of
the packed weight bytes and as % of the read bandwidth measured in the same rounds (torch's `x.sum()` over
256 MiB of float32 at the same thread count: a pure read stream). Beside it, torch's `F.linear` on the same
weights in the compute dtype (float32 for int8/int4: the dequantized weight), its rate counted over the same
packed bytes ("effective" GB/s, like for like). Rounds interleave every implementation and the read probe;
figures are medians, speedups paired per-round ratios. `--isa avx2,scalar` runs those kernel tables
(csrc/isa/; `llava_fast._C.cpu_isa_tables()` lists them) side by side in the same rounds, each as its own
row: how the AVX2 table a CPU without AVX-512 runs compares on this machine's memory system.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from llava_fast.bench.report import figure, find_one, fmt, header_lines, md_table

FORMATS = ("float32", "bfloat16", "int8", "int4-32")
SMOLLM2_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # (N, K)
READ_PROBE_BYTES = 256 * 2**20


def float_weights():
    """([(N, K) float32 weights], source): the cached SmolLM2 checkpoint's GEMV weights, else random ones."""
    from llava_fast.bench import real_model

    path = os.path.join(real_model.cache_dir(), "llava")
    if os.path.isfile(os.path.join(path, "config.json")):
        import llava_fast
        from llava_fast.cpu.gemv import GemvLinear

        net = llava_fast.load(path, device="cpu", dtype="float32").net
        weights = [m.weight.detach() for m in net.modules() if isinstance(m, GemvLinear)]
        return weights, "SmolLM2-135M-Instruct weights"
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, k, generator=g) * 0.05 for n, k in SMOLLM2_SHAPES], "random weights, SmolLM2-135M shapes"


def pack(weights, fmt_name):
    """The GemvLinear layers of one format, and each one's torch F.linear weight (compute dtype)."""
    from llava_fast.cpu.gemv import GemvLinear
    from llava_fast.cpu.quantize import quantize_weight

    if fmt_name == "float32":
        layers = [GemvLinear.from_float(w) for w in weights]
    elif fmt_name == "bfloat16":
        layers = [GemvLinear.from_float(w.bfloat16()) for w in weights]
    elif fmt_name == "int8":
        layers = [quantize_weight(w, 8) for w in weights]
    else:
        layers = [quantize_weight(w, 4, int(fmt_name.split("-")[1])) for w in weights]
    return layers, [layer.dequantized() for layer in layers]


def _native_calls(layers, xs, ys, threads):
    from llava_fast.cpu.gemv import _ACT_DTYPES

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    return [(x.data_ptr(), _ACT_DTYPES[x.dtype], x.shape[0], x.shape[1], ptr(layer.weight), layer.format,
             layer.out_features, layer.in_features, layer.group or 0, ptr(layer.scale), ptr(layer.minimum),
             y.data_ptr(), layer.out_features, threads)
            for layer, x, y in zip(layers, xs, ys)]


def _time(fn):
    # Idle first: torch's OpenMP workers spin for milliseconds after a parallel region (libgomp's default spin
    # count) and would take the GEMV pool's cores (bfloat16 set: 27.7 ms right after torch's F.linear, 13.7 ms
    # alone, same run).
    time.sleep(0.05)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(settings, argv):
    from llava_fast.cpu import gemv as G

    if not G.NATIVE:
        from llava_fast.errors import InputError

        raise InputError("bench gemv needs the native extension llava_fast._C, which was not built "
                         "(reinstall with a C++ toolchain and cmake)")
    from llava_fast.bench import real_bench

    return real_bench.run(settings, argv, "gemv", _measure)


def _measure(doc, settings):
    from llava_fast import _C
    from llava_fast.cpu import gemv as G

    threads, M, rounds = settings["threads"], settings["rows"], settings["repeats"]
    weights, source = float_weights()
    forced = bool(settings.get("isa"))  # --isa: tables side by side, each an impl "llava-fast[<table>]"
    isas = settings["isa"] if forced else [_C.cpu_isa_variant()]
    for isa in isas:  # a table this CPU cannot run: the error names the missing feature
        _C.use_cpu_isa(isa)
    _C.use_cpu_isa("best")
    settings.update(source=source, isa=isas, isa_forced=forced, layers=len(weights))

    def _impl(isa):
        return impl_name(isa, forced)

    probe = torch.rand(READ_PROBE_BYTES // 4)
    shape = f"{len(weights)} GEMVs, M={M}"
    gen = torch.Generator().manual_seed(1)
    for name in settings["formats"]:  # one format's weights in memory at a time
        layers, dense = pack(weights, name)
        dtype = layers[0].out_dtype
        xs = [torch.randn(M, layer.in_features, generator=gen).to(dtype) for layer in layers]
        ys = [torch.empty(M, layer.out_features, dtype=dtype) for layer in layers]
        calls, gemv = _native_calls(layers, xs, ys, threads), _C.gemv
        nbytes = sum(layer.nbytes for layer in layers)

        # The closures below run only in this format's rounds; their defaults bind this format's data.
        def ours(isa, calls=calls, gemv=gemv):
            def run_set():
                if forced:
                    _C.use_cpu_isa(isa)
                for c in calls:
                    gemv(*c)
            return run_set

        def theirs(xs=xs, dense=dense):
            for x, w in zip(xs, dense):
                F.linear(x, w)

        impls = {_impl(isa): ours(isa) for isa in isas}
        impls["torch"] = theirs
        for fn in impls.values():  # warm-up: the pool's threads, torch's kernels, pages touched
            fn()
        times, read_bw = {k: [] for k in impls}, []
        for r in range(rounds):
            for k in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
                times[k].append(_time(impls[k]))
            read_bw.append(READ_PROBE_BYTES / _time(probe.sum) / 1e9)
        labels = dict(kernel="gemv_set", shape=shape, dtype=name)
        f_read = figure("kernel_bandwidth", "GB/s", higher_is_better=True, samples=read_bw, kernel="read",
                        impl="torch.sum", shape="256 MiB", dtype=name)  # the probes of this format's rounds
        doc["figures"].append(f_read)
        for impl, ts in times.items():
            f_time = figure("kernel_time", "ms", higher_is_better=False, samples=[1e3 * t for t in ts],
                            impl=impl, **labels)
            gbps = nbytes / (f_time["value"] / 1e3) / 1e9
            doc["figures"] += [f_time, figure("kernel_bandwidth", "GB/s", higher_is_better=True, value=gbps,
                                              impl=impl, **labels),
                               figure("kernel_pct_of_peak", "%", higher_is_better=True,
                                      value=100 * gbps / f_read["value"], bound="memory", peak="measured read",
                                      impl=impl, **labels)]
        for isa in isas:
            doc["figures"].append(figure("kernel_speedup", "x", higher_is_better=True, impl=_impl(isa),
                                         baseline="torch",
                                         samples=[b / a for a, b in zip(times[_impl(isa)], times["torch"])],
                                         **labels))
        _C.use_cpu_isa("best")
        doc["checks"].setdefault("weight_bytes", {})[name] = nbytes
        doc["checks"].setdefault("max_abs_error_vs_reference", {})[name] = max(
            float((y.float() - G.reference(x, layer)).abs().max()) for layer, x, y in zip(layers[:4], xs, ys))
        # Free this format before packing the next: theirs (also in impls and fn) holds dense in its defaults.
        layers = dense = calls = impls = theirs = fn = None
    doc["notes"].append(f"weights: {source}; kernel tables: {', '.join(isas)}; {threads} thread(s); % of read bw: "
                        "over the median of x.sum() over 256 MiB float32, probed once per round of the same format; "
                        "torch's GB/s counts the packed bytes, not the float weight it reads")


def impl_name(isa, forced):
    """The impl label of llava-fast's GEMV: "llava-fast" (the table in use), or per table with --isa."""
    return f"llava-fast[{isa}]" if forced else "llava-fast"


def markdown(doc) -> str:
    figs = doc["figures"]
    isas, forced = doc["settings"]["isa"], doc["settings"].get("isa_forced", False)
    isas = [isas] if isinstance(isas, str) else isas  # documents written before --isa: one table's name
    rows = []
    for name in doc["settings"]["formats"]:
        def v(fig, impl, name=name):
            f = find_one(figs, fig, kernel="gemv_set", dtype=name, impl=impl)
            return f["value"] if f else None
        read = find_one(figs, "kernel_bandwidth", kernel="read", dtype=name)
        for isa in isas:
            impl = impl_name(isa, forced)
            speed = find_one(figs, "kernel_speedup", kernel="gemv_set", dtype=name, impl=impl)
            best = find_one(figs, "kernel_time", kernel="gemv_set", dtype=name, impl=impl)["stats"]["min"]
            rows.append([name, isa, fmt(doc["checks"]["weight_bytes"][name] / 1e6), fmt(read["value"]),
                         fmt(v("kernel_time", impl)),
                         fmt(v("kernel_bandwidth", impl)), fmt(v("kernel_pct_of_peak", impl)) + " %",
                         fmt(doc["checks"]["weight_bytes"][name] / best / 1e6),
                         fmt(v("kernel_time", "torch")), fmt(v("kernel_bandwidth", "torch")),
                         f"{speed['value']:.2f}x" if speed else ""])
    table = md_table(["format", "kernels", "MB read", "read bw GB/s", "llava-fast ms", "GB/s", "% of read bw",
                      "best round GB/s", "torch F.linear ms",
                      "torch GB/s (effective)", "speedup"], rows)
    return "\n".join(header_lines(doc) + ["", table] + [f"- {n}" for n in doc["notes"]])
