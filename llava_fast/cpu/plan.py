"""The CPU plan of a loaded model: which kernel table, which path decodes, which prefills, on how many threads.

In: a LlavaForCausalLM as load() prepares it (cpu/quantize.py), and the kernel table in use (cpu/isa.py). Out: a
frozen `CpuPlan`, made once per model and table and kept on the module (`for_model`); the Decoder, the native
step, every GemvLinear and `bench real` read it and decide nothing themselves. Each choice carries its reason.

The rules, each measured where it is made:
- decode: the native step (native_decode.py) wherever it can run the model, except on a CPU whose best table is
  scalar, where the torch path is faster (SmolLM2-135M float32: 17.0 tok/s against 18.4); scalar forced on a SIMD
  CPU still runs it (it is the reference). torch.compile and LLAVA_FAST_NATIVE_DECODE=0 also mean torch.
- prefill: native for float32 models whose decoder projections are float32, int8 or int4 (lm_head: any format,
  it sees one row), on the avx512 or avx2 table: the 4 x 6 float32 tile (gemv.cpp) and the int8 / int4 GEMMs
  (gemm_q8.cpp, gemm_q4.cpp) with no dispatch between them beat oneDNN's GEMMs plus ~25 ops a layer
  (native_decode.py gives the figures; forced to avx2 on a Sapphire Rapids host, loaded: float32 67 tok/s against
  20, int4-32 130 against 13; int8, SmolLM2-135M, 2 threads, load 3: 356 / 550 / 640 tok/s against the torch
  prefill's 10.7 / 14.7 / 27.3 at 64 / 130 / 256 tokens). The scalar table has no tiles (SmolLM2-135M float32,
  130 tokens: 11 tok/s against the torch prefill's 289, EPYC, one thread), and neon's int8 GEMM is the scalar
  panel; neon is not measured (emulated only). Before gemm_q8.cpp int8 prefilled through torch: natively, on the
  GEMV's int8 tile, it won only on short prompts (torch time / native time 1.23 / 1.01 / 0.92 / 0.90 at 64 / 130 /
  256 / 512 tokens). bfloat16 models with bfloat16 projections prefill natively on the avx512
  and avx2 tables: AMX tiles (SmolLM2, 130 tokens, one thread: 1.53x the torch prefill), the VDPBF16PS tile and
  AVX2's widening FMA tile, at or above oneDNN's GEMM on the same instructions with no torch op between the matmuls
  (native_decode.native_bf16_prefill gives the figures). The torch
  prefill's quantized layers dequantize and run oneDNN's GEMM in bfloat16 where the CPU has AVX512_BF16 (2-2.5x
  its float32 rate).
- linear layers (the torch path's, at <= gemv.MAX_GEMV_ROWS rows): the native GEMV wherever the extension is built,
  on the CPU and not under torch.compile (which traces F.linear).
- threads: torch's thread count when the plan is made (`torch.set_num_threads` before loading changes it).
"""

from __future__ import annotations

import dataclasses

import torch

from llava_fast.cpu import gemv, isa, native_decode
from llava_fast.cpu.gemv import FORMAT_NAMES, Q4, GemvLinear


@dataclasses.dataclass(frozen=True)
class CpuPlan:
    table: str | None  # the kernel table it was made for ("avx2_vnni", ...); None without the native extension
    weights: str  # the decoder projections' format, e.g. "int4-32"; lm_head's when it differs ("lm_head int8")
    decode: str  # "native" or "torch"
    decode_why: str
    prefill: str  # "native" or "torch"
    prefill_why: str
    gemv: bool  # GemvLinear layers run the native GEMV at few rows outside torch.compile (else F.linear)
    prefill_bf16: bool  # the torch prefill multiplies dequantized int8/int4 weights in bfloat16 (oneDNN)
    threads: int  # the native kernels' threads; the torch ops of a torch decode step run on one (decode_threads)
    compile: bool  # made for torch.compile'd steps

    def __str__(self):
        return (f"table {self.table or 'none'}, {self.weights} weights, {self.threads} threads; "
                f"decode {self.decode} ({self.decode_why}); prefill {self.prefill} ({self.prefill_why})")


def _formats(net):
    """(weight format names of the decoder projections, lm_head's), as the kernels see them."""
    def name(layer):
        if isinstance(layer, GemvLinear):
            return FORMAT_NAMES[layer.format] + (f"-{layer.group}" if layer.format == Q4 else "")
        return str(layer.weight.dtype).removeprefix("torch.")
    projections = {name(m) for m in net.language_model.modules() if isinstance(m, (GemvLinear, torch.nn.Linear))}
    return sorted(projections), name(net.lm_head)


def make(net, compile=False) -> CpuPlan:
    """The plan for `net` on the kernel table in use (see the module docstring for the rules)."""
    emb = net.language_model.embed_tokens.weight
    on_cpu = emb.device.type == "cpu"
    table = isa.variant()
    family = isa.cpu_isa()
    projections, head = _formats(net)
    weights = "/".join(projections) + ("" if projections == [head] else f" (lm_head {head})")
    cannot = native_decode.why_not(net)
    if compile:
        decode, decode_why = "torch", "torch.compile traces the torch path"
    elif not native_decode.enabled():
        decode, decode_why = "torch", "LLAVA_FAST_NATIVE_DECODE=0"
    elif cannot is not None:
        decode, decode_why = "torch", cannot
    elif isa.best_for_this_cpu() == "scalar":
        decode, decode_why = "torch", "the best table is scalar: the torch path decodes faster"
    else:
        decode, decode_why = "native", f"one native call per step on the {table} table"
    unsupported = [p for p in projections if p not in ("float32", "int8") and not p.startswith("int4")]
    if decode != "native":
        prefill, prefill_why = "torch", "the native step does not run"
    elif emb.dtype == torch.bfloat16 and projections == ["bfloat16"]:
        if native_decode.native_bf16_prefill():
            prefill, prefill_why = "native", f"bfloat16 on the multi-row kernels of the {table} table"
        else:
            prefill, prefill_why = "torch", f"a bfloat16 model: the {table} table has no multi-row bfloat16 kernel"
    elif emb.dtype != torch.float32 or unsupported:
        what = f"{unsupported[0]} weights" if emb.dtype == torch.float32 else f"a {emb.dtype} model"
        prefill, prefill_why = "torch", (f"{what}: the native prefill takes float32 models with float32, int8 or "
                                         "int4 weights")
    elif family not in ("avx512", "avx2"):
        prefill, prefill_why = "torch", f"the {table} table has no tiles: the torch prefill is faster"
    else:
        gemm = " and its int8/int4 GEMMs" if any(p.startswith("int") for p in projections) else ""
        if "float32" in projections:  # csrc/decode.cpp: the float32 prompt GEMM from 96 (AVX-512) / 128 (AVX2) rows
            gemm += f" and its float32 prompt GEMM from {96 if family == 'avx512' else 128} rows"
        prefill, prefill_why = "native", (f"tiles of the {table} table{gemm}: faster than oneDNN's GEMMs and the "
                                          "torch ops")
    return CpuPlan(table=table, weights=weights, decode=decode, decode_why=decode_why, prefill=prefill,
                   prefill_why=prefill_why, gemv=gemv.NATIVE and on_cpu,
                   prefill_bf16=gemv.PREFILL_BF16 and on_cpu, threads=torch.get_num_threads(), compile=compile)


def use(net, plan: CpuPlan) -> CpuPlan:
    """Keep `plan` on `net` and hand it to its GemvLinear layers (which read their threads and paths from it)."""
    net.__dict__["cpu_plan"] = plan  # not a submodule or a parameter: plain attribute storage
    for m in net.modules():
        if isinstance(m, GemvLinear):
            m.plan = plan
    return plan


def for_model(net) -> CpuPlan:
    """`net`'s plan: the one kept on it while the kernel table in use is the one it was made for, else a new one
    (kept): `llava_fast._C.use_cpu_isa` switches tables at run time (`bench real --isa`, the tests)."""
    plan = net.__dict__.get("cpu_plan")
    table = isa.variant()
    if plan is not None and plan.table == table:
        return plan
    return use(net, make(net, compile=plan is not None and plan.compile))
