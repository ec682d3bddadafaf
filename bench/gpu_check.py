"""The GPU check: tests, generate, kernels and train on one H200 in 8 minutes.

    python bench/gpu_check.py --out DIR              # on the GPU: ~8 min; a short table printed last
    python bench/gpu_check.py --out DIR --dry-run    # the same plumbing on the CPU, tiny preset, < 3 min (CI)

It needs only the repository (the tests' data is in tests/data) and no package registry: on a machine with
torch 2.11, triton 3.6, transformers 5, pybind11 and ninja installed,
    pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 python bench/gpu_check.py --out DIR
within 600 s (the budget below is 480 s; the rest is the install, imports and slack). The install builds the
native extension, or falls back to the Python path.

Parts, each a subprocess with its own time budget (seconds on the GPU / in the dry run); one that does not fit
in what is left of --budget-s is skipped with a note, one that overruns is stopped and marked so:
  tests     150 / 40   the GPU-marked tests and the kernel tests on CUDA (bf16, fp16), the whole model's
                       Triton-vs-torch parity (tests/test_model_triton.py, tests/test_parity.py with both
                       backends), CUDA-graph decode == eager (tests/test_gpu.py), the training step on CUDA;
                       8 pytest-xdist workers where installed (the image has it), so Triton compiles in parallel
  generate  130 / 50   `llava-fast bench generate`, llava-1.5-7b bf16, batch 1 and 8, one image + 32 text
                       tokens, 64 new tokens, llava-fast (triton, torch) and transformers' generate() on the
                       same weights
  kernels    80 / 40   `llava-fast bench kernels`: attention prefill and decode at T = L = 4096 (head dim
                       128), patch embed, splice, RMSNorm, LayerNorm, linear + cross-entropy
  train     100 / 40   `llava-fast bench train`: a stage-1 step and a LoRA (r 128) stage-2 step of the whole
                       7B, batch 8 x 2048 tokens, gradient checkpointing, the Triton backend
DIR receives at most 8 files: gpu_check.log (every part's output),
gpu_check.json (this summary: parts, test counts, the targets and kernel rates; its own small layout,
`llava-fast-gpu-check/1`), generate.json, kernels.json, train.json (the bench schema, bench/SCHEMA.md) and
tests.xml (JUnit). The targets and the bytes and FLOPs behind each are in bench/NOTES.md.
Exit status: 0 when every part that ran passed (a part over its budget is a note, not a failure), 1 when a
test failed or a part crashed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The targets of bench/NOTES.md: (key, what, unit, goal, "min" or "max").
TARGETS = [
    ("decode", "decode, batch 1, llava-fast/triton", "tokens/s", 300.0, "min"),
    ("ttft", "time to first token, 1 image + 32 text tokens", "ms", 15.0, "max"),
    ("prefill_attention", "prefill attention, causal, D 128", "TFLOP/s", 500.0, "min"),
    ("decode_attention", "decode attention, % of measured bandwidth", "%", 80.0, "min"),
    ("mfu_stage1", "stage-1 step MFU (datasheet peak)", "%", 45.0, "min"),
    ("mfu_stage2_lora", "stage-2 LoRA step MFU (datasheet peak)", "%", 45.0, "min"),
]
SUMMARY_KERNELS = ("attention_prefill", "attention_decode", "patch_embed", "splice", "rms_norm", "layer_norm",
                   "linear_cross_entropy")
GPU_TESTS = ["tests/test_gpu.py", "tests/test_model_triton.py", "tests/kernels", "tests/train/test_train_gpu.py",
             "tests/test_parity.py"]
# Dry run: the GPU-only files (they skip on a CPU: the plumbing still collects and counts them) and one
# kernel file that the interpreter finishes in seconds.
DRY_TESTS = ["tests/test_gpu.py", "tests/train/test_train_gpu.py", "tests/kernels/test_activations.py"]


@dataclass
class Part:
    name: str
    budget_s: float
    command: list
    result: str | None = None  # the bench JSON it writes, relative to DIR
    status: str = "not run"  # passed, failed, over budget, skipped
    seconds: float = 0.0
    note: str = ""


def bench_command(*args):
    return [sys.executable, "-m", "llava_fast", "bench", *args]


def plan(out, dry_run):
    """The four parts with their commands and budgets."""
    from llava_fast.bench.kernel_bench import KERNELS
    from llava_fast.presets import preset_config

    assert set(SUMMARY_KERNELS) <= set(KERNELS)
    preset = "tiny" if dry_run else "llava-1.5-7b"
    context = preset_config(preset).num_image_tokens + 32  # the TTFT target's prompt: one image + 32 text tokens
    j = lambda name: os.path.join(out, name)  # noqa: E731
    pytest = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={j('tests.xml')}"]
    if dry_run:
        cpu = ["--device", "cpu", "--threads", str(min(2, os.cpu_count() or 1))]
        return [
            Part("tests", 40, pytest + DRY_TESTS),
            Part("generate", 50, bench_command("generate", "--preset", preset, *cpu, "--batch-sizes", "1,2",
                                               "--contexts", str(context), "--new-tokens", "4", "--repeats", "1",
                                               "--warmup", "0", "--vision-batch", "1", "--json", j("generate.json")),
                 "generate.json"),
            Part("kernels", 40, bench_command("kernels", "--preset", preset, *cpu, "--scale", "small",
                                              "--kernels", ",".join(SUMMARY_KERNELS), "--seq-len", "64",
                                              "--repeats", "1", "--warmup", "0", "--json", j("kernels.json")),
                 "kernels.json"),
            Part("train", 40, bench_command("train", "--preset", preset, *cpu, "--stages", "1,2", "--lora-r", "4",
                                            "--layers", "1", "--seq-len", str(context), "--repeats", "1",
                                            "--warmup", "0", "--transformers", "--json", j("train.json")),
                 "train.json"),
        ]
    if importlib.util.find_spec("xdist"):  # the GPU image has pytest-xdist: Triton's compiles use its 16 cores
        pytest += ["-n", "8"]
    return [
        Part("tests", 150, pytest + GPU_TESTS),
        Part("generate", 130, bench_command("generate", "--preset", preset, "--batch-sizes", "1,8", "--contexts",
                                            str(context), "--new-tokens", "64", "--repeats", "3",
                                            "--json", j("generate.json")), "generate.json"),
        Part("kernels", 80, bench_command("kernels", "--preset", preset, "--kernels", ",".join(SUMMARY_KERNELS),
                                          "--seq-len", "4096", "--repeats", "20", "--json", j("kernels.json")),
             "kernels.json"),
        Part("train", 100, bench_command("train", "--preset", preset, "--stages", "1,2", "--lora-r", "128",
                                         "--batch-sizes", "8", "--backends", "triton", "--repeats", "2",
                                         "--json", j("train.json")),
             "train.json"),
    ]


def run_part(part, budget_s, log, env):
    """Run one part's command for at most budget_s seconds, its output appended to the log."""
    log.write(f"\n===== {part.name}: {' '.join(part.command)} (budget {budget_s:.0f} s)\n")
    log.flush()
    start = time.perf_counter()
    # A session of its own: on overrun the whole group goes (pytest's and the bench's children too).
    proc = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    part.seconds = time.perf_counter() - start
    if code is None:
        part.status, part.note = "over budget", f"stopped after its {budget_s:.0f} s budget; what it wrote is kept"
    else:
        part.status = "passed" if code == 0 else "failed"
        if code:
            part.note = f"exit code {code}; see gpu_check.log"
    log.write(f"===== {part.name}: {part.status} in {part.seconds:.1f} s\n")
    log.flush()


OUTCOMES = "PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS"
TEST_LINE = re.compile(rf"^(tests/\S.*?) ({OUTCOMES})(?: |$)")  # pytest -v
XDIST_LINE = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] ({OUTCOMES}) (tests/\S.*?)\s*$")  # pytest -v -n N


def test_counts(log_text, junit_path):
    """Test outcomes: from the JUnit file when pytest finished, else from its -v lines (a stopped run)."""
    if os.path.exists(junit_path):
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit_path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        not_passed = sorted(f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None)
        return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                    skipped=n["skipped"], error=n["errors"], not_passed=not_passed)
    outcomes = {}
    for line in log_text.splitlines():
        m = TEST_LINE.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2).lower()
        m = XDIST_LINE.match(line)
        if m:
            outcomes[m.group(2)] = m.group(1).lower()
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped", "error")}
    counts["not_passed"] = sorted(t for t, v in outcomes.items() if v in ("failed", "error"))
    return counts


def _figure(doc, name, **labels):
    for f in doc.get("figures", []) if doc else []:
        if f["name"] == name and all(f["labels"].get(k) == v for k, v in labels.items()):
            return f["value"]
    return None


def _measured(doc, which):
    return ((doc or {}).get("ceilings", {}).get(which) or {}).get("measured")


def summarize(docs, dry_run=False):
    """(targets, kernel rows) from the bench documents; a missing figure is None, and so is `met` in a dry run
    (CPU figures of the tiny preset say nothing about the targets)."""
    gen, ker, tra = docs.get("generate"), docs.get("kernels"), docs.get("train")
    values = {}
    if gen:
        b1 = dict(engine="llava-fast/triton", batch=1)
        if gen["settings"]["device"] == "cpu":
            b1["engine"] = "llava-fast/torch"  # the CPU default backend: plumbing only
        values["decode"] = _figure(gen, "decode_throughput", **b1)
        values["ttft"] = _figure(gen, "time_to_first_token", **b1)
    if ker:
        values["prefill_attention"] = _figure(ker, "kernel_tflops", kernel="attention_prefill", impl="triton")
        bw = _figure(ker, "kernel_bandwidth", kernel="attention_decode", impl="triton")
        ceiling = _measured(ker, "bandwidth")
        values["decode_attention"] = 100 * bw / ceiling if bw and ceiling else None
    if tra:
        engine = f"llava-fast/{tra['settings']['backends'][0]}"
        values["mfu_stage1"] = _figure(tra, "train_mfu", stage=1, engine=engine)
        values["mfu_stage2_lora"] = _figure(tra, "train_mfu", stage=2, engine=engine)
    targets = []
    for key, what, unit, goal, sense in TARGETS:
        v = values.get(key)
        met = None if v is None or dry_run else (v >= goal if sense == "min" else v <= goal)
        targets.append(dict(key=key, what=what, unit=unit, goal=goal, sense=sense, value=v, met=met))
    kernels = []
    bw_peak, mm_peak = _measured(ker, "bandwidth"), _measured(ker, "matmul")
    for f in (ker or {}).get("figures", []):
        if f["name"] != "kernel_time" or f["labels"]["impl"] != "triton":
            continue
        lab = f["labels"]
        tf = _figure(ker, "kernel_tflops", kernel=lab["kernel"], impl="triton", shape=lab["shape"])
        bw = _figure(ker, "kernel_bandwidth", kernel=lab["kernel"], impl="triton", shape=lab["shape"])
        torch_ms = _figure(ker, "kernel_time", kernel=lab["kernel"], impl="torch", shape=lab["shape"])
        bound = next((g["labels"]["bound"] for g in ker["figures"] if g["name"] == "kernel_pct_of_peak"
                      and g["labels"]["kernel"] == lab["kernel"] and g["labels"]["shape"] == lab["shape"]),
                     "compute" if tf else "memory")
        pct = 100 * bw / bw_peak if bound == "memory" and bw and bw_peak else \
            100 * tf / mm_peak if bound == "compute" and tf and mm_peak else None
        kernels.append(dict(kernel=lab["kernel"], shape=lab["shape"], ms=f["value"], torch_ms=torch_ms, tflops=tf,
                            gbps=bw, pct_of_measured=pct, bound=bound))
    return targets, kernels


def _num(x, digits=3):
    return "-" if x is None else f"{x:.{digits}g}"


def table(summary):
    """The short table printed last (markdown)."""
    lines = [f"## gpu_check {'(dry run, CPU: plumbing only, not performance)' if summary['dry_run'] else ''} on "
             f"{summary['device']}", "", "| part | status | s | budget s | note |", "|---|---|---|---|---|"]
    for p in summary["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['budget_s']:.0f} | {p['note']} |")
    t = summary["tests"]
    if t:
        lines += ["", f"tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, {t['error']} errors"]
        lines += [f"  not passed: {name}" for name in t["not_passed"][:15]]
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for x in summary["targets"]:
        sign = ">=" if x["sense"] == "min" else "<="
        met = "-" if x["met"] is None else ("yes" if x["met"] else "NO")
        lines.append(f"| {x['what']} | {sign} {x['goal']:g} {x['unit']} | {_num(x['value'])} | {met} |")
    if summary["kernels"]:
        lines += ["", "| kernel (triton) | shape | ms | torch ms | TFLOP/s | GB/s | % of measured ceiling |",
                  "|---|---|---|---|---|---|---|"]
        for k in summary["kernels"]:
            lines.append(f"| {k['kernel']} | {k['shape']} | {_num(k['ms'])} | {_num(k['torch_ms'])} | "
                         f"{_num(k['tflops'])} | {_num(k['gbps'])} | {_num(k['pct_of_measured'])} ({k['bound']}) |")
    lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the results (created)")
    p.add_argument("--dry-run", action="store_true", help="the same plumbing on the CPU with the tiny preset")
    p.add_argument("--budget-s", type=float, help="total seconds for the parts (default 480 GPU, 170 dry run)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (a slower or busy host)")
    p.add_argument("--parts", help="comma-separated subset of tests,generate,kernels,train (default: all)")
    args = p.parse_args(argv)

    import torch

    from llava_fast.bench.device import device_info, git_commit, software_versions, utc_now

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --dry-run for the CPU plumbing check", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    parts = plan(out, args.dry_run)
    if args.parts:
        wanted = [x.strip() for x in args.parts.split(",") if x.strip()]
        unknown = set(wanted) - {q.name for q in parts}
        if unknown:
            print(f"gpu_check: unknown part(s) {sorted(unknown)}: expected tests, generate, kernels, train",
                  file=sys.stderr)
            return 2
        parts = [q for q in parts if q.name in wanted]
    for name in ("tests.xml", "generate.json", "kernels.json", "train.json"):  # a stale file is no result
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if not args.budget_scale > 0:
        print("gpu_check: --budget-scale must be > 0", file=sys.stderr)
        return 2
    for part in parts:
        part.budget_s *= args.budget_scale
    total = (args.budget_s or (170.0 if args.dry_run else 480.0)) * args.budget_scale
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if not args.dry_run else "cpu")
    notes = []
    start = time.perf_counter()
    with open(os.path.join(out, "gpu_check.log"), "w") as log:
        for part in parts:
            left = total - (time.perf_counter() - start)
            if left < 10:
                part.status, part.note = "skipped", f"the total budget of {total:.0f} s ran out"
                notes.append(f"{part.name} skipped: the total budget ran out")
                continue
            print(f"gpu_check: {part.name} (budget {min(part.budget_s, left):.0f} s) ...", flush=True)
            run_part(part, min(part.budget_s, left), log, env)
            print(f"gpu_check: {part.name} {part.status} in {part.seconds:.0f} s", flush=True)
    with open(os.path.join(out, "gpu_check.log")) as f:
        log_text = f.read()

    docs = {}
    for part in parts:
        path = part.result and os.path.join(out, part.result)
        if path and os.path.exists(path):
            with open(path) as f:
                docs[part.name] = json.load(f)
        elif path and part.status != "skipped":
            notes.append(f"{part.name}: no {part.result} written")
    ran_tests = any(q.name == "tests" and q.status != "skipped" for q in parts)
    tests = test_counts(log_text, os.path.join(out, "tests.xml")) if ran_tests else None
    if tests and (tests["failed"] or tests["error"]):
        next(q for q in parts if q.name == "tests").status = "failed"
    targets, kernels = summarize(docs, args.dry_run)
    info = device_info(device)
    summary = dict(schema="llava-fast-gpu-check/1", created_utc=utc_now(), dry_run=args.dry_run,
                   command=" ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]),
                   commit=git_commit(), software=software_versions(), device=info["name"], budget_s=total,
                   wall_s=round(time.perf_counter() - start, 1), parts=[asdict(q) for q in parts], tests=tests,
                   targets=targets, kernels=kernels, notes=notes,
                   bench_notes={name: d["notes"] for name, d in docs.items()})
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(table(summary))
    return 1 if any(q.status == "failed" for q in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
