"""bench/gpu_check.py's bookkeeping: test counts from a stopped or finished pytest, and the targets read from the
bench documents (CI runs the whole script's --dry-run; these pin the arithmetic of its closing table)."""

import pytest

from llava_fast.bench import gpu_check
from llava_fast.bench.report import figure


def test_counts_from_verbose_lines_of_a_stopped_run():
    log = "\n".join([
        "tests/kernels/test_a.py::test_x[torch.float32-(5, 123)] PASSED [ 10%]",
        "tests/kernels/test_a.py::test_x[torch.float16-(3, 77, 129)] FAILED [ 20%]",
        "tests/test_gpu.py::test_y[1-bfloat16] SKIPPED (needs a CUDA GPU) [ 30%]",
        "tests/test_gpu.py::test_z ERROR",
        "tests/test_gpu.py::test_z PASSED",  # a test reported twice (teardown): its last outcome counts
        "E   assert 1 == 2 PASSED",  # not a test line
    ])
    counts = gpu_check.test_counts(log, "/nonexistent/tests.xml")
    assert counts == dict(passed=2, failed=1, skipped=1, error=0,
                          not_passed=["tests/kernels/test_a.py::test_x[torch.float16-(3, 77, 129)]"])


def test_counts_from_junit(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2">'
                   '<testcase classname="tests.test_gpu" name="a"><failure/></testcase>'
                   '<testcase classname="tests.test_gpu" name="b"><error/></testcase>'
                   '<testcase classname="tests.test_gpu" name="c"/></testsuite></testsuites>')
    counts = gpu_check.test_counts("", str(xml))
    assert counts == dict(passed=1, failed=1, skipped=2, error=1,
                          not_passed=["tests.test_gpu::a", "tests.test_gpu::b"])


def _doc(kind, figures, **ceilings):
    return {"kind": kind, "figures": figures, "notes": [], "settings": {"device": "cuda:0", "backends": ["triton"]},
            "ceilings": {k: {"measured": v} for k, v in ceilings.items()}}


def test_targets_and_kernel_rates_against_measured_ceilings():
    shape = dict(shape="B=8 L=4096", dtype="bfloat16")
    kernels = _doc("kernels", [
        figure("kernel_time", "ms", higher_is_better=False, samples=[0.2, 0.2, 0.2], kernel="attention_decode",
               impl="triton", **shape),
        figure("kernel_time", "ms", higher_is_better=False, samples=[0.3], kernel="attention_decode", impl="torch",
               **shape),
        figure("kernel_bandwidth", "GB/s", higher_is_better=True, value=3440.0, kernel="attention_decode",
               impl="triton", **shape),
        figure("kernel_pct_of_peak", "%", higher_is_better=True, value=71.7, kernel="attention_decode",
               impl="triton", bound="memory", peak="datasheet", **shape),
        figure("kernel_tflops", "TFLOP/s", higher_is_better=True, value=480.0, kernel="attention_prefill",
               impl="triton", shape="B=1 T=4096", dtype="bfloat16"),
    ], bandwidth=4300.0, matmul=790.0)
    generate = _doc("generate", [
        figure("decode_throughput", "tokens/s", higher_is_better=True, value=310.0, engine="llava-fast/triton",
               batch=1, context=608),
        figure("time_to_first_token", "ms", higher_is_better=False, value=16.0, engine="llava-fast/triton",
               batch=1, context=608),
    ])
    targets, rows = gpu_check.summarize({"kernels": kernels, "generate": generate})
    by_key = {t["key"]: t for t in targets}
    assert by_key["decode_attention"]["value"] == pytest.approx(80.0) and by_key["decode_attention"]["met"]
    assert by_key["prefill_attention"]["met"] is False and by_key["decode"]["met"] is True
    assert by_key["ttft"]["met"] is False  # 16 ms over a <= 15 ms goal
    assert by_key["mfu_stage1"]["value"] is None and by_key["mfu_stage1"]["met"] is None  # no train document
    assert rows == [dict(kernel="attention_decode", shape="B=8 L=4096", ms=0.2, torch_ms=0.3, tflops=None,
                         gbps=3440.0, pct_of_measured=pytest.approx(80.0), bound="memory")]
    dry, _ = gpu_check.summarize({"kernels": kernels, "generate": generate}, dry_run=True)
    assert all(t["met"] is None for t in dry)  # CPU figures of the tiny preset judge no target
    assert "| decode attention, % of measured bandwidth | >= 80 % | 80 | yes |" in gpu_check.table(dict(
        dry_run=False, device="NVIDIA H200", parts=[], tests=None, targets=targets, kernels=rows, notes=[]))


def test_counts_from_xdist_lines():
    log = "[gw0] [ 50%] PASSED tests/kernels/test_a.py::test_x[torch.float32-(5, 123)] \n" \
          "[gw1] [100%] FAILED tests/test_gpu.py::test_y[1-bfloat16]"
    assert gpu_check.test_counts(log, "/nonexistent/tests.xml") == dict(
        passed=1, failed=1, skipped=0, error=0, not_passed=["tests/test_gpu.py::test_y[1-bfloat16]"])


def test_the_gpu_plan_parses_without_a_gpu(tmp_path):
    """The GPU run's commands are built here too: their bench arguments parse, their test paths exist, and the
    budgets fit the 8 minutes (a bad flag would otherwise be found only on the GPU, after its install and start)."""
    import os

    from llava_fast.bench.cli import parse

    parts = gpu_check.plan(str(tmp_path), dry_run=False)
    assert [p.name for p in parts] == ["tests", "generate", "kernels", "train"]
    assert sum(p.budget_s for p in parts) <= 480
    for part in parts[1:]:
        _, args = parse(part.command[part.command.index("bench") + 1:])
        assert args.json == str(tmp_path / f"{part.name}.json")
    _, generate = parse(parts[1].command[4:])
    assert generate.preset == "llava-1.5-7b" and generate.batch_sizes == [1, 8] and generate.contexts == [576 + 32]
    _, kernels = parse(parts[2].command[4:])
    assert kernels.seq_len == 4096 and set(kernels.kernels) == set(gpu_check.SUMMARY_KERNELS)
    _, train = parse(parts[3].command[4:])
    assert train.stages == ["1", "2"] and train.lora_r == 128
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    for path in gpu_check.GPU_TESTS + gpu_check.DRY_TESTS:
        assert os.path.exists(os.path.join(root, path)), path
