"""Which CPU kernel table the native path runs (csrc/isa/: one table per instruction set, picked once at import).

`cpu_isa()` names it: "avx512", "avx2", "neon" or "scalar" (None without the native extension). The environment
variable LLAVA_FAST_CPU_ISA forces a lower table, for tests and benchmarks; `check()` turns a forced table this CPU
cannot run into an InputError naming what the CPU lacks, before any model is built.
"""

from __future__ import annotations

from llava_fast.errors import InputError

try:
    from llava_fast import _C
except ImportError:  # built without a C++ toolchain: the torch paths run
    _C = None


def cpu_isa() -> str | None:
    """The family of the CPU kernel table in use ("avx512", "avx2", "neon", "scalar"), or None when the native
    extension is not built. `llava_fast._C.cpu_isa_variant()` gives the exact table (e.g. "avx2_vnni").
    InputError (check()) when LLAVA_FAST_CPU_ISA names a table that is unknown or this CPU cannot run: the probe's
    table stands in until then, and naming it answered "avx512" to LLAVA_FAST_CPU_ISA=avx2x as if it were set."""
    check()
    return None if _C is None else _C.cpu_isa()


def variant() -> str | None:
    """The exact table in use (e.g. "avx2_vnni", "avx512_vnni"), or None when the native extension is not built;
    InputError as cpu_isa()."""
    check()
    return None if _C is None else _C.cpu_isa_variant()


def best_for_this_cpu() -> str | None:
    """The family of the best table this CPU can run, whatever is forced (None without the extension)."""
    if _C is None:
        return None
    return next(t["family"] for t in _C.cpu_isa_tables() if t["usable"])  # best first; scalar always usable


def check() -> None:
    """Raise InputError if LLAVA_FAST_CPU_ISA names a table that is unknown or that this CPU cannot run."""
    problem = "" if _C is None else _C.cpu_isa_problem()
    if problem:
        raise InputError(problem)  # it names the variable, the table and what the CPU lacks
