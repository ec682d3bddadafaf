"""The harness's bookkeeping without a model: statistics, the schema validator, compare's verdicts.

Documents here are built from known numbers, so every check has a known answer: a validator that lets a
broken document through, or a compare that misses a 20% regression (or flags 2% noise), fails.
"""

import copy
import json
import math

import pytest

from llava_fast.bench import report, schema, timing
from llava_fast.bench.cli import main as bench_main
from llava_fast.errors import InputError


def make_doc(decode=(100.0, 102.0, 98.0, 101.0, 99.0), ttft=(50.0, 51.0, 49.0, 50.5, 49.5)):
    doc = {
        "schema": report.SCHEMA_VERSION, "kind": "generate", "created_utc": "2026-01-01T00:00:00Z",
        "command": "llava-fast bench", "commit": {"sha": "0" * 40, "dirty": False},
        "software": {"python": "3.11", "torch": "2.13", "triton": "3.9", "transformers": None, "llava-fast": "0.1"},
        "device": {"type": "cpu", "name": "test cpu", "host": {"cpu": "test cpu", "cores": 2, "torch_threads": 2}},
        "settings": {"device": "cpu", "dtype": "float32", "repeats": 5, "warmup": 1, "contexts": [274]},
        "ceilings": {
            "bandwidth": {"unit": "GB/s", "measured": 20.0, "stats": timing.summarize([19.0, 20.0]),
                          "method": "copy", "datasheet": None},
            "matmul": {"unit": "TFLOP/s", "measured": 0.3, "stats": timing.summarize([0.3]), "method": "mm",
                       "datasheet": None, "dtype": "float32"},
            "datasheet_model": None},
        "telemetry": {"available": False, "reason": "not a CUDA device", "interval_s": 0.2, "static": {},
                      "summary": {}, "samples": []},
        "figures": [], "checks": {}, "notes": [],
    }
    labels = dict(engine="llava-fast/torch", batch=1, context=274)
    doc["figures"] = [
        report.figure("decode_throughput", "tokens/s", higher_is_better=True, samples=decode, **labels),
        report.figure("time_to_first_token", "ms", higher_is_better=False, samples=ttft, **labels),
        report.figure("decode_speedup", "x", higher_is_better=True, value=1.25, baseline="transformers", **labels),
    ]
    return doc


# ------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------


def test_summarize_known_samples():
    s = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert timing.summarize([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "min": 7.0, "max": 7.0, "n": 1}
    assert timing.relative_spread(s) == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_figure_value_is_median_of_samples():
    f = report.figure("decode_throughput", "tokens/s", higher_is_better=True, samples=[3, 1, 2], engine="e")
    assert f["value"] == 2.0 and f["samples"] == [3.0, 1.0, 2.0] and f["stats"]["n"] == 3
    with pytest.raises(ValueError):
        report.figure("x", "ms", higher_is_better=False, samples=[1.0], value=1.0)


def test_time_repeats_rotates_inputs_and_measures_wall_clock():
    import time

    seen = []
    samples = timing.time_repeats(lambda x: (seen.append(x), time.sleep(0.01)), device="cpu", repeats=4,
                                  warmup=1, inputs=[("a",), ("b",), ("c",)])
    assert seen == ["a", "a", "b", "c", "a"]  # warm-up on copy 0, then i % 3
    assert len(samples) == 4 and all(s >= 0.009 for s in samples)


def test_rotation_count_covers_twice_the_l2(monkeypatch):
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device: 50 * 2**20)
    assert timing.rotation_count(10 * 2**20, "cuda") == 10  # 2 x 50 MiB / 10 MiB
    assert timing.rotation_count(200 * 2**20, "cuda") == 1  # larger than L2 already
    assert timing.rotation_count(2**10, "cuda") == 16  # capped
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device: 0)
    assert timing.rotation_count(2**10, "cpu") == 1


# ------------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------------


def test_valid_document_passes_and_round_trips(tmp_path):
    doc = make_doc()
    assert schema.validate(doc) == []
    path = report.write_json(doc, str(tmp_path / "r.json"))
    assert schema.validate(json.load(open(path))) == []
    assert bench_main(["validate", path]) == 0


def _mutations():
    def drop(field):
        return lambda d: d.pop(field)

    def fig(i, fn):
        return lambda d: fn(d["figures"][i])

    return {
        "missing top-level field": drop("ceilings"),
        "unknown top-level field": lambda d: d.update(extra=1),
        "wrong schema version": lambda d: d.update(schema="llava-fast-bench/0"),
        "unknown figure name": fig(0, lambda f: f.update(name="speed")),
        "wrong unit for the figure": fig(0, lambda f: f.update(unit="ms")),
        "unknown unit": fig(0, lambda f: f.update(unit="furlongs")),
        "wrong direction": fig(1, lambda f: f.update(higher_is_better=True)),
        "missing label": fig(0, lambda f: f["labels"].pop("batch")),
        "NaN value": fig(0, lambda f: f.update(value=math.nan)),
        "negative value": fig(2, lambda f: f.update(value=-1.0)),
        "zero throughput": fig(2, lambda f: f.update(value=0.0)),
        "value is not the median": fig(0, lambda f: f.update(value=f["value"] + 1)),
        "stats out of order": fig(0, lambda f: f["stats"].update(q1=f["stats"]["max"] + 1)),
        "n does not match samples": fig(0, lambda f: f["samples"].pop()),
        "samples without stats": fig(0, lambda f: f.pop("stats")),
        "duplicate figure": lambda d: d["figures"].append(copy.deepcopy(d["figures"][0])),
        "no figures": lambda d: d["figures"].clear(),
        "cuda without gpu section": lambda d: d["device"].update(type="cuda"),
        "ceiling not positive": lambda d: d["ceilings"]["matmul"].update(measured=0.0),
        "string where number": fig(0, lambda f: f.update(value="100")),
    }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_invalid_documents_are_rejected(mutation):
    doc = make_doc()
    _mutations()[mutation](doc)
    assert schema.validate(doc), f"validator accepted: {mutation}"


def test_validate_cli_reports_bad_file(tmp_path, capsys):
    doc = make_doc()
    doc["figures"][0]["unit"] = "ms"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert bench_main(["validate", str(path)]) == 1
    assert "measured in 'tokens/s'" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------
# Compare
# ------------------------------------------------------------------------------------------------------


def scaled(samples, factor):
    return [x * factor for x in samples]


def verdicts(a, b, threshold=0.05):
    return {r["key"].split("[")[0]: r for r in report.compare(a, b, threshold)["rows"]}


def test_compare_flags_known_regressions_and_improvements():
    base = make_doc()
    slower = make_doc(decode=scaled(make_doc()["figures"][0]["samples"], 0.8),
                      ttft=scaled(make_doc()["figures"][1]["samples"], 1.2))
    v = verdicts(base, slower)
    assert v["decode_throughput"]["verdict"] == "regression"
    assert v["decode_throughput"]["delta"] == pytest.approx(-0.2)
    assert v["time_to_first_token"]["verdict"] == "regression"  # lower is better: +20% time is worse
    assert v["time_to_first_token"]["delta"] == pytest.approx(0.2)
    assert v["decode_speedup"]["verdict"] == "within noise"
    back = verdicts(slower, base)
    assert back["decode_throughput"]["verdict"] == "improvement"
    assert back["time_to_first_token"]["verdict"] == "improvement"


def test_compare_ignores_changes_within_threshold_and_noise():
    base = make_doc()
    v = verdicts(base, make_doc(decode=scaled(base["figures"][0]["samples"], 0.98)))
    assert v["decode_throughput"]["verdict"] == "within noise"  # -2% < 5%
    # a noisy figure (IQR 40% of the median) needs more than 2 x 40% to count
    noisy = [60.0, 80.0, 100.0, 120.0, 140.0]
    v = verdicts(make_doc(decode=noisy), make_doc(decode=scaled(noisy, 0.7)))
    assert v["decode_throughput"]["noise"] == pytest.approx(0.8)
    assert v["decode_throughput"]["verdict"] == "within noise"
    v = verdicts(make_doc(decode=noisy), make_doc(decode=scaled(noisy, 0.1)))
    assert v["decode_throughput"]["verdict"] == "regression"


def test_compare_lists_unmatched_figures_and_setting_changes():
    a, b = make_doc(), make_doc()
    b["figures"][2]["labels"]["batch"] = 8
    b["settings"]["repeats"] = 10
    result = report.compare(a, b)
    assert len(result["only_a"]) == 1 and len(result["only_b"]) == 1
    assert any("repeats" in w for w in result["warnings"])


def test_compare_cli_exit_codes(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    report.write_json(make_doc(), str(a))
    report.write_json(make_doc(decode=scaled(make_doc()["figures"][0]["samples"], 0.5)), str(b))
    assert bench_main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "-50.0%" in out
    assert bench_main(["compare", str(a), str(b), "--fail-on-regression"]) == 1
    assert bench_main(["compare", str(a), str(a), "--fail-on-regression"]) == 0
    with pytest.raises(InputError, match="file not found"):
        bench_main(["compare", str(a), str(tmp_path / "missing.json")])
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(InputError, match="not a llava-fast bench result"):
        bench_main(["compare", str(a), str(tmp_path / "junk.json")])


def test_bad_arguments_raise_input_error():
    for argv in (["--batch-sizes", "1,x"], ["--batch-sizes", "0"], ["--contexts", "abc"], ["--backends", "cuda"],
                 ["kernels", "--kernels", "nope"], ["train", "--stages", "3"], ["--no-such-flag"],
                 ["--preset", "nope"], ["--model", "/x", "--preset", "tiny"], ["--device", "tpu"],
                 ["--dtype", "int8"], ["compare", "a.json", "b.json", "--threshold", "-1"]):
        with pytest.raises(InputError):
            bench_main(argv)


def test_cli_exit_code_two_through_llava_fast(capsys):
    from llava_fast.cli import main

    assert main(["bench", "--batch-sizes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava-fast: error:") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------------
# GPU-side bookkeeping, exercised without a GPU
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM5"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"), ("NVIDIA GeForce GTX 1080", None)])
def test_datasheet_lookup_by_gpu_name(name, model):
    from llava_fast.bench.device import datasheet_peaks

    peaks = datasheet_peaks(name)
    assert (peaks or {}).get("model") == model


def test_percent_of_peak_uses_the_datasheet_when_known():
    import torch

    from llava_fast.bench.device import peak
    from llava_fast.bench.kernel_bench import Case, case_figures

    ceilings = {"bandwidth": {"measured": 3000.0, "datasheet": 3350.0},
                "matmul": {"measured": 700.0, "datasheet": 989.0}}
    assert peak(ceilings, "bandwidth") == (3350.0, "datasheet")
    assert peak({"bandwidth": {"measured": 20.0, "datasheet": None}}, "bandwidth") == (20.0, "measured")
    case = Case("attention_prefill", "B=1", None, None, None, "SDPA", flops=989e9, bytes=None, bound="compute")
    figs = case_figures(case, [2e-3, 2e-3, 2e-3], [4e-3, 4e-3, 4e-3], torch.bfloat16, ceilings, torch.device("cuda"))
    pct = report.find_one(figs, "kernel_pct_of_peak", impl="triton")
    assert pct["value"] == pytest.approx(50.0) and pct["labels"]["peak"] == "datasheet"  # 494.5 of 989 TFLOP/s
    assert report.find_one(figs, "kernel_speedup")["value"] == pytest.approx(2.0)
    # an fp32 kernel on a GPU has no bf16 compute peak to be compared with: no % figure
    figs = case_figures(case, [2e-3], [4e-3], torch.float32, ceilings, torch.device("cuda"))
    assert not report.find(figs, "kernel_pct_of_peak")


def test_telemetry_samples_through_nvml(monkeypatch):
    import time
    import types

    import torch

    from llava_fast.bench import device as dev

    class Info:
        used, gpu = 5 * 2**30, 87

    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlDeviceGetHandleByUUID=lambda u: "h",
        nvmlSystemGetDriverVersion=lambda: b"560.35", nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMaxClockInfo=lambda h, c: 1980 if c == 0 else 2619,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700000,
        nvmlDeviceGetClockInfo=lambda h, c: 1755 if c == 0 else 2619, nvmlDeviceGetPowerUsage=lambda h: 412000,
        nvmlDeviceGetTemperature=lambda h, s: 61, nvmlDeviceGetMemoryInfo=lambda h: Info(),
        nvmlDeviceGetUtilizationRates=lambda h: Info())
    monkeypatch.setattr(dev, "_nvml", lambda: fake)
    t = dev.Telemetry(torch.device("cuda", 0), interval_s=0.01).start()
    time.sleep(0.1)
    d = t.stop().to_dict()
    assert d["available"] and d["reason"] is None and len(d["samples"]) >= 2
    assert d["static"]["driver"] == "560.35" and d["static"]["power_limit_w"] == 700.0
    s = d["samples"][0]
    assert (s["sm_clock_mhz"], s["power_w"], s["temperature_c"], s["memory_used_bytes"]) == (1755, 412.0, 61, 5 * 2**30)
    assert d["summary"]["power_w"]["median"] == 412.0
    assert schema.check(d, schema.SCHEMA["properties"]["telemetry"]) == []
    cpu = dev.Telemetry(torch.device("cpu")).start().stop().to_dict()
    assert not cpu["available"] and cpu["reason"] == "not a CUDA device"
