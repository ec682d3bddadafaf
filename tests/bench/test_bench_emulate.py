"""`bench real|gemv --emulate-cpu` (bench/emulate.py): the variables it sets, that the libraries honour them in a
fresh process (ATen's capability, oneDNN's ISA line, MKL's), and its refusals."""

import os
import subprocess
import sys

import pytest

from llava_fast.bench import emulate
from llava_fast.bench.cli import main as bench_main
from llava_fast.cpu import gemv
from llava_fast.errors import InputError

USABLE = {t["name"] for t in gemv._C.cpu_isa_tables() if t["usable"]} if gemv.NATIVE else set()

# A fresh interpreter reports what each library runs on: ATen's capability, then one bfloat16 and one float32
# matmul with oneDNN's and MKL's verbose logs on (their ISA lines go to stdout).
PROBE = ("import torch; print('aten', torch.backends.cpu.get_cpu_capability()); "
         "x = torch.randn(128, 576); w = torch.randn(1536, 576); "
         "torch.nn.functional.linear(x.bfloat16(), w.bfloat16()); torch.nn.functional.linear(x, w)")


def probe(name):
    env = dict(os.environ, **emulate.environment(name), ONEDNN_VERBOSE="1", MKL_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_environment_names_each_library_and_refuses_unknown_names():
    env = emulate.environment("avx2")
    assert env == {"LLAVA_FAST_CPU_ISA": "avx2_maddubs", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "LLAVA_FAST_EMULATED_CPU": "avx2"}
    assert emulate.environment("avx512_vnni")["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    with pytest.raises(InputError, match="avx9"):
        emulate.environment("avx9")
    with pytest.raises(InputError, match="emulate-cpu"):
        bench_main(["real", "--emulate-cpu", "avx9"])


def test_in_process_main_refuses_rather_than_replacing_the_caller(monkeypatch):
    for k in emulate.environment("avx2"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(InputError, match="fresh process.*ONEDNN_MAX_CPU_ISA=AVX2"):
        bench_main(["real", "--emulate-cpu", "avx2", "--no-llama-cpp"])


@pytest.mark.skipif("avx2_maddubs" not in USABLE, reason="this CPU has no AVX2")
def test_avx2_caps_aten_and_mkl():
    out = probe("avx2")
    assert "aten AVX2" in out
    assert "Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2)" in out  # MKL's sgemm
    assert "AVX-512" not in out and "AMX" not in out  # oneDNN has no bfloat16 below AVX-512: ATen's own GEMM runs


@pytest.mark.skipif("avx512_vnni" not in USABLE, reason="this CPU has no AVX512_BF16 + AVX512_VNNI")
def test_avx512_vnni_caps_onednn_below_amx():
    out = probe("avx512_vnni")
    assert "aten AVX512" in out
    isa = [line for line in out.splitlines() if line.startswith("onednn_verbose") and ",isa:" in line]
    assert isa and "bfloat16" in isa[0] and "AMX" not in isa[0], isa


@pytest.mark.skipif(not gemv.NATIVE, reason="needs the native extension")
def test_isa_tables_the_emulated_cpu_lacks_are_refused_before_the_run():
    """`--emulate-cpu avx2 --isa avx2` ran our avx2_vnni table (the avx2 family's best here) beside peers capped at
    AVX2 without VNNI, and `--isa avx512` the AMX table: a table the emulated CPU lacks is refused, by name."""
    lacks = {"avx2": {"avx2_vnni", "avx512_core", "avx512_vnni", "avx512_amx"},
             "avx2_vnni": {"avx512_core", "avx512_vnni", "avx512_amx"},
             "avx512_core": {"avx2_vnni", "avx512_vnni", "avx512_amx"},
             "avx512_vnni": {"avx2_vnni", "avx512_amx"}}
    for name in emulate.EMULATED_CPUS:
        for table in sorted(USABLE):
            if table in lacks[name]:
                with pytest.raises(InputError, match=f"^--isa {table} is not a table of the CPU --emulate-cpu {name} "):
                    emulate.check_tables(name, ["scalar", table])
            else:
                emulate.check_tables(name, [table])
    if "avx2_vnni" in USABLE:
        with pytest.raises(InputError, match="^--isa avx2 picks avx2_vnni on this CPU, which is not a table of the "
                                             "CPU --emulate-cpu avx2 stands for: name some of avx2_maddubs, scalar$"):
            bench_main(["real", "--emulate-cpu", "avx2", "--isa", "avx2", "--no-llama-cpp"])
