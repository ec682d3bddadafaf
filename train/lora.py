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


class LoraLinear(nn.Module):
    """A linear layer (LLaMA's, bias-free unless attention_bias / mlp_bias) with a low-rank adapter."""

    def __init__(self, weight: nn.Parameter, r: int, alpha: float, dropout: float, bias: nn.Parameter | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.weight = weight  # the base layer's own parameters, frozen
        self.bias = bias
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):  # (..., in) -> (..., out)
        adapter = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + adapter * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in float32."""
        return self.weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())


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
