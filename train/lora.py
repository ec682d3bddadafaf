"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the decoder's linear layers.

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        W (out, in) frozen; A (r, in), B (out, r) trained

B starts at zero, so training starts exactly at the base model. As LLaVA-1.5's LoRA recipe (r 128, alpha 256,
dropout 0.05), every linear layer of the LLM gets an adapter (q/k/v/o and gate/up/down; not lm_head), and the
projector trains in full beside them. Each targeted nn.Linear is replaced by a LoraLinear that keeps the
`weight` parameter under the same name, so checkpoint names do not change; `merge_lora` folds the adapters
back into plain nn.Linear weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The merged form (_MergedLoraLinear: one GEMM on W + s B A) only on weights up to 512 x 512. Its backward forms
# dW' = dy^T x, a full weight-gradient GEMM that the two-path form does without (it has rank-r GEMMs there).
# Forward + backward of one layer at r 16, merged / two-path time, float32 (bfloat16), 2 Sapphire Rapids cores:
# 1280 rows x 512x512 0.83x (0.88x), 512x256 1.15x (0.78x), 512x1376 1.22x (1.02x); 640 rows x 4096x4096
# 1.98x (2.73x), 4096x11008 1.84x (2.83x), and 4096x4096 at r 128 1.97x (2.49x).
MERGED_MAX_WEIGHT = 512 * 512


class LoraLinear(nn.Module):
    """A linear layer (LLaMA's, bias-free unless attention_bias / mlp_bias) with a low-rank adapter."""

    def __init__(self, weight: nn.Parameter, r: int, alpha: float, dropout: float, bias: nn.Parameter | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight  # the base layer's own parameters, frozen
        self.bias = bias
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):  # (..., in) -> (..., out)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        no_dropout = isinstance(self.dropout, nn.Identity) or not self.training
        # the shape from the layer, not from self.weight: a weight widened on use (the trainer's float32 runs of a
        # half-precision checkpoint) is made each time it is read
        if no_dropout and self.in_features * self.out_features <= MERGED_MAX_WEIGHT:  # one GEMM on W + s B A
            return _MergedLoraLinear.apply(x, self.weight, self.bias, A, B, self.scaling)
        # the adapter's output added by the GEMM itself (addmm's beta), its scale folded into the (out, r) B: at
        # 7B shapes a separate scale and sum are two passes over (tokens, out) forward and one more backward
        h = F.linear(self.dropout(x), A)  # (..., r)
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), (B * self.scaling).t()).view(y.shape)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in float32."""
        return self.weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())


class _MergedLoraLinear(torch.autograd.Function):
    """x (W + s B A)^T + bias, and its backward through the merged weight:

        dx = dy (W + s B A)        dW' = dy^T x (out, in)        dA = s B^T dW'        dB = s dW' A^T

    The adapter's path alone is four skinny GEMMs (x A^T, (.) B^T and their two gradients each) of rank r
    beside the base GEMM; on the CPU in bfloat16 a (1280, 512) x (512, 16) GEMM costs about as much as the
    (1280, 512) x (512, 512) one, so a 512 x 512 layer is faster merged. Larger weights are not
    (MERGED_MAX_WEIGHT): forward + backward is three full GEMMs merged, two in the two-path form (no dW').
    The merged weight (out x in) is recomputed in backward rather than kept. Exact in real arithmetic; in
    floating point the roundings differ from the two-path form (the merged weight is rounded to the weight's
    dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling):
        merged = torch.addmm(weight, B, A, alpha=scaling)  # (out, in)
        ctx.save_for_backward(x, weight, A, B)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        dx = grad @ torch.addmm(weight, B, A, alpha=s) if ctx.needs_input_grad[0] else None
        dy, xs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)
        d_merged = dy.t() @ xs  # (out, in)
        dweight = d_merged if ctx.needs_input_grad[1] else None
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dA = (B.t() @ d_merged).mul_(s) if ctx.needs_input_grad[3] else None  # (r, in)
        dB = (d_merged @ A.t()).mul_(s) if ctx.needs_input_grad[4] else None  # (out, r)
        return dx, dweight, dbias, dA, dB, None


def lora_layers(net):
    """(name, parent module, attribute) of every linear layer LoRA targets in the decoder."""
    for name, module in net.language_model.layers.named_modules():
        for attr in TARGETS:
            child = getattr(module, attr, None)
            if isinstance(child, (nn.Linear, LoraLinear)):
                yield f"language_model.layers.{name}.{attr}", module, attr


def add_lora(net, r: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Replace the decoder's linear layers by LoraLinear (in place); returns the names of the new parameters.
    A is drawn from a generator seeded with `seed`, so the adapters do not depend on global RNG use."""
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {r}")
    names = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, parent, attr in list(lora_layers(net)):
            base = getattr(parent, attr)
            if isinstance(base, LoraLinear):
                raise ValueError(f"{name} already has a LoRA adapter")
            base.requires_grad_(False)
            setattr(parent, attr, LoraLinear(base.weight, r, alpha, dropout, base.bias))
            names += [f"{name}.lora_A", f"{name}.lora_B"]
    return names


def merge_lora(net) -> list[str]:
    """Fold every adapter into its weight (float32 arithmetic, stored in the weight's dtype) and put plain
    nn.Linear layers back; returns the names of the merged weights."""
    merged = []
    for name, parent, attr in list(lora_layers(net)):
        layer = getattr(parent, attr)
        if not isinstance(layer, LoraLinear):
            continue
        with torch.no_grad():
            weight = layer.merged_weight().to(layer.weight.dtype)
        out_features, in_features = weight.shape
        with torch.device("meta"):
            plain = nn.Linear(in_features, out_features, bias=layer.bias is not None)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        plain.bias = layer.bias
        setattr(parent, attr, plain)
        merged.append(f"{name}.weight")
    return merged
