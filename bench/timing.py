"""How the harness times things: warm-up, then the median over many repetitions.

GPU: CUDA events around each repetition (device time, no host jitter), one synchronize after the loop;
inputs rotate through enough copies that the working set of consecutive repetitions exceeds the L2 cache, so
a kernel is never timed reading its inputs from L2 that the previous repetition left there. CPU: the wall
clock (time.perf_counter) with the same median-of-repeats discipline. Every measurement keeps its raw
samples, so a report can show the spread and `compare` can tell a regression from noise.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def summarize(samples: Sequence[float]) -> dict:
    """Order statistics of the samples: median, quartiles (inclusive method, so n = 2 works), min, max, n."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples")
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1], "n": len(xs)}


def relative_spread(stats: dict) -> float:
    """Interquartile range over the median: the noise of a figure, as a fraction of it."""
    if not stats or not stats.get("median"):
        return 0.0
    return abs(stats["q3"] - stats["q1"]) / abs(stats["median"])


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_cache_bytes(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)  # H100: 50 MiB


def rotation_count(working_set_bytes: int, device, max_copies: int = 16) -> int:
    """Copies of the inputs to cycle through so that two consecutive repetitions never share L2 lines:
    enough copies to cover twice the L2 size, at least 1, at most max_copies."""
    l2 = l2_cache_bytes(device)
    if l2 == 0 or working_set_bytes <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(2 * l2 / working_set_bytes)))


def time_repeats(fn: Callable, *, device, repeats: int, warmup: int = 1, inputs: Sequence | None = None) -> list[float]:
    """Seconds per call of fn, `repeats` samples after `warmup` untimed calls.

    inputs: a list of argument tuples; repetition i calls fn(*inputs[i % len(inputs)]) (buffer rotation).
    None calls fn() each time. GPU: CUDA events, one host sync at the end. CPU: wall clock per call.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    args = list(inputs) if inputs else [()]
    device = torch.device(device)
    for i in range(warmup):
        fn(*args[i % len(args)])
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            a = args[i % len(args)]
            starts[i].record()
            fn(*a)
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    samples = []
    for i in range(repeats):
        a = args[i % len(args)]
        start = time.perf_counter()
        fn(*a)
        samples.append(time.perf_counter() - start)
    return samples


class Clock:
    """Host wall clock that first drains the device queue: `now()` is a synchronised timestamp, what a
    user observes (a token is 'out' when it is on the host)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()
