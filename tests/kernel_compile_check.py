"""Compile every Triton kernel in llava_fast.kernels for an H100 (sm_90) on a machine without a GPU, at the
launch configurations its launchers choose for LLaVA-1.5-7B shapes, and check what only a GPU launch would
otherwise reveal: that it compiles, that its shared memory fits H100's 227 KiB per block, and whether ptxas
spills registers.

How, in one process without TRITON_INTERPRET:
  - inputs are torch FakeTensors on device "cuda" (shape, dtype and strides, no storage, no GPU needed), so
    every launcher takes its GPU branch and allocates its outputs and temporaries as fake tensors too;
  - torch.cuda.get_device_properties reports an H100 (132 SMs) to the launchers that size grids by SMs;
  - Triton's active driver is replaced by one that reports an sm_90 target, and JITFunction.run compiles
    the kernel (Triton's own warmup path: same binder, same specialisation, same options) instead of
    launching it. Nothing runs, so outputs are never computed; no launcher reads a value on the host.
  - ptxas runs with -v anyway; its log (printed with TRITON_DUMP_PTXAS_LOG) gives registers and spills.
Backward kernels are reached by calling the autograd.Functions' forward/backward directly: the autograd
engine itself cannot hold a CUDA tensor in a CPU-only torch build.

Run: python tests/kernel_compile_check.py [--all] [--json PATH]   (tests/test_kernels_compile.py runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch

H100_MAX_SHARED = 232448  # bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (227 KiB)
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                       total_memory=80 * 2**30, shared_memory_per_block_optin=H100_MAX_SHARED)


@dataclass
class Compiled:
    """One (kernel, specialisation, options) compiled for sm_90; `cases` are the launches that chose it."""
    kernel: str
    dtypes: str
    constexprs: dict
    num_warps: int
    num_stages: int
    shared: int = -1
    registers: int = -1
    spill_bytes: int = -1  # spill stores + spill loads, from ptxas -v
    seconds: float = 0.0
    error: str = ""
    cases: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.error and 0 <= self.shared <= H100_MAX_SHARED


class _Ctx:
    """Stands in for autograd's ctx so a Function's backward can be called directly."""
    needs_input_grad = (True,) * 16

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value):
        pass


# ------------------------------------------------------------------------------------------------------
# Offline compilation: a driver that reports sm_90 and a run() that compiles instead of launching
# ------------------------------------------------------------------------------------------------------


class _OfflineSm90Driver:
    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _parse_ptxas_log(log):
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (max(map(int, regs)) if regs else -1), (sum(int(a) + int(b) for a, b in spills) if spills else -1)


def _specialisation(value):
    """What Triton specialises a launch argument on (tensors are 16-byte aligned, as torch allocates)."""
    if hasattr(value, "data_ptr"):
        return str(value.dtype)
    if isinstance(value, int) and not isinstance(value, bool):
        return ("int", value == 1, value % 16 == 0, abs(value) >= 2**31)
    if isinstance(value, float):
        return "float"
    return repr(value)


def install_offline_sm90():
    """Process-wide and for good (run it in a subprocess): from now on `kernel[grid](...)` compiles the
    kernel for sm_90 instead of launching it. Returns the log: `.compiled`, a dict of `Compiled` keyed by
    specialisation, and `.case`, the name that the caller sets for the launches that follow."""
    import triton
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction, MockTensor

    triton_run = JITFunction.run
    seen = SimpleNamespace(compiled={}, case="")
    compiled = seen.compiled

    def mock(a):  # FakeTensors have no data_ptr() for Triton's alignment check; a MockTensor says "aligned"
        return MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a

    def compile_instead_of_launch(jit_fn, *args, grid, warmup, **kwargs):
        args, kwargs = [mock(a) for a in args], {k: mock(v) for k, v in kwargs.items()}
        bound = dict(zip(jit_fn.arg_names, args), **kwargs)
        constexprs = {p.name: bound[p.name] for p in jit_fn.params if p.is_constexpr}
        dtypes = sorted({_dtype_name(a.dtype) for a in bound.values() if isinstance(a, MockTensor)})
        record = Compiled(jit_fn.__name__, "/".join(dtypes), constexprs, kwargs.get("num_warps", 4),
                          kwargs.get("num_stages", 3))
        key = (record.kernel, repr(constexprs), kwargs.get("num_warps"), kwargs.get("num_stages"),
               tuple((k, _specialisation(v)) for k, v in sorted(bound.items()) if k not in constexprs))
        if key not in compiled:
            compiled[key] = record
            log, start = io.StringIO(), time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):  # ptxas -v's log, printed by TRITON_DUMP_PTXAS_LOG
                    kernel = triton_run(jit_fn, *args, grid=grid, warmup=True, **kwargs)
                record.shared = kernel.metadata.shared
                record.registers, record.spill_bytes = _parse_ptxas_log(log.getvalue())
            except Exception as e:  # a compile error is a result to report, not a reason to stop
                lines = str(e).strip().splitlines()
                record.error = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
            record.seconds = time.perf_counter() - start
        compiled[key].cases.append(seen.case)

    JITFunction.run = compile_instead_of_launch
    torch.cuda.get_device_properties = lambda device=None: H100
    driver.set_active(_OfflineSm90Driver())
    triton.knobs.nvidia.dump_ptxas_log = True
    return seen


# ------------------------------------------------------------------------------------------------------
# Launches: LLaVA-1.5-7B shapes (decoder C 4096, H 32, D 128, V 32064, MLP 11008, RoPE table 4096;
# CLIP-L/14 at 336 px: 577 tokens, C 1024, H 16, D 64, MLP 4096; projector 1024 -> 4096 -> 4096)
# ------------------------------------------------------------------------------------------------------

# llava_fast.kernels is imported inside the functions: the test process imports this module for its
# constants with TRITON_INTERPRET set, which would make the kernels interpreted ones.
TMAX = 4096  # max_position_embeddings: RoPE tables and the static KV cache


def _empty(*shape, dtype):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def _lengths(B):
    return _empty(B, dtype=torch.int32)


def prefill(dtype, T, D, group, B=1, H=32):
    from llava_fast.kernels import attention_prefill
    Hkv = H // group
    cos = sin = _empty(TMAX, D // 2, dtype=torch.float32)
    attention_prefill.rotary_cached_attention(_empty(B, T, H, D, dtype=dtype), _empty(B, T, Hkv, D, dtype=dtype),
                                      _empty(B, T, Hkv, D, dtype=dtype), cos, sin,
                                      _empty(B, Hkv, TMAX, D, dtype=dtype), _empty(B, Hkv, TMAX, D, dtype=dtype),
                                      _lengths(B), _lengths(B))


def decode(dtype, B, D, group, H=32):
    prefill(dtype, 1, D, group, B=B, H=H)  # T = 1 takes the split-KV decode path


def attention_training(dtype, T, D, group, B=1, H=32, causal=True):
    """Forward with the lse, then the backward: causal + RoPE (decoder) or neither (CLIP)."""
    from llava_fast.kernels.attention_backward import FlashAttentionFunction
    Hkv = H // group
    cos = sin = _empty(TMAX, D // 2, dtype=torch.float32)
    q, k, v = _empty(B, T, H, D, dtype=dtype), _empty(B, T, Hkv, D, dtype=dtype), _empty(B, T, Hkv, D, dtype=dtype)
    ctx = _Ctx()
    out = FlashAttentionFunction.forward(ctx, q, k, v, cos if causal else None, sin if causal else None,
                                         causal, causal)
    FlashAttentionFunction.backward(ctx, _empty(*out.shape, dtype=dtype))


def vision_attention(dtype, T=577, D=64, H=16, N=1):
    attention_training(dtype, T, D, 1, B=N, H=H, causal=False)


def rms_norm(dtype, C, N=2048):
    from llava_fast.kernels.norms import RMSNormFunction
    for residual in (None, _empty(N, C, dtype=dtype)):
        ctx = _Ctx()
        out = RMSNormFunction.forward(ctx, _empty(N, C, dtype=dtype), _empty(C, dtype=dtype), 1e-5, residual)
        normed = out if residual is None else out[0]
        RMSNormFunction.backward(ctx, _empty(*normed.shape, dtype=dtype),
                                 None if residual is None else _empty(N, C, dtype=dtype))


def layer_norm(dtype, C, N=577):
    from llava_fast.kernels.norms import LayerNormFunction
    ctx = _Ctx()
    y = LayerNormFunction.forward(ctx, _empty(N, C, dtype=dtype), _empty(C, dtype=dtype), _empty(C, dtype=dtype), 1e-5)
    LayerNormFunction.backward(ctx, _empty(*y.shape, dtype=dtype))


def swiglu(dtype, N=2048, C=11008):
    from llava_fast.kernels.activations import SwiGLUFunction
    ctx = _Ctx()
    out = SwiGLUFunction.forward(ctx, _empty(N, C, dtype=dtype), _empty(N, C, dtype=dtype))
    SwiGLUFunction.backward(ctx, _empty(*out.shape, dtype=dtype))


def quick_gelu(dtype, N=577, C=4096):
    from llava_fast.kernels.activations import QuickGELUFunction
    ctx = _Ctx()
    out = QuickGELUFunction.forward(ctx, _empty(N, C, dtype=dtype))
    QuickGELUFunction.backward(ctx, _empty(*out.shape, dtype=dtype))


def cross_entropy(dtype, N=2048, V=32064, C=4096):
    """The per-chunk launcher that linear_cross_entropy_forward calls: its loop slices tensors with Python
    indexing, which on a CUDA FakeTensor needs a CUDA device guard that a CPU-only torch does not have."""
    from llava_fast.kernels.cross_entropy import chunk_rows_for, cross_entropy_loss_and_grad_
    rows = chunk_rows_for(N, V, dtype)
    for write_grad in (False, True):  # evaluation (loss only), training (dz written over the logits)
        cross_entropy_loss_and_grad_(_empty(rows, V, dtype=dtype), _empty(rows, dtype=torch.int64),
                                     _empty(rows, dtype=torch.float32), _empty((), dtype=torch.float32), -100,
                                     write_grad)


def patch_embed(dtype, S=336, P=14, C=1024, N=1):
    from llava_fast.kernels.patch_embed import patch_embed as launch
    L = (S // P) ** 2  # pixels come in the tower's dtype: LlavaModel.image_features casts them
    launch(_empty(N, 3, S, S, dtype=dtype), _empty(C, 3, P, P, dtype=dtype), _empty(C, dtype=dtype),
           _empty(1 + L, C, dtype=dtype), _empty(C, dtype=dtype), _empty(C, dtype=dtype), 1e-5)


def splice(dtype, T=2048, R=576, Cv=1024, C=4096, V=32064):
    from llava_fast.kernels.splice import _splice_forward
    ids, embed = _empty(1, T, dtype=torch.int64), _empty(V, C, dtype=dtype)
    features = _empty(1, R, Cv, dtype=dtype)
    w1, b1 = _empty(C, Cv, dtype=dtype), _empty(C, dtype=dtype)
    w2, b2 = _empty(C, C, dtype=dtype), _empty(C, dtype=dtype)
    _splice_forward(ids, embed, features, 32000, w1, b1, None, None, False)  # linear projector (LLaVA v1)
    for keep_preact in (False, True):  # mlp2x_gelu for inference, and for training (pre-activation kept)
        _splice_forward(ids, embed, features, 32000, w1, b1, w2, b2, keep_preact)


def launches(everything):
    """(name, function, kwargs). The default set covers every kernel and every tile configuration at the
    model's own shapes in bf16, fp16 and fp32, plus one padded head dim with GQA in bf16 (~50 s cold on 2
    CPU cores); `everything` adds head dims 64/80/96/128 x GQA groups 1/4 x lengths x batches (~5 min)."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    chosen = []
    for dtype in dtypes:
        d = _dtype_name(dtype)
        chosen += [
            (f"prefill T=4096 D=128 G=1 {d}", prefill, dict(dtype=dtype, T=4096, D=128, group=1)),
            (f"decode B=1 D=128 G=1 {d}", decode, dict(dtype=dtype, B=1, D=128, group=1)),
            (f"train T=2048 D=128 G=1 {d}", attention_training, dict(dtype=dtype, T=2048, D=128, group=1)),
            (f"vision T=577 D=64 H=16 {d}", vision_attention, dict(dtype=dtype)),
            (f"rms_norm C=4096 {d}", rms_norm, dict(dtype=dtype, C=4096)),
            (f"layer_norm C=1024 {d}", layer_norm, dict(dtype=dtype, C=1024)),
            (f"swiglu C=11008 {d}", swiglu, dict(dtype=dtype)),
            (f"quick_gelu C=4096 {d}", quick_gelu, dict(dtype=dtype)),
            (f"cross_entropy V=32064 C=4096 {d}", cross_entropy, dict(dtype=dtype)),
            (f"patch_embed 336px C=1024 {d}", patch_embed, dict(dtype=dtype)),
            (f"splice Cv=1024 C=4096 R=576 {d}", splice, dict(dtype=dtype)),
        ]
    head_dims, groups = ((64, 80, 96, 128), (1, 4)) if everything else ((80,), (4,))
    for dtype in dtypes if everything else (torch.bfloat16,):
        d = _dtype_name(dtype)
        for D in head_dims:
            for group in groups:
                chosen += [
                    (f"prefill T=600 D={D} G={group} {d}", prefill, dict(dtype=dtype, T=600, D=D, group=group)),
                    (f"decode B=8 D={D} G={group} {d}", decode, dict(dtype=dtype, B=8, D=D, group=group)),
                    (f"train T=2048 D={D} G={group} {d}", attention_training,
                     dict(dtype=dtype, T=2048, D=D, group=group)),
                ]
                if everything:
                    chosen += [
                        (f"prefill T=4096 D={D} G={group} {d}", prefill, dict(dtype=dtype, T=4096, D=D, group=group)),
                        (f"decode B=1 D={D} G={group} {d}", decode, dict(dtype=dtype, B=1, D=D, group=group)),
                    ]
        if everything:
            chosen += [
                (f"rms_norm C=1024 {d}", rms_norm, dict(dtype=dtype, C=1024)),
                (f"layer_norm C=4096 {d}", layer_norm, dict(dtype=dtype, C=4096)),
            ]
    return chosen


def check(everything=False):
    """Compile every launch; returns the list of `Compiled`, one per distinct specialisation."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run without TRITON_INTERPRET: the interpreter never compiles for a GPU")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, minus its warning
    from torch._subclasses.fake_tensor import FakeTensorMode
    seen = install_offline_sm90()
    with FakeTensorMode():
        for name, fn, kwargs in launches(everything):
            seen.case = name
            fn(**kwargs)
    return list(seen.compiled.values())


def table(results):
    lines = [f"{'kernel':36} {'dtypes':22} {'warps':>5} {'stages':>6} {'shared':>7} {'regs':>4} {'spill':>6} "
             f"{'s':>5}  tiles  [first launch]"]
    for r in results:
        tiles = " ".join(f"{k}={v}" for k, v in r.constexprs.items()
                         if k.startswith(("BLOCK", "GROUP", "HEAD_DIM", "NUM_SPLITS", "CAUSAL")))
        status = "" if r.ok else f"  FAIL {r.error or f'shared {r.shared} > {H100_MAX_SHARED}'}"
        lines.append(f"{r.kernel:36} {r.dtypes:22} {r.num_warps:>5} {r.num_stages:>6} {r.shared:>7} "
                     f"{r.registers:>4} {r.spill_bytes:>6} {r.seconds:>5.1f}  {tiles}  [{r.cases[0]}]{status}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every head dim, GQA group, batch and length")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:  # a cold cache: every kernel really goes through ptxas
        os.environ["TRITON_CACHE_DIR"] = cache
        start = time.perf_counter()
        results = check(args.all)
        print(table(results))
        print(f"{len(results)} compiles in {time.perf_counter() - start:.0f} s; "
              f"{sum(not r.ok for r in results)} failed; {sum(r.spill_bytes > 0 for r in results)} spill")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), constexprs={k: repr(v) for k, v in r.constexprs.items()}) for r in results], f)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
