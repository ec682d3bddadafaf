"""Weight-only quantization of the language model, for `load(..., quantize=...)` and `--quantize`.

In: a LlavaForCausalLM in its compute dtype and a scheme name. Out: the same module, changed in place: every
nn.Linear of the decoder layers (q/k/v/o, gate/up/down) and lm_head becomes a `gemv.GemvLinear` holding the
quantized weight (lm_head in int8 under the int4 schemes too, see below); activations, norms, the embedding
table, the vision tower and the projector stay in the compute dtype.

Schemes (bits read per weight at decode in brackets; llama.cpp's nearest format after it):
- `int8wo` [8 + 32/K]: symmetric int8 per output row, one float32 scale per row (Q8_0: 8.5).
- `int4wo-<group>` [4 + 32/group]: asymmetric 4-bit groups of <group> consecutive input channels, a float16
  scale and min per group, W = q * scale + min, q in 0..15 (Q4_1 at group 32: 5 bits). group is 32, 64, 128
  or 256 and must divide every quantized layer's in_features (SmolLM2's 576 allows 32 and 64 only).
The quantization parameters are torchao's (symmetric per-channel int8: `dynamically_quantize_per_channel`;
int4: `get_groupwise_affine_qparams` / `groupwise_affine_quantize_tensor_from_qparams`, tinygemm's
float-domain zero point, W = (q - 8) * scale + zero, i.e. min = zero - 8 * scale). The matmuls are ours
(csrc/gemv.cpp), because torchao 0.18's CPU paths dequantize the whole weight each call (int8) or run aten's
int4 kernel at <1 GB/s at batch 1: both slower than the unquantized model (measurements in gemv.cpp).
On a GPU the same layers run F.linear on the dequantized weight (correct, not fast: not yet measured or
tuned on a GPU).

Tied embeddings: lm_head gets its own quantized copy and the embedding keeps the compute-dtype table (it
gathers rows), as llama.cpp does with token_embd/output.

lm_head stays int8 under int4wo-<group>, as llama.cpp keeps its output (or tied token_embd) tensor at Q8_0/Q6_K
in its Q4_0/Q4_1 files (SmolLM2's: Q8_0). On SmolLM2-135M, whose decoder weights come from a Q4_1 file and so
re-quantize to int4 at group 32 almost exactly, an int4 lm_head was the model's main error (9% relative on its
weight): with it int8, int4wo-32's perplexity on 2,048 tokens went 20.5 -> 19.7 (float32 19.7) and its top-1
agreement with float32 83.7% -> 97.0% (`llava-fast bench real`), for 11 of a token's ~95 MB of reads.

Errors: an unknown scheme or a group size that does not fit raises InputError; torchao missing raises
InputError naming the pip command. Reference: torchao (https://github.com/pytorch/ao).
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn

from llava_fast.cpu import plan as cpu_plan
from llava_fast.cpu.gemv import BF16, F32, Q4, Q8, GemvLinear, pack_q4, pack_q8
from llava_fast.errors import InputError

INT4_GROUP_SIZES = (32, 64, 128, 256)
SCHEMES_HELP = "int8wo, int4wo-32, int4wo-64, int4wo-128 or int4wo-256"


def parse_scheme(scheme: str) -> tuple[int, int | None]:
    """'int8wo' -> (8, None); 'int4wo-<group>' -> (4, group). InputError for anything else."""
    if scheme == "int8wo":
        return 8, None
    m = re.fullmatch(r"int4wo-(\d+)", str(scheme))
    if m is None:
        raise InputError(f"unknown quantization scheme {scheme!r}: expected {SCHEMES_HELP}")
    group = int(m.group(1))
    if group not in INT4_GROUP_SIZES:
        raise InputError(f"quantization {scheme!r}: int4 group size {group} is not supported; expected one of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    return 4, group


def language_model_linears(net) -> dict[str, nn.Module]:
    """The layers a scheme replaces, by name: the decoder layers' projections and lm_head."""
    found = {f"language_model.{name}": m for name, m in net.language_model.named_modules()
             if isinstance(m, (nn.Linear, GemvLinear))}
    found["lm_head"] = net.lm_head
    return found


def _torchao_utils():
    # torchao's first import logs a warning for each CUDA-only library it cannot load on a CPU build of torch
    # ("Failed to load ..._C_cutlass_90a.abi3.so", "_C_mxfp8") and torch two deprecation notes about its enums:
    # noise for everyone who quantizes on a CPU, none of it about what we use. Quiet for that import only.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import utils
    except ImportError as e:
        raise InputError(f"quantization needs torchao, which is not importable ({e}); install it with "
                         "`pip install torchao` (or `pip install -e .[quant]` in a llava-fast checkout)") from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return utils


def quantize_weight(weight, bits, group=None) -> GemvLinear:
    """(N, K) float weight -> a GemvLinear holding it as int8 rows (bits 8) or int4 groups (bits 4)."""
    utils = _torchao_utils()
    w = weight.detach().float()
    if bits == 8:
        q, scale, _ = utils.dynamically_quantize_per_channel(w, -127, 127, torch.int8)
        return GemvLinear(Q8, pack_q8(q), scale.float(), out_dtype=weight.dtype)
    scale, zero = utils.get_groupwise_affine_qparams(w, 4, group, dtype=torch.float32)
    q = utils.groupwise_affine_quantize_tensor_from_qparams(w, scale, zero, 4, group)
    return GemvLinear(Q4, *pack_q4(q, scale, zero - 8 * scale), group=group, out_dtype=weight.dtype)


def _replace(net, name, layer):
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, layer)


def quantize_language_model(net, scheme: str):
    """Quantize `net`'s language-model linear layers in place with `scheme` (module docstring). Returns net."""
    bits, group = parse_scheme(scheme)
    linears = language_model_linears(net)
    if any(isinstance(m, GemvLinear) and m.format in (Q8, Q4) for m in linears.values()):
        raise InputError("this model is already quantized")
    if group is not None:
        bad = [(name, m.in_features) for name, m in linears.items() if m.in_features % group]
        if bad:
            name, k = bad[0]
            fits = [g for g in INT4_GROUP_SIZES if all(m.in_features % g == 0 for m in linears.values())]
            raise InputError(f"quantization {scheme!r}: {name} has {k} input channels, not a multiple of the "
                             f"group size {group}" + (f"; use int4wo-{fits[-1]}" if fits else ""))
    _torchao_utils()  # fail before touching the model
    with torch.no_grad():
        for name, layer in linears.items():
            weight = layer.dequantized() if isinstance(layer, GemvLinear) else layer.weight
            if name == "lm_head" and bits == 4:  # int8, as llama.cpp's Q4 files keep output.weight (docstring)
                _replace(net, name, quantize_weight(weight, 8))
            else:
                _replace(net, name, quantize_weight(weight, bits, group))
    net.quantization = scheme
    return net


def use_native_gemv(net):
    """CPU, float32/bfloat16 weights: route the language model's linear layers through the native GEMV at
    decode (GemvLinear shares the weight tensors: no copy). PyTorch 2.13's bfloat16 F.linear reads ~1 GB/s
    at batch 1 on the CPU; the GEMV streams at memory speed. Returns net."""
    for name, layer in language_model_linears(net).items():
        if isinstance(layer, nn.Linear) and layer.bias is None and layer.weight.dtype in (torch.float32,
                                                                                       torch.bfloat16):
            _replace(net, name, GemvLinear.from_float(layer.weight))
    return net


def prepare_for_inference(net, quantize=None, compile=False):
    """What load() does after reading the weights: quantize (a scheme name) or, where the model's CPU plan runs
    the native GEMV, route the float linear layers through it (not with compile=True: torch.compile traces
    F.linear instead; a quantized layer there runs F.linear on its dequantized weight); then keep the plan on
    the model (plan.py). Returns net."""
    if quantize is not None:
        quantize_language_model(net, quantize)
    plan = cpu_plan.make(net, compile=compile)
    if quantize is None and plan.gemv and not compile:
        use_native_gemv(net)  # the native step takes float nn.Linear layers too: the plan holds as made
    cpu_plan.use(net, plan)
    return net


def weight_bytes_per_token(net) -> int:
    """Bytes of weights one decode step reads: decoder linears and lm_head as stored, norms (the embedding
    table is read one row per token: not counted)."""
    total = 0
    for m in language_model_linears(net).values():
        total += m.nbytes if isinstance(m, GemvLinear) else m.weight.numel() * m.weight.element_size()
    for name, p in net.language_model.named_parameters():
        if "norm" in name:
            total += p.numel() * p.element_size()
    return total


__all__ = ["F32", "BF16", "parse_scheme", "prepare_for_inference", "quantize_language_model", "quantize_weight",
           "use_native_gemv", "weight_bytes_per_token"]
