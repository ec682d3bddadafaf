"""`llava-fast bench real`: SmolLM2-135M-Instruct (real weights) on the CPU beside llama.cpp and transformers.

Speed (labels engine, batch=1, context): one process, the same prompt ids for every engine (the
chat-templated request below, tokenized once by llava-fast), greedy, `new_tokens` tokens with EOS ignored,
`threads` threads everywhere. Engines: `llava-fast/<format>` for each of float32, bfloat16, int8wo,
int4wo-32 (the decoder at the token level: Decoder.prefill + `new_tokens - 1` Decoder.step, each token read
back to the host as a streaming caller does); `llama.cpp/<F32|F16|Q8_0|Q4_0|Q4_1>` (llama-cpp-python's
Llama.generate with temp 0 on the GGUFs of real_model.py); `transformers/<dtype>` (generate() with a
streamer stamping each token). `warmup` untimed runs each, then `repeats` rounds, every engine once per
round in a rotating order; medians. Figures: time_to_first_token, prefill_throughput, decode_throughput,
decode_bandwidth (weight bytes one decode step reads, as stored, x steps/s; llama.cpp's: its GGUF's tensor
bytes less the token embedding when it is not also the output) and decode_bandwidth_pct of the measured
read bandwidth, and decode_speedup of each llava-fast format over its llama.cpp counterpart (paired
per-round ratios).

Quality (labels engine[, baseline]): perplexity of each llava-fast format on the first `quality_tokens`
tokens of bench/data/gpl-3.0.txt (the GPL v3 text, see bench/data/README.md), and top1_agreement: the share
of those positions where the format's greedy next token equals float32's.
llama.cpp and transformers are optional: a missing one is skipped with a note.

Peers run in child processes (peer_process.py): a peer that dies is a row saying "crashed (signal N)"; the
other engines go on. `llama_cpp_builds` (`--llama-cpp-build
avx2=DIR`) adds llama.cpp builds installed elsewhere (e.g. one built for AVX2 only), each its own engine
`llama.cpp[label]/<type>`, paired with `llava-fast[label]`.

`shape` (`--shape llava-1.5-7b --layers 8`): random weights at that model's language-model shapes instead of
SmolLM2 (bench/shape_model.py): one F16 GGUF read by llava-fast (bfloat16, and quantized by its own
quantizer for int8wo / int4wo-32), by transformers (bfloat16) and by llama.cpp (F16, and its own Q8_0 / Q4_0
of that file). No quality figures there (random weights).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

import torch

from llava_fast.bench.device import Telemetry, device_info, measure_ceilings, measure_read_bandwidth
from llava_fast.bench.peer_process import ChildEngine, PeerCrashed, PeerFailed
from llava_fast.bench.report import figure, find_one, fmt, header_lines, md_table, new_document
from llava_fast.errors import InputError

FORMATS = ("float32", "bfloat16", "int8wo", "int4wo-32")
LLAMA_CPP_FOR = {"float32": "F32", "bfloat16": "F16", "int8wo": "Q8_0", "int4wo-32": "Q4_0"}
EXTRA_LLAMA_CPP = ("Q4_1",)  # the original download: llama.cpp's int4 with mins, as int4wo-32's math
TEXT = os.path.join(os.path.dirname(__file__), "data", "gpl-3.0.txt")
PROMPT = "Here is the start of a licence:\n\n{passage}\n\nWhat is this licence, and what does it allow?"
PASSAGE_TOKENS = 96
IDLE_BETWEEN_RUNS_S = 0.5


def load_text_ids(tokenizer, n=None):
    with open(TEXT, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    if n is not None and len(ids) < n:
        raise InputError(f"{TEXT} has {len(ids)} tokens, fewer than the {n} asked for")
    return ids if n is None else ids[:n]


def prompt_ids(model):
    passage = model.tokenizer.decode(load_text_ids(model.tokenizer, PASSAGE_TOKENS + 1)[1:])
    text = ("<|im_start|>user\n" + PROMPT.format(passage=passage) + "<|im_end|>\n<|im_start|>assistant\n")
    return model.tokenizer.encode(text)


SHAPE_FORMATS = ("bfloat16", "int8wo", "int4wo-32")  # the default at --shape; float32 only when asked for (below)


def shape_float32_copies(settings) -> int:
    """How many float32 copies of the weights a --shape run holds at once when float32 is among its formats: ours,
    llama.cpp's F32 file (one page cache for every build) and transformers' float32."""
    return 1 + bool(settings["llama_cpp"]) + bool(settings["transformers"])


def load_llava(fmt_name, threads, shape=None, layers=None):
    import llava_fast
    from llava_fast.bench.real_model import llava_dir

    dtype = "bfloat16" if fmt_name == "bfloat16" else "float32"
    quantize = None if fmt_name in ("float32", "bfloat16") else fmt_name
    if shape is not None:
        from llava_fast.bench import shape_model

        return llava_fast.load(shape_model.gguf(shape, layers, "F16"), device="cpu", dtype=dtype, quantize=quantize)
    return llava_fast.load(llava_dir(), device="cpu", dtype=dtype, quantize=quantize)


def peer_gguf(settings, ggml_type, import_path=None):
    """The GGUF llama.cpp reads for `ggml_type`: SmolLM2's, or the shape's (import_path: see shape_model)."""
    if settings.get("shape"):
        from llava_fast.bench import shape_model

        return shape_model.gguf(settings["shape"], settings["layers"], ggml_type, import_path)
    from llava_fast.bench.real_model import gguf

    return gguf(ggml_type, import_path)


# ------------------------------------------------------------------------------------------------------
# Engines: each a callable ids -> (ttft_s, decode_s, tokens)
# ------------------------------------------------------------------------------------------------------


def host_busy_seconds():
    """CPU seconds the whole host has spent busy (all cores, every process; /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def llava_engine(model, new_tokens, isa=None):
    """isa: the CPU kernel table to switch to before each run (`bench real --isa`), or None: the one in use.
    run.prefill_cores: per run, (cores this process used, cores other processes used) over its prefill: a
    prefill slowed by other work on the host shows here rather than as a slower kernel (the avx2 float32
    prefill in an 18-engine rotation once read 0.63x llama.cpp's and 1.29x in the next runs, kernels unchanged)."""
    from llava_fast.generate import Decoder

    def run(ids):
        if isa is not None:
            from llava_fast import _C

            _C.use_cpu_isa(isa)
        busy0, cpu0 = host_busy_seconds(), time.process_time()
        t0 = time.perf_counter()
        decoder = Decoder(model.net, 1, len(ids) + new_tokens)
        tok = decoder.prefill([ids]).argmax(-1)
        tokens = [int(tok)]
        t1 = time.perf_counter()
        if busy0 is not None:
            ours = time.process_time() - cpu0
            run.prefill_cores.append((ours / (t1 - t0), max(0.0, host_busy_seconds() - busy0 - ours) / (t1 - t0)))
        for _ in range(new_tokens - 1):
            tok = decoder.step(tok).argmax(-1)
            tokens.append(int(tok))
        return t1 - t0, time.perf_counter() - t1, tokens
    run.prefill_cores = []
    return run


def llama_cpp_weight_bytes(path):
    """Bytes of the GGUF's tensors a decode step reads: all but the token embedding (one row is read), which
    is counted once more as the output matrix when the model ties them (no output.weight)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(tensors.values())
    return total if "output.weight" not in tensors else total - tensors.get("token_embd.weight", 0)


def transformers_engine(dtype, new_tokens, threads, source=None):
    """source: None (SmolLM2's lm_dir) or a GGUF path: LlamaForCausalLM built from its tensors with llava-fast's
    reader (a few MiB of rows at a time into `dtype`; transformers' own gguf_file= loading holds every tensor in
    float32 first, 6.4 GB at 8 layers of 7B shapes)."""
    import transformers
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    if source is None:
        from llava_fast.bench.real_model import lm_dir

        lm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir(), dtype=getattr(torch, dtype)).eval()
    else:
        lm = _transformers_from_gguf(transformers, source, getattr(torch, dtype))

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(ids):
        stamps = Stamps()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        out = lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, streamer=stamps, pad_token_id=0)
        first = stamps.times[1]  # times[0]: the prompt, handed to the streamer before prefill's token
        return first - t0, stamps.times[-1] - first, out[0, len(ids):].tolist()
    from llava_fast.bench.emulate import ran_on

    return run, transformers_weight_bytes(lm), ran_on()


def transformers_weight_bytes(lm):
    """Bytes of weights one transformers decode step reads: all parameters but the embedding, plus lm_head."""
    return sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n) + (
        0 if lm.lm_head.weight is not lm.model.embed_tokens.weight else
        lm.lm_head.weight.numel() * lm.lm_head.weight.element_size())


def _transformers_from_gguf(transformers, path, dtype):
    from llava_fast.checkpoints.gguf import GGUFFile, _text_name, text_config, unpermute_rotary_rows

    f = GGUFFile(path)
    t = text_config(f)
    cfg = transformers.LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                   intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                                   num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                                   rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                                   max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False)
    with torch.device("meta"):
        lm = transformers.LlamaForCausalLM(cfg)
    state = {}
    for name in f.tensors:
        ours = _text_name(name)  # language_model.layers.N.self_attn.q_proj.weight, lm_head.weight, ...
        w = f.tensor(name, dtype)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_rotary_rows(w, t.num_heads if "attn_q" in name else t.num_kv_heads)
        state[ours.replace("language_model.", "model.")] = w
    lm.load_state_dict(state, assign=True, strict=True)
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=cfg)  # its inv_freq buffer, built off the meta device
    return lm.to(dtype).eval()


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


def quality(doc, settings):
    """Perplexity and top-1 agreement of each llava-fast format on the fixed text."""
    reference_top1 = None
    n = settings["quality_tokens"]
    for name in settings["formats"]:
        model = load_llava(name, settings["threads"])
        ids = load_text_ids(model.tokenizer, n)
        with torch.inference_mode():
            logits = model.logits(torch.tensor([ids]))[0, :-1]  # (n - 1, V) float32
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
        top1 = logits.argmax(-1)
        engine = f"llava-fast/{name}"
        doc["figures"].append(figure("perplexity", "1", higher_is_better=False, value=float(nll.exp()), engine=engine,
                                     tokens=n))
        if reference_top1 is None:
            reference_top1, reference_name = top1, engine
        else:
            agree = float((top1 == reference_top1).float().mean()) * 100
            doc["figures"].append(figure("top1_agreement", "%", higher_is_better=True, value=agree, engine=engine,
                                         baseline=reference_name, tokens=n))
        del model, logits


def run(settings, argv, kind="real", measure=None):
    """One CPU result document of `kind`: device, ceilings, telemetry around `measure(doc, settings)` (default:
    this module's engines and quality; bench/gemv_bench.py passes its own)."""
    torch.set_num_threads(settings["threads"])
    doc = new_document(kind, "llava-fast bench " + " ".join(argv), settings)
    doc["device"] = device_info(torch.device("cpu"))
    from llava_fast.bench.emulate import ran_on

    emulated = f" (--emulate-cpu {settings['emulated_cpu']})" if settings.get("emulated_cpu") else ""
    doc["notes"].append(f"torch (llava-fast's torch ops, F.linear) runs on {ran_on()}{emulated}")
    doc["ceilings"] = measure_ceilings(torch.device("cpu"))
    doc["ceilings"]["read_bandwidth"] = measure_read_bandwidth(torch.device("cpu"),
                                                               doc["device"]["last_level_cache_bytes"])
    telemetry = Telemetry(torch.device("cpu")).start()
    try:
        (measure or _measure)(doc, settings)
    finally:
        telemetry.stop()
    doc["telemetry"] = telemetry.to_dict()
    return doc


def _measure(doc, settings):
    from llava_fast.bench.generate_bench import roofline_applies
    from llava_fast.cpu.quantize import weight_bytes_per_token

    threads = settings["threads"]
    bandwidth = doc["ceilings"]["read_bandwidth"]["measured"]
    cache_bytes = doc["device"]["last_level_cache_bytes"]
    new_tokens = settings["new_tokens"]
    shape = settings.get("shape")

    engines, weight_bytes, pairs, outputs, crashed = {}, {}, {}, {}, {}
    ids = None
    isas = settings.get("isa") or [None]  # --isa: CPU kernel tables side by side (else the one in use)
    ours = {}  # engine name -> format
    for name in settings["formats"]:
        model = load_llava(name, threads, shape, settings.get("layers"))
        ids = ids or prompt_ids(model)
        for isa in isas:
            engine = f"llava-fast/{name}" if isa is None else f"llava-fast[{isa}]/{name}"
            engines[engine] = llava_engine(model, new_tokens, isa)
            weight_bytes[engine] = weight_bytes_per_token(model.net)
            ours[engine] = name
            if isa is not None:
                from llava_fast import _C

                _C.use_cpu_isa(isa)  # as the engine does before each run: the plan is made for that table
            doc["notes"].append(f"{engine} runs: {model.cpu_plan}")
    settings["context"] = len(ids)

    def start_peer(engine, factory, args, import_path=None):
        try:
            engines[engine] = ChildEngine(factory, args, threads, import_path)
            if engines[engine].ran_on:
                doc["notes"].append(f"{engine} runs on {engines[engine].ran_on}")
            return engines[engine]
        except PeerCrashed as e:
            crashed[engine] = f"{e} while loading"
        except PeerFailed as e:
            doc["notes"].append(f"{engine} skipped: {e}")

    builds = settings.get("llama_cpp_builds") or {None: None}  # label -> import path (None: the importable one)
    if settings["llama_cpp"] and None in builds and importlib.util.find_spec("llama_cpp") is None:
        doc["notes"].append("llama.cpp skipped: llama_cpp is not importable; pip install llama-cpp-python")
    elif settings["llama_cpp"]:
        types = [LLAMA_CPP_FOR[n] for n in settings["formats"]] + ([] if shape else list(EXTRA_LLAMA_CPP))
        for ggml_type in types:
            path = peer_gguf(settings, ggml_type, next(iter(builds.values())))
            for label, import_path in builds.items():
                engine = f"llama.cpp/{ggml_type}" if label is None else f"llama.cpp[{label}]/{ggml_type}"
                start_peer(engine, ":llama_cpp_engine", (path, threads, new_tokens, len(ids)), import_path)
                weight_bytes[engine] = llama_cpp_weight_bytes(path)
        for engine, name in ours.items():  # llava-fast[avx2] against llama.cpp[avx2] where that build is given
            isa = engine[engine.index("[") + 1:engine.index("]")] if "[" in engine else None
            label = isa if isa in builds else next(iter(builds))
            theirs = ("llama.cpp" if label is None else f"llama.cpp[{label}]") + f"/{LLAMA_CPP_FOR[name]}"
            if theirs in engines or theirs in crashed:
                pairs[engine] = [theirs]
    if settings["transformers"]:
        shape_dtypes = ("bfloat16", "float32") if "float32" in settings["formats"] else ("bfloat16",)
        for dtype in shape_dtypes if shape else ("float32", "bfloat16"):
            engine = f"transformers/{dtype}"
            source = peer_gguf(settings, "F16") if shape else None
            peer = start_peer(engine, f"{__name__}:transformers_engine", (dtype, new_tokens, threads, source))
            if peer is not None:
                weight_bytes[engine] = peer.weight_bytes
        for engine, name in ours.items():  # transformers has no int8/int4 CPU path: those face its float32
            pairs.setdefault(engine, []).append(  # (at --shape its bfloat16: half the memory of 7B-wide weights)
                "transformers/bfloat16" if name == "bfloat16" or shape and name != "float32" else
                "transformers/float32")

    names = [n for n in engines]
    samples = {n: {"ttft": [], "decode": []} for n in names}

    def run_engine(n):
        try:
            return engines[n](ids)
        except PeerCrashed as e:
            crashed[n] = str(e)
            engines.pop(n).close()
            names.remove(n)
            return None

    try:
        for n in list(names):
            for _ in range(settings["warmup"]):
                if (result := run_engine(n)) is None:
                    break
                outputs[n] = result[2]
        for r in range(settings["repeats"]):
            order = names[r % len(names):] + names[: r % len(names)] if names else []
            for n in order:
                # An idle gap first: the engine before may leave worker threads spinning for a while after its
                # last token (ggml's threadpool polls, OpenMP spins), which took a core from the next engine's
                # prefill (llava-fast float32 prefill 274-382 tok/s in rotation against ~430 alone, 2 cores).
                time.sleep(IDLE_BETWEEN_RUNS_S)
                if n not in engines or (result := run_engine(n)) is None:
                    continue
                ttft, decode_s, tokens = result
                outputs[n] = tokens
                samples[n]["ttft"].append(ttft)
                samples[n]["decode"].append(decode_s)
    finally:
        for engine in engines.values():
            if isinstance(engine, ChildEngine):
                engine.close()
    for n in names:
        cores = getattr(engines.get(n), "prefill_cores", None)
        if cores:
            doc["notes"].append(f"{n} prefill: its process ran on {statistics.median(c[0] for c in cores):.2f} cores, "
                                f"other processes on {statistics.median(c[1] for c in cores):.2f} (medians of "
                                f"{len(cores)} runs; the host has {os.cpu_count()})")
    for n in list(names):
        if len(samples[n]["decode"]) < settings["repeats"]:  # crashed after some rounds: its medians would mislead
            names.remove(n)
    if crashed:
        doc["checks"]["crashed_engines"] = crashed
        doc["notes"] += [f"{n}: {why}" for n, why in crashed.items()]
    labels = dict(batch=1, context=len(ids))
    for n in names:
        s = samples[n]
        decode = [(new_tokens - 1) / t for t in s["decode"]]
        f_dec = figure("decode_throughput", "tokens/s", higher_is_better=True, samples=decode, engine=n, **labels)
        why_not = roofline_applies(weight_bytes[n], cache_bytes)
        if why_not:
            doc["notes"].append(f"decode_bandwidth_pct of {n} left out: {why_not}")
        doc["figures"] += [
            figure("time_to_first_token", "ms", higher_is_better=False, samples=[1e3 * t for t in s["ttft"]],
                   engine=n, **labels),
            figure("prefill_throughput", "tokens/s", higher_is_better=True, samples=[len(ids) / t for t in s["ttft"]],
                   engine=n, **labels),
            f_dec,
            figure("decode_bandwidth", "GB/s", higher_is_better=True, value=weight_bytes[n] * f_dec["value"] / 1e9,
                   engine=n, **labels),
        ] + ([] if why_not else [
            figure("decode_bandwidth_pct", "%", higher_is_better=True,
                   value=100 * weight_bytes[n] * f_dec["value"] / 1e9 / bandwidth, engine=n, peak="measured", **labels),
        ])
    for mine, theirs in ((m, t) for m, ts in pairs.items() for t in ts):
        if mine not in names or theirs not in names:
            continue
        ratios = [b / a for a, b in zip(samples[mine]["decode"], samples[theirs]["decode"])]
        doc["figures"].append(figure("decode_speedup", "x", higher_is_better=True, samples=ratios, engine=mine,
                                     baseline=theirs, **labels))
        ttft = [b / a for a, b in zip(samples[mine]["ttft"], samples[theirs]["ttft"])]
        doc["figures"].append(figure("ttft_speedup", "x", higher_is_better=True, samples=ttft, engine=mine,
                                     baseline=theirs, **labels))
    ref = next((outputs[e] for e, name in ours.items() if name == "float32"), None)
    if ref is not None:
        doc["checks"]["greedy_tokens_equal_to_llava_fast_float32"] = {
            n: sum(a == b for a, b in zip(ref, toks)) / len(ref) for n, toks in outputs.items()}
    doc["checks"]["weight_bytes_per_token"] = weight_bytes
    if settings["quality_tokens"]:
        quality(doc, settings)
    doc["notes"].append(f"decode_bandwidth_pct: weight bytes per token over the measured read bandwidth "
                        f"{bandwidth:.1f} GB/s ({doc['ceilings']['read_bandwidth']['method']})")


def markdown(doc) -> str:
    figs = doc["figures"]
    rows = []
    engines = list(dict.fromkeys(f["labels"]["engine"] for f in figs if f["name"] == "decode_throughput"))
    for e in engines:
        def v(name, e=e, **kw):
            f = find_one(figs, name, engine=e, **kw)
            return f["value"] if f else None
        dec = find_one(figs, "decode_throughput", engine=e)

        def against(peer, e=e):
            d = [f for f in figs if f["name"] == "decode_speedup" and f["labels"]["engine"] == e
                 and f["labels"]["baseline"].startswith(peer)]
            if not d:
                return ""
            p = find_one(figs, "ttft_speedup", engine=e, baseline=d[0]["labels"]["baseline"])
            return f"{d[0]['value']:.2f}x / {p['value']:.2f}x vs {d[0]['labels']['baseline']}"
        rows.append([e, fmt(dec["value"]) + f" ({fmt(dec['stats']['q1'])}-{fmt(dec['stats']['q3'])})",
                     fmt(v("prefill_throughput")),
                     fmt(v("decode_bandwidth_pct")) + " %" if v("decode_bandwidth_pct") else "- (in cache)",
                     against("llama.cpp"), against("transformers"),
                     fmt(v("perplexity")) if v("perplexity") else "", fmt(v("top1_agreement")) + " %"
                     if v("top1_agreement") else ""])
    for e, why in doc["checks"].get("crashed_engines", {}).items():
        rows.append([e, why, "", "", "", "", "", ""])
    table = md_table(["engine", "decode tok/s (IQR)", "prefill tok/s", "% of read roofline",
                      "decode / prefill vs llama.cpp", "decode / prefill vs transformers", "perplexity",
                      "top-1 agreement"], rows)
    return "\n".join(header_lines(doc) + ["", table] + [f"- {n}" for n in doc["notes"]])
