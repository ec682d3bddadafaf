"""The CPU kernel tables (csrc/isa/): which one runs, forcing a lower one with LLAVA_FAST_CPU_ISA, and the errors
for names this build or CPU cannot run. The kernels themselves are checked table against table by the C++ driver
(csrc/tests/run_kernel_tests.sh) and by the native-path tests run with each table forced (.ci/run)."""

import os
import subprocess
import sys

import pytest

_C = pytest.importorskip("llava_fast._C")

FAMILIES = {"avx512", "avx2", "neon", "scalar"}


def _in_child(code, isa):
    env = dict(os.environ, LLAVA_FAST_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_best_usable_table_runs_and_scalar_is_always_there():
    tables = _C.cpu_isa_tables()
    assert tables[-1] == {"name": "scalar", "family": "scalar", "usable": True, "missing": ""}
    forced = os.environ.get("LLAVA_FAST_CPU_ISA")  # .ci/run runs this file again with lower tables forced
    best = next(t for t in tables if t["usable"] and (not forced or forced in (t["name"], t["family"])))
    assert _C.cpu_isa() == best["family"] in FAMILIES and _C.cpu_isa_variant() == best["name"]
    for t in tables:  # an unusable table says what is missing
        assert t["usable"] == (t["missing"] == "")


def test_a_forced_table_runs_and_best_stays_capped_by_it():
    code = ("from llava_fast import _C; _C.use_cpu_isa('best'); "
            "print(_C.cpu_isa(), _C.cpu_isa_variant(), repr(_C.cpu_isa_problem()))")
    assert _in_child(code, "scalar") == "scalar scalar ''"
    usable = [t for t in _C.cpu_isa_tables() if t["usable"]]
    for t in usable:
        assert _in_child(code, t["name"]) == f"{t['family']} {t['name']} ''"


def test_a_table_this_build_cannot_run_is_a_clear_error():
    other = "neon" if _C.cpu_isa() != "neon" else "avx2"
    with pytest.raises(ValueError, match=f"'{other}' are not built for this architecture"):
        _C.use_cpu_isa(other)
    with pytest.raises(ValueError, match="'sse9' are unknown; use .*scalar"):
        _C.use_cpu_isa("sse9")
    assert _C.gemv_use_kernels("sse9") is False
    for t in _C.cpu_isa_tables():
        if not t["usable"]:
            with pytest.raises(ValueError, match=f"cannot run here: missing {t['missing']}"):
                _C.use_cpu_isa(t["name"])
    # Forced by the environment: the import still works (image preprocessing needs no table), every kernel
    # call raises with the reason.
    code = ("import torch; from llava_fast import _C; from llava_fast.cpu import gemv as G; "
            "print(_C.cpu_isa_problem())\n"
            "try:\n    G.gemv(torch.randn(1, 64), G.GemvLinear.from_float(torch.randn(8, 64)), 1)\n"
            "except ValueError as e:\n    print('raised', e)")
    out = _in_child(code, other).splitlines()
    assert out[0].startswith(f"LLAVA_FAST_CPU_ISA={other}: CPU kernels '{other}' are not built")
    assert out[1] == "raised " + out[0]


def test_the_public_name_and_a_forced_table_the_cpu_lacks_fail_before_any_work():
    import llava_fast

    assert llava_fast.cpu_isa() == _C.cpu_isa()
    other = "neon" if _C.cpu_isa() != "neon" else "avx2"
    env = dict(os.environ, LLAVA_FAST_CPU_ISA=other)
    out = subprocess.run([sys.executable, "-m", "llava_fast", "generate", "--max-new-tokens", "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and f"LLAVA_FAST_CPU_ISA={other}" in out.stderr, out.stderr
    code = ("import llava_fast\ntry:\n    llava_fast.random_model('tiny')\n"
            "except llava_fast.InputError as e:\n    print('InputError', e)")
    assert _in_child(code, other).startswith(f"InputError LLAVA_FAST_CPU_ISA={other}: ")


def test_naming_the_table_under_a_name_it_cannot_run_is_the_same_error():
    """llava_fast.cpu_isa() answered the probe's table ("avx512") under LLAVA_FAST_CPU_ISA=avx2x or a table the CPU
    lacks, as if the variable had taken effect; it raises what loading a model raises."""
    other = "neon" if _C.cpu_isa() != "neon" else "avx2"
    code = ("import llava_fast\nfrom llava_fast.cpu import isa\nfor f in (llava_fast.cpu_isa, isa.variant):\n"
            "    try:\n        print('answered', f())\n"
            "    except llava_fast.InputError as e:\n        print('InputError', e)")
    for name, why in (("avx2x", "CPU kernels 'avx2x' are unknown"), (other, f"CPU kernels '{other}' are not built"),
                      ("AVX2", "CPU kernels 'AVX2' are unknown")):
        lines = _in_child(code, name).splitlines()
        want = f"InputError LLAVA_FAST_CPU_ISA={name}: {why}"
        assert len(lines) == 2 and all(line.startswith(want) for line in lines), (name, lines)
    assert _in_child("import llava_fast; print(llava_fast.cpu_isa())", "scalar") == "scalar"


def test_train_without_device_refuses_a_table_the_cpu_lacks_before_the_load(tmp_path):
    """train checked LLAVA_FAST_CPU_ISA only with --device given: without it a run went on on the probe's table."""
    data = tmp_path / "d.json"
    data.write_text("[]")
    env = dict(os.environ, LLAVA_FAST_CPU_ISA="avx2x", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "llava_fast", "train", "--stage", "2", "--model", str(tmp_path / "m"),
                          "--data", str(data), "--output", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("llava-fast: error: LLAVA_FAST_CPU_ISA=avx2x: CPU kernels 'avx2x' are unknown")
    assert not (tmp_path / "out").exists()


def test_without_a_simd_table_the_torch_path_decodes(monkeypatch):
    """A CPU whose best table is scalar (no SIMD table) leaves decoding to the torch path, which is faster there;
    scalar forced on a CPU with a SIMD table still runs the native step (it is the reference the others match)."""
    import llava_fast
    from llava_fast.cpu import isa, plan

    net = llava_fast.random_model("tiny").net
    assert isa.best_for_this_cpu() == _C.cpu_isa_tables()[0]["family"] or not _C.cpu_isa_tables()[0]["usable"]
    monkeypatch.setattr(isa, "best_for_this_cpu", lambda: "scalar")
    made = plan.make(net)
    assert (made.decode, made.prefill) == ("torch", "torch") and "best table is scalar" in made.decode_why
    monkeypatch.undo()
    assert _C.gemv_use_kernels("scalar")
    try:
        assert plan.for_model(net).decode == "native" or isa.best_for_this_cpu() == "scalar"
    finally:
        _C.gemv_use_kernels("best")
