"""Kernel micro-benchmarks as pytest-benchmark tests, plus `llava-fast bench kernels` on small shapes.

    pytest tests/bench/test_bench_kernels.py --benchmark-only            # the timing table
    pytest tests/bench/test_bench_kernels.py --benchmark-json out.json  # pytest-benchmark's own JSON

Each kernel of llava_fast.kernels and its torch baseline (the cases `llava-fast bench kernels` runs) at
the tiny preset's widths with short sequences ('small' scale), so Triton's CPU interpreter finishes; on a
GPU the same tests time the compiled kernels. The timed call's Triton output is checked against the
baseline's, so a benchmark of a wrong kernel (or of a mis-wired baseline) fails.
"""

import json

import pytest
import torch

from llava_fast.bench import kernel_bench, schema
from llava_fast.presets import preset_config

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROUNDS, WARMUP = (20, 2) if DEVICE.type == "cuda" else (1, 0)  # the interpreter takes up to ~1 s a call


@pytest.fixture(scope="module")
def cases():
    built = kernel_bench.build_cases(preset_config("tiny"), "small", 1, DEVICE, DTYPE, kernel_bench.KERNELS)
    return {c.kernel: c for c in built}


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("kernel", kernel_bench.KERNELS)
def test_kernel(benchmark, cases, kernel, impl):
    case = cases[kernel]
    inputs = case.make_inputs(torch.Generator(device=DEVICE).manual_seed(0))
    fn = case.ours if impl == "triton" else case.baseline
    grad_mode = torch.enable_grad if case.grad else torch.no_grad
    benchmark.extra_info.update(shape=case.shape, flops=case.flops, bytes=case.bytes, baseline=case.baseline_name,
                                device=str(DEVICE), dtype=str(DTYPE))
    with grad_mode():
        out = benchmark.pedantic(fn, args=inputs, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
        if impl == "triton":  # a benchmark of a wrong kernel fails: the timed call's output against the baseline
            got, want = _first(out).float(), _first(case.baseline(*inputs)).float()
            tol = 1e-4 if DTYPE == torch.float32 else 2e-2
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item()), kernel


def test_flop_and_byte_counts():
    """The counts the rates are computed from, by hand for the tiny preset's small shapes (fp32)."""
    c = {x.kernel: x for x in kernel_bench.build_cases(preset_config("tiny"), "small", 1, torch.device("cpu"),
                                                       torch.float32, kernel_bench.KERNELS)}
    B, T, H, Hkv, D = 1, 64, 8, 4, 64
    assert c["attention_prefill"].flops == 2 * B * H * T * T * D  # causal: half of 4 * B*H*T^2*D
    assert c["attention_decode"].flops == 4 * 2 * H * 128 * D and c["attention_decode"].bound == "memory"
    assert c["attention_decode"].bytes == 4 * (2 * 2 * Hkv * 128 * D + 2 * 2 * H * D)
    assert c["attention_train"].flops == 3.5 * 2 * B * H * 32 * 32 * D
    assert c["rms_norm"].bytes == 4 * 4 * 64 * 512
    assert c["swiglu"].bytes == 4 * 3 * 64 * 1376
    assert c["patch_embed"].flops == 2 * 1 * 256 * (3 * 14 * 14) * 256
    assert c["splice"].flops == 2 * 16 * (256 * 512 + 512 * 512)
    assert c["linear_cross_entropy"].flops == 3 * 2 * 16 * 512 * 32064


def test_bench_kernels_cli_small(tmp_path):
    from llava_fast.cli import main

    path = str(tmp_path / "kernels.json")
    assert main(["bench", "kernels", "--device", "cpu", "--kernels", "rms_norm,swiglu,attention_decode",
                 "--repeats", "2", "--json", path]) == 0
    with open(path) as f:
        doc = json.load(f)
    assert schema.validate(doc) == []
    assert doc["settings"]["triton_interpreted"] is True and doc["settings"]["scale"] == "small"
    figs = doc["figures"]
    for kernel in ("rms_norm", "swiglu", "attention_decode"):
        times = {f["labels"]["impl"]: f for f in figs if f["name"] == "kernel_time" and f["labels"]["kernel"] == kernel}
        assert set(times) == {"triton", "torch"}
        speedup = next(f for f in figs if f["name"] == "kernel_speedup" and f["labels"]["kernel"] == kernel)
        assert speedup["value"] == pytest.approx(times["torch"]["value"] / times["triton"]["value"])
        bw = next(f for f in figs if f["name"] == "kernel_bandwidth" and f["labels"]["kernel"] == kernel
                  and f["labels"]["impl"] == "triton")
        pct = next(f for f in figs if f["name"] == "kernel_pct_of_peak" and f["labels"]["kernel"] == kernel
                   and f["labels"]["impl"] == "triton")
        assert pct["labels"]["bound"] == "memory" and pct["labels"]["peak"] == "measured"
        assert pct["value"] == pytest.approx(100 * bw["value"] / doc["ceilings"]["bandwidth"]["measured"])
    assert all(d < 1e-4 for d in doc["checks"]["max_abs_diff_vs_baseline"].values())
