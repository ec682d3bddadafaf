"""`bench real --emulate-cpu NAME` (and `bench gemv`): run every engine as it runs on a lower CPU, in one process.

Why: llava-fast's native kernels take a lower table on request (LLAVA_FAST_CPU_ISA), but its torch path and the
transformers peer run on oneDNN, MKL and ATen, which on a Sapphire Rapids host use AMX and AVX-512 BF16 for
bfloat16 GEMMs: forcing only our table compares our AVX2 code with their AMX code, which no AVX2 user sees (SmolLM2
bfloat16, 128 x 576 x 3072, 2 threads: oneDNN 184 GFLOP/s capped at AVX512_CORE_BF16, 31 capped at AVX2). Each
library honours a variable read once, when it first runs: ONEDNN_MAX_CPU_ISA (oneDNN), MKL_ENABLE_INSTRUCTIONS
(MKL's float32 GEMM), ATEN_CPU_CAPABILITY (ATen's vectorized ops). They must be set before torch loads, and
`llava_fast` imports torch, so `become(name)` sets them and starts the command again (os.execv) with the same
arguments; the peers' child processes inherit them. llama.cpp cannot be capped at run time (ggml is compiled for
fixed instructions): give a build for the emulated CPU with --llama-cpp-build, or read the ISA each engine
reports in the result's notes (`ran_on`).

The names are the kernel tables' (LLAVA_FAST_CPU_ISA), each the CPUs it stands for:
    avx2          AVX2 + FMA without VNNI (Haswell .. Comet Lake, Zen 1-3): our avx2_maddubs table
    avx2_vnni     + AVX-VNNI (Alder Lake and later client chips)
    avx512_core   AVX-512 F/BW/VL/DQ without VNNI or BF16 (Skylake-SP)
    avx512_vnni   + AVX512_VNNI and AVX512_BF16, no AMX (Cooper Lake, Zen 4)
Equivalent by hand: `ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
LLAVA_FAST_CPU_ISA=avx2_maddubs llava-fast bench real`.
"""

from __future__ import annotations

import os
import sys

from llava_fast.errors import InputError

# name: (LLAVA_FAST_CPU_ISA, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY)
EMULATED_CPUS = {
    "avx2": ("avx2_maddubs", "AVX2", "AVX2", "avx2"),
    "avx2_vnni": ("avx2_vnni", "AVX2_VNNI", "AVX2", "avx2"),
    "avx512_core": ("avx512_core", "AVX512_CORE", "AVX512", "avx512"),
    "avx512_vnni": ("avx512_vnni", "AVX512_CORE_BF16", "AVX512", "avx512"),
}
# The kernel tables each emulated CPU runs: its own and those below it that need nothing it lacks (AVX-VNNI, the
# VEX form, is on Alder Lake and Sapphire Rapids but not on Skylake-SP, Cooper Lake or Zen 4: avx2_vnni is not below
# the avx512 tables).
EMULATED_TABLES = {
    "avx2": ("avx2_maddubs", "scalar"),
    "avx2_vnni": ("avx2_vnni", "avx2_maddubs", "scalar"),
    "avx512_core": ("avx512_core", "avx2_maddubs", "scalar"),
    "avx512_vnni": ("avx512_vnni", "avx512_core", "avx2_maddubs", "scalar"),
}
MARKER = "LLAVA_FAST_EMULATED_CPU"  # set in the restarted process: it is the emulation, not a request for one


def environment(name: str) -> dict[str, str]:
    """The variables that make every engine run as on the CPU `name` (EMULATED_CPUS)."""
    if name not in EMULATED_CPUS:
        raise InputError(f"--emulate-cpu {name!r}: expected one of {', '.join(EMULATED_CPUS)}")
    table, onednn, mkl, aten = EMULATED_CPUS[name]
    return {"LLAVA_FAST_CPU_ISA": table, "ONEDNN_MAX_CPU_ISA": onednn, "MKL_ENABLE_INSTRUCTIONS": mkl,
            "ATEN_CPU_CAPABILITY": aten, MARKER: name}


def become(name: str, restartable: bool) -> None:
    """Return once this process runs as the CPU `name`; else set the variables and start the command again.
    restartable: the process was started for this command (not a caller's in-process main(argv))."""
    env = environment(name)
    if all(os.environ.get(k) == v for k, v in env.items()):
        from llava_fast.cpu import isa

        isa.check()  # a table this CPU cannot run: InputError naming what it lacks
        return
    if not restartable:
        raise InputError(f"--emulate-cpu {name} must start a fresh process (torch is loaded); set "
                         + " ".join(f"{k}={v}" for k, v in env.items()) + " before starting Python instead")
    os.environ.update(env)
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def check_tables(name: str, tables) -> None:
    """InputError unless each of `tables` (--isa names) runs the emulated CPU `name` has. A family picks its best
    variant on this CPU, which may be one the emulated CPU lacks: `--isa avx2` on a Sapphire Rapids host ran
    avx2_vnni beside peers capped at AVX2 (no VNNI), `--isa avx512` its AMX table."""
    from llava_fast import _C

    runs = EMULATED_TABLES[name]
    in_use = _C.cpu_isa_variant()
    try:
        for table in tables:
            _C.use_cpu_isa(table)
            variant = _C.cpu_isa_variant()
            if variant not in runs:
                picked = "" if variant == table else f" picks {variant} on this CPU, which"
                raise InputError(f"--isa {table}{picked} is not a table of the CPU --emulate-cpu {name} stands for: "
                                 f"name some of {', '.join(runs)}")
    finally:
        _C.use_cpu_isa(in_use)


def ran_on() -> str:
    """What the torch-based engines of this process (and of its children, which inherit the variables) run on."""
    import torch

    capped = {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    return (f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN "
            f"{capped['ONEDNN_MAX_CPU_ISA'] or 'uncapped'}, MKL {capped['MKL_ENABLE_INSTRUCTIONS'] or 'uncapped'}")
