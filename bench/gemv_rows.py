"""The bfloat16 multi-row kernels (csrc/isa/avx512_vnni.cpp's VDPBF16PS tile, avx512_amx.cpp's AMX tiles)
against torch.nn.functional.linear (oneDNN; AMX for bfloat16 where the CPU has it), per shape and row count;
with --format int8, the int8 prefill GEMM (csrc/gemm_q8.cpp: avx512_vnni's VPDPBUSD panel, avx512_amx's
TDPBSSD tiles at 16 rows and more) against F.linear on the dequantized weight in bfloat16 (the torch
prefill's GEMM for an int8 layer).

In: nothing (random bfloat16 weights and activations). Out: a table of microseconds per call, median of
interleaved rounds (every implementation once per round, in rotating order), and each kernel's speed as a
ratio over F.linear. Shapes: SmolLM2-135M's decoder (q/k/v 960 x 576, o 576 x 576, gate/up 3072 x 576,
down 576 x 1536, lm_head 49152 x 576) and a 7B up projection (11008 x 4096); rows: a decode batch (1-16) and
prefill chunks (64-512); a 7B down projection (4096 x 11008) too.

    python bench/gemv_rows.py [--threads 2] [--rounds 9] [--rows 1,2,4,8,16,64,128,512] [--tables avx512_amx,...]
    python bench/gemv_rows.py --format int8 --rows 16,128,512 --shapes "qkv 960x576,down 576x1536"

The script calls only `_C.gemv` / `_C.gemm_q8` and `_C.gemv_use_kernels`, so it also runs against another build
of the package (PYTHONPATH): how the kernel of an older build is measured beside the same F.linear.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llava_fast import _C

SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576), "7B up 11008x4096": (11008, 4096),
          "7B down 4096x11008": (4096, 11008)}
BF16 = 1  # csrc/gemv.h kWeightBF16 / kActBF16


def native(x, w, y, threads):
    M, K = x.shape
    N = w.shape[0]
    _C.gemv(x.data_ptr(), BF16, M, K, w.data_ptr(), BF16, N, K, 0, 0, 0, y.data_ptr(), N, threads)


def native_q8(x, w, scale, y, threads):
    M, K = x.shape
    N = w.shape[0]
    _C.gemm_q8(x.data_ptr(), M, K, w.data_ptr(), N, K, scale.data_ptr(), y.data_ptr(), N, threads)


def operands(fmt, N, K, M, g):
    """(the native call's x, weight, scale (int8) and y; F.linear's x and weight) for one shape and row count.
    int8: offset-binary bytes u = w + 128 with a float scale per row (gemv.h kWeightQ8), F.linear on the same
    weight dequantized, in bfloat16."""
    if fmt == "bf16":
        w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        return x, w, None, torch.empty(M, N, dtype=torch.bfloat16), x, w
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int32)
    scale = torch.rand(N, generator=g) * 1e-3 + 1e-4
    x = torch.randn(M, K, generator=g)
    w_lin = (q.float() * scale[:, None]).to(torch.bfloat16)
    return x, (q + 128).to(torch.uint8), scale, torch.empty(M, N), x.to(torch.bfloat16), w_lin


def clock(fn, now, budget=0.05):
    """Seconds per call: repeat until `budget` seconds have passed (at least 3 calls), the median call."""
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget:
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", default="1,2,4,8,16,64,128,512")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tables", default=None, help="kernel tables to time (default: every usable avx512 one)")
    ap.add_argument("--format", choices=("bf16", "int8"), default="bf16",
                    help="the weight format: bfloat16 (the GEMV's tiles) or int8 (the prefill GEMM, gemm_q8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # One thread: the calling thread's CPU time, so that on a host shared with other jobs a call descheduled
    # for a time slice (~10 ms against a 1-2 ms call, seen at load 14 on 2 cores) does not count; else the wall.
    now = time.thread_time if args.threads == 1 else time.perf_counter
    usable = [t["name"] for t in _C.cpu_isa_tables() if t["usable"]] if hasattr(_C, "cpu_isa_tables") else []
    tables = args.tables.split(",") if args.tables else [t for t in usable if t.startswith("avx512")][:2]
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    clock_name = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"{args.format} weights, threads {args.threads}, rounds {args.rounds}, {clock_name}; us per call "
          "(median of rounds), ratio = F.linear / kernel")
    print("| shape | M | F.linear | " + " | ".join(tables) + " | " + " | ".join(f"{t} ratio" for t in tables) + " |")
    print("|" + " --- |" * (3 + 2 * len(tables)))
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        for M in rows:
            x, w, scale, y, x_lin, w_lin = operands(args.format, N, K, M, g)
            impls = {"F.linear": lambda x=x_lin, w=w_lin: F.linear(x, w)}
            for t in tables:
                def run(t=t, x=x, w=w, scale=scale, y=y):
                    if scale is None:
                        native(x, w, y, args.threads)
                    else:
                        native_q8(x, w, scale, y, args.threads)
                impls[t] = run
            samples = {k: [] for k in impls}
            order = list(impls)
            for r in range(args.rounds):
                for k in order[r % len(order):] + order[:r % len(order)]:
                    if k in tables:
                        _C.gemv_use_kernels(k)
                    samples[k].append(clock(impls[k], now))
            _C.gemv_use_kernels("best")
            med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
            cells = [f"{med[k]:.0f}" for k in impls]
            ratios = [f"{med['F.linear'] / med[t]:.2f}x" for t in tables]
            print(f"| {name} | {M} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
