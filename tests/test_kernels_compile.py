"""Every Triton kernel compiles for H100 (sm_90) at the launch configurations its launchers choose on a GPU,
within H100's shared memory: checked on a CPU, in a subprocess without the interpreter (how: see
kernel_compile_check.py). The interpreter tests check the arithmetic at CPU tile sizes; this catches what
only the GPU build shows (compile errors, shared-memory overflow, heavy register spills) on a machine without a GPU.
The wider sweep (every head dim, GQA group, batch and length; ~5 min): python tests/kernel_compile_check.py --all
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
from kernel_compile_check import H100_MAX_SHARED

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_compile_check.py")
# Bytes of spill loads + stores (ptxas -v) any one kernel may have. Today's worst is 356 (bf16 dK/dV at
# D = 128, 255 registers); fp32 attention at the 16-bit tiles had 157 KB before its tiles were shrunk.
MAX_SPILL_BYTES = 1024


@pytest.fixture(scope="module")
def compile_check(tmp_path_factory):
    results = tmp_path_factory.mktemp("sm90") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for this process
    proc = subprocess.run([sys.executable, CHECK, "--json", str(results)], env=env, capture_output=True,
                          text=True, timeout=600)
    if not results.exists():
        pytest.fail(f"the compile check crashed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return json.loads(results.read_text()), proc.stdout


def test_every_kernel_compiles_for_sm90_within_shared_memory(compile_check):
    results, table = compile_check
    failed = [r for r in results if r["error"] or not 0 <= r["shared"] <= H100_MAX_SHARED]
    assert not failed, f"{len(failed)} of {len(results)} sm_90 builds failed or exceed {H100_MAX_SHARED} B:\n{table}"


def test_no_kernel_spills_heavily(compile_check):
    results, table = compile_check
    unread = [r["kernel"] for r in results if r["spill_bytes"] < 0 and not r["error"]]
    assert not unread, f"no spill counts in the ptxas -v log of {unread}"
    spilling = [r for r in results if r["spill_bytes"] > MAX_SPILL_BYTES]
    assert not spilling, f"{len(spilling)} sm_90 builds spill more than {MAX_SPILL_BYTES} B:\n{table}"


def test_every_kernel_is_checked(compile_check):
    from llava_fast import kernels
    results, _ = compile_check
    defined = {name for family in kernels.FAMILIES
               for name in vars(importlib.import_module(f"llava_fast.kernels.{family}")) if name.endswith("_kernel")}
    assert defined - {r["kernel"] for r in results} == set()
