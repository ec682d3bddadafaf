"""Batch-1 linear layers for CPU decode: packed weights, the native GEMV (csrc/gemv.cpp), its torch reference.

In: a weight (N, K) in float32 / bfloat16, or quantized by torchao (quantize.py) to int8 rows or int4 groups.
Out: `GemvLinear`, an nn.Module with nn.Linear's contract (x (..., K) -> (..., N), x's dtype) whose forward
runs `llava_fast._C.gemv` when x is on the CPU with at most `MAX_GEMV_ROWS` rows, and otherwise F.linear on
the (dequantized) weight; threads and paths as its model's plan says (plan.py). `reference(x, packed)` is that
F.linear path in float32: the oracle of the tests.

Formats (csrc/gemv.h): F32 and BF16 hold the weight itself; Q8 uint8 (N, K) holding the int8 weight
offset-binary (q + 128) + float32 scale (N,): W = (u - 128) * scale; Q4 uint8 (N, K/2) with the two nibbles of
byte j of each 32-block holding weights j and j + 16, float16 scale and min (N, K/group): W = q * scale + min,
q in 0..15.

Numerics: F32 and BF16 are F.linear in float32 (x rounded to bf16 for a BF16 weight). Q8 and Q4 multiply the
dequantized weight by x quantized to int8 in blocks of 32 along K (`quantize_activations`), as llama.cpp's
Q8_0 / Q4_1 dot products do: the kernel's products are then integer (AVX512_VNNI). `reference` models both.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

# Above this many rows (prefill), oneDNN's blocked GEMM on the dequantized weight is faster than re-running
# the GEMV per row: the GEMV reads W once per call but does only 1 FMA per weight per row.
MAX_GEMV_ROWS = 8
# Whether oneDNN has AVX512_BF16, for the quantized layers' prefill GEMM (plan.py, GemvLinear.forward)
PREFILL_BF16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
_PREFILL_SCRATCH = threading.local()  # .weight: the dense bfloat16 weight of the last quantized prefill GEMM

try:
    from llava_fast import _C

    NATIVE = hasattr(_C, "gemv")
except ImportError:  # built without a C++ toolchain: the torch path
    _C, NATIVE = None, False

# The weight formats and activation dtypes are defined once, in csrc/gemv.h, and read from the extension.
# Without it no native code reads the numbers; the torch path only needs them distinct.
_FORMAT_IDS = _C.WEIGHT_FORMATS if NATIVE else {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}
F32, BF16, Q8, Q4 = (_FORMAT_IDS[name] for name in ("float32", "bfloat16", "int8", "int4"))
FORMAT_NAMES = {format_id: name for name, format_id in _FORMAT_IDS.items()}
_ACT_DTYPES = {getattr(torch, name): dtype_id for name, dtype_id in _C.ACTIVATION_DTYPES.items()} if NATIVE else {}


def pack_q8(q):
    """q (N, K) integers in -127..127 -> uint8 (N, K) offset-binary (q + 128), the form VPDPBUSD multiplies."""
    return (q.to(torch.int16) + 128).to(torch.uint8).contiguous()


def quantize_activations(x, block=32):
    """x (M, K) float -> its int8 block quantization, dequantized, float32 (M, K): what the Q8/Q4 kernels
    multiply the weight by. Per block of 32 along K (the last one may be shorter): scale = max|x| / 127,
    x_q = round-half-even(x / scale) (0 where the block is all zero); returns x_q * scale."""
    M, K = x.shape
    pad = -K % block
    xb = F.pad(x.float(), (0, pad)).view(M, -1, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(xb / scale), torch.zeros(()))
    return (q * scale).view(M, -1)[:, :K]


def pack_q4(q, scale, minimum):
    """q (N, K) integers in 0..15, scale/minimum (N, K/group) -> (packed uint8 (N, K/2), fp16 scale, fp16 min)."""
    N, K = q.shape
    blocks = q.to(torch.uint8).view(N, K // 32, 2, 16)  # each 32-block: weights 0..15 and 16..31
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)
    return packed.contiguous(), scale.to(torch.float16).contiguous(), minimum.to(torch.float16).contiguous()


def unpack_q4(packed):
    """(N, K/2) uint8 -> q (N, K) uint8 in 0..15 (pack_q4's inverse)."""
    N = packed.shape[0]
    blocks = packed.view(N, -1, 1, 16)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(N, -1)


class GemvLinear(nn.Module):
    """A bias-free linear layer over a packed weight (see the module docstring). Inference only."""

    plan = None  # its model's CpuPlan (plan.use sets it); None, a layer of no model: torch's threads, every path

    def __init__(self, fmt, weight, scale=None, minimum=None, group=None, out_dtype=torch.float32):
        super().__init__()
        self.format, self.group = fmt, group
        self.out_features = weight.shape[0]
        self.in_features = weight.shape[1] * (2 if fmt == Q4 else 1)
        self.out_dtype = out_dtype  # the compute dtype of the model (activations and the dequantized weight)
        # Named `weight` so a float layer's state_dict and parameters stay nn.Linear's (bench baselines and
        # checkpoint writers read them); a quantized layer's `weight` is its packed integer data.
        if fmt in (F32, BF16) and isinstance(weight, nn.Parameter) and weight.is_contiguous():
            self.weight = weight  # the model's own Parameter: a tied lm_head stays the embedding table itself
        elif fmt in (F32, BF16):
            self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        else:
            self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", None if scale is None else scale.contiguous())
        self.register_buffer("minimum", None if minimum is None else minimum.contiguous())

    @classmethod
    def from_float(cls, weight):
        """Wrap a float32 or bfloat16 (N, K) weight as is (no copy; a Parameter stays the same Parameter, so
        tied embeddings stay one tensor, counted once in parameters())."""
        fmt = {torch.float32: F32, torch.bfloat16: BF16}[weight.dtype]
        return cls(fmt, weight, out_dtype=weight.dtype)

    @property
    def threads(self):
        """The native kernels' threads: the plan's (a torch decode step runs torch's own ops on one thread)."""
        return torch.get_num_threads() if self.plan is None else self.plan.threads

    @property
    def nbytes(self):
        """Bytes one call reads from memory: the packed weight and its scales."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.minimum) if t is not None)

    def dequantized(self, dtype=None, out=None):
        """The weight as a dense (N, K) tensor of `dtype` (default: the model's compute dtype); into `out`
        (a CPU tensor of N * K elements or more) when given and the native path applies."""
        dtype = dtype or self.out_dtype
        w = self.weight
        if self.format in (F32, BF16):
            return w.to(dtype)
        # One pass (csrc/dequantize.cpp); not while torch.compile traces (compile=True): it cannot trace a call
        # on raw pointers, and the torch ops below are what it fuses.
        if NATIVE and w.device.type == "cpu" and dtype in _ACT_DTYPES and not torch.compiler.is_compiling():
            size = self.out_features * self.in_features
            if out is None or out.dtype != dtype or out.numel() < size:
                out = torch.empty(size, dtype=dtype)
            out = out.view(-1)[:size].view(self.out_features, self.in_features)
            s, m = self.scale, self.minimum
            _C.dequantize(w.data_ptr(), self.format, self.out_features, self.in_features, self.group or 0,
                          s.data_ptr(), 0 if m is None else m.data_ptr(), out.data_ptr(), _ACT_DTYPES[dtype],
                          self.threads)
            return out
        if self.format == Q8:
            return ((w.float() - 128) * self.scale.view(-1, 1)).to(dtype)
        q = unpack_q4(w).float().view(self.out_features, -1, self.group)
        return (q * self.scale.float().unsqueeze(-1) + self.minimum.float().unsqueeze(-1)).reshape(
            self.out_features, self.in_features).to(dtype)

    def forward(self, x):
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        native, prefill_bf16 = (NATIVE, PREFILL_BF16) if self.plan is None else (self.plan.gemv, self.plan.prefill_bf16)
        if (native and x.device.type == "cpu" and 0 < rows <= MAX_GEMV_ROWS and x.dtype in _ACT_DTYPES
                and x.shape[-1] == self.in_features and not torch.compiler.is_compiling()):
            return gemv(x, self)
        if self.format in (Q8, Q4) and x.device.type == "cpu" and prefill_bf16 and not torch.compiler.is_compiling():
            # Prefill (a GEMM) of a quantized layer: on AVX512_BF16 oneDNN's bfloat16 GEMM runs at 2-2.5x its
            # float32 rate, and the weight is a rounding of 4-8-bit values anyway; x is rounded to bfloat16.
            # The dense weight goes into a buffer kept per thread: a fresh (N, K) tensor each call costs ~1 ms
            # of page faults per 3.5 MB, 10x the dequantization itself (SmolLM2's gate/up, 2 cores).
            scratch = getattr(_PREFILL_SCRATCH, "weight", None)
            w = self.dequantized(torch.bfloat16, out=scratch)
            if scratch is None or w.data_ptr() != scratch.data_ptr():
                _PREFILL_SCRATCH.weight = w.view(-1)
            return F.linear(x.to(torch.bfloat16), w).to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self):
        g = f", group={self.group}" if self.format == Q4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {FORMAT_NAMES[self.format]}{g}"


@contextlib.contextmanager
def torch_one_thread():
    """torch's ops on the calling thread alone, for the block: no OpenMP region starts, so torch's OpenMP workers,
    which spin for milliseconds after each region, do not take the cores from the native pools (gemv.cpp's).

    A native decode step of 16 rows (tiny, bfloat16, AMX, 2 threads, Sapphire Rapids) ran 4.0 ms at 8 keys per
    row and 6.4 ms at 400 after one 2-thread torch op per step (the embedding rows' gather; a sampler's argmax
    does the same), against 2.7 and 4.6 ms with torch on one thread: the idle worker's spin took a quarter of
    the 2 cores' samples, for as long as the step ran.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def decode_threads(plan):
    """Around a torch decode step on the CPU: torch's own ops run on one thread, the GEMVs on the plan's threads.

    At batch 1 the torch ops between GEMVs (norms, RoPE, attention over one query) are microseconds long; on
    several threads their OpenMP workers spin against the GEMV pool's for the same cores. SmolLM2-135M int4,
    2 threads, busy 2-core host: 0.9 tok/s with both pools, 4-5 tok/s with torch on one thread (same run).
    """
    if plan is None or not plan.gemv:
        yield
        return
    with torch_one_thread():
        yield


def gemv(x, layer: GemvLinear, threads=None):
    """x (..., K) float32/bfloat16 on the CPU -> (..., N) of x's dtype, through the native kernel."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], layer.out_features
    y = torch.empty(M, N, dtype=x.dtype)
    s, m = layer.scale, layer.minimum
    _C.gemv(x2.data_ptr(), _ACT_DTYPES[x.dtype], M, x2.stride(0), layer.weight.data_ptr(), layer.format, N,
            layer.in_features, layer.group or 0, 0 if s is None else s.data_ptr(), 0 if m is None else m.data_ptr(),
            y.data_ptr(), N, threads or layer.threads)
    return y.view(*x.shape[:-1], N)


def _prefill_gemm_operands(name, x, layer, fmt, fmt_name):
    """The checks both prefill GEMM entries make -> (x contiguous, an empty (M, N) float32 output)."""
    if (not isinstance(x, torch.Tensor) or not isinstance(layer, GemvLinear) or layer.format != fmt
            or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != layer.in_features
            or x.shape[0] == 0):
        raise ValueError(f"{name}: x must be a float32 CPU tensor (M, K), M >= 1, and the layer an {fmt_name} "
                         "GemvLinear with K input features")
    return x.contiguous(), torch.empty(x.shape[0], layer.out_features, dtype=torch.float32)


def gemm_q4(x, layer: GemvLinear, threads=None):
    """x (M, K) float32 on the CPU @ an int4 layer's weight^T -> (M, N) float32 through the prefill GEMM
    (csrc/gemm_q4.cpp): `reference`'s numbers, in an order of its own (not the GEMV's bits), the same bits for
    a row whatever the other rows. The native prefill runs it; this entry is for tests and benchmarks."""
    x, y = _prefill_gemm_operands("gemm_q4", x, layer, Q4, "int4")
    M, N = y.shape
    _C.gemm_q4(x.data_ptr(), M, x.stride(0), layer.weight.data_ptr(), N, layer.in_features, layer.group,
               layer.scale.data_ptr(), layer.minimum.data_ptr(), y.data_ptr(), N,
               threads or layer.threads)
    return y


def gemm_q8(x, layer: GemvLinear, threads=None):
    """x (M, K) float32 on the CPU @ an int8 layer's weight^T -> (M, N) float32 through the prefill GEMM
    (csrc/gemm_q8.cpp): `reference`'s numbers, in an order of its own (not the GEMV's bits), the same bits for
    a row whatever the other rows, the thread count or the kernel table. The native prefill runs it; this entry
    is for tests and benchmarks."""
    x, y = _prefill_gemm_operands("gemm_q8", x, layer, Q8, "int8")
    M, N = y.shape
    _C.gemm_q8(x.data_ptr(), M, x.stride(0), layer.weight.data_ptr(), N, layer.in_features, layer.scale.data_ptr(),
               y.data_ptr(), N, threads or layer.threads)
    return y


def reference(x, layer: GemvLinear):
    """The torch oracle of the kernel: float32 F.linear on the dequantized weight of x as the kernel reads it:
    rounded to bf16 for a BF16 weight (VDPBF16PS), int8-quantized per 32-block for Q8/Q4 (VPDPBUSD)."""
    if layer.format == BF16:
        x32 = x.to(torch.bfloat16).float()
    elif layer.format in (Q8, Q4):
        x32 = quantize_activations(x.reshape(-1, x.shape[-1])).view(x.shape)
    else:
        x32 = x.float()
    return F.linear(x32, layer.dequantized(torch.float32))
