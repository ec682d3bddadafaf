"""The fusable operations of LLaVA, and the one place that picks their implementation.

Every function here is the plain-PyTorch reference: it is the CPU path, and it is the oracle the Triton
kernels in `llava_fast.kernels` are tested against. `llava_fast/model.py` calls only these names at the
points where a fused kernel pays off, so switching the backend never touches the model code.

Backend: `LLAVA_FAST_KERNELS=triton|torch`, read once at import. Default: triton when CUDA is available,
torch otherwise. `triton` on a CPU runs the same kernels through Triton's interpreter (TRITON_INTERPRET=1
must be set before triton is imported; `llava_fast/__init__.py` does that when asked for triton on a CPU).

Shapes use B batch, T tokens, H query heads, Hkv key/value heads, D head dim, C channels.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------
# Normalisation and activations
# ------------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps, residual=None):
    """LLaMA RMSNorm with the residual add fused in front.

    Returns (normed, hidden): hidden = x + residual (x itself when residual is None) is the new residual
    stream; normed = weight * hidden / rms(hidden), computed in fp32 and cast back as LLaMA does.
    """
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(hidden.dtype), hidden


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def swiglu(gate, up):
    """SwiGLU's elementwise half: silu(gate) * up."""
    return F.silu(gate) * up


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


# ------------------------------------------------------------------------------------------------------
# Vision embedding and the projector splice
# ------------------------------------------------------------------------------------------------------


def patch_embed(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps):
    """CLIP's embeddings + pre_layrnorm: the first encoder layer's input.

    pixel_values (N, 3, S, S); patch_weight (C, 3, P, P) (CLIP's conv has no bias); class_embedding (C,);
    position_embedding (1 + (S/P)^2, C). Returns (N, 1 + L, C), L = (S/P)^2.
    """
    patches = F.conv2d(pixel_values.to(patch_weight.dtype), patch_weight, stride=patch_weight.shape[-1])
    patches = patches.flatten(2).transpose(1, 2)  # (N, L, C)
    cls = class_embedding.expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + position_embedding
    return F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)


def project_image_features(features, w1, b1, w2=None, b2=None):
    """LLaVA's projector: linear (v1, w2 None) or Linear-GELU-Linear (mlp2x_gelu, LLaVA-1.5)."""
    x = F.linear(features, w1, b1)
    if w2 is not None:
        x = F.linear(F.gelu(x), w2, b2)
    return x


def splice_image_embeddings(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2=None, b2=None):
    """The decoder's input embeddings: text rows gathered from the table, image rows projected.

    input_ids (B, T); embed_weight (V, C); image_features (K, Nimg, Cv): K images in the order their
    token runs appear in input_ids (row-major), each filling Nimg consecutive image-token positions.
    Returns (B, T, C). The caller checks that the number of image positions equals K * Nimg.
    """
    is_image = input_ids == image_token_id
    embeds = F.embedding(input_ids.masked_fill(is_image, 0), embed_weight)
    if image_features is None or image_features.shape[0] == 0:
        return embeds
    projected = project_image_features(image_features, w1, b1, w2, b2).to(embeds.dtype)
    return embeds.masked_scatter(is_image.unsqueeze(-1), projected.reshape(-1, embeds.shape[-1]))


# ------------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim, theta, scaling=None, device=None):
    """RoPE's (head_dim // 2,) fp32 inverse frequencies theta^(-2i/D), rescaled as `scaling` says:

    - None: LLaMA's RoPE (Su et al. 2021);
    - {"rope_type": "linear", "factor": s}: every frequency / s (position interpolation, Chen et al. 2023);
    - {"rope_type": "llama3", "factor": s, "low_freq_factor": l, "high_freq_factor": h,
      "original_max_position_embeddings": N} (Meta's LLaMA-3.1 code, as transformers' llama3 RoPE): wavelengths
      2pi/f longer than N/l are slowed by s, those shorter than N/h kept, and those between interpolated
      linearly in N/wavelength from one to the other.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high, context = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling[
        "original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)  # 0 at wavelength N/l, 1 at N/h
    between = (1 - smooth) * slowed / factor + smooth * slowed
    in_between = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(in_between, between, slowed)


def rope_tables(head_dim, max_positions, theta, device=None, scaling=None):
    """cos, sin of shape (max_positions, head_dim // 2), fp32, for RoPE with `rope_inv_freq`'s frequencies."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device)
    freqs = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin, positions):
    """Non-interleaved ("rotate_half") RoPE. x (B, T, H, D); cos/sin (Tmax, D/2) fp32; positions (B, T)."""
    c = cos[positions].unsqueeze(2).to(x.dtype)  # (B, T, 1, D/2)
    s = sin[positions].unsqueeze(2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _sdpa_gqa(q, k, v, mask):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), boolean mask broadcastable to (B, 1, Tq, Tk), True = attend.

    PyTorch's SDPA with enable_gqa reads each K/V head once for its query group instead of repeating K/V in
    memory (on the tiny CPU preset that is the difference between 0.9x and 1.0x transformers' decode speed).
    Query rows with no key to attend to (padding) come out as zeros.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


def rotary_cached_attention(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens):
    """Causal attention of new tokens against a static KV cache, RoPE applied, K/V written in place.

    q (B, T, H, D), k/v (B, T, Hkv, D) not yet rotated; cos/sin (Tmax, D/2) fp32;
    k_cache/v_cache (B, Hkv, Tmax, D), written in place; start_pos (B,) int: tokens already cached per
    row; seq_lens (B,) int: valid new tokens per row (<= T; the rest of the row is padding).
    Row b's token i sits at position start_pos[b] + i and attends to cache positions [0, start_pos[b] + i].
    Prefill is start_pos = 0; decode is T = 1, seq_lens = 1. Returns (B, T, H, D); padded query rows are 0.
    """
    B, T = q.shape[:2]
    positions = start_pos.view(B, 1).long() + torch.arange(T, device=q.device).view(1, T)  # (B, T)
    q, k = apply_rope(q, cos, sin, positions), apply_rope(k, cos, sin, positions)
    valid = torch.arange(T, device=q.device).view(1, T) < seq_lens.view(B, 1)  # (B, T)
    if T == 1 and bool((seq_lens == 1).all()):  # decode: every row writes its one token, no nonzero() needed
        rows, cols = torch.arange(B, device=q.device), torch.zeros(B, dtype=torch.long, device=q.device)
    else:
        rows, cols = valid.nonzero(as_tuple=True)  # the valid tokens; padding never reaches the cache
    k_cache[rows, :, positions[rows, cols]] = k[rows, cols].to(k_cache.dtype)  # (N, Hkv, D) each side
    v_cache[rows, :, positions[rows, cols]] = v[rows, cols].to(v_cache.dtype)
    if T > 1 and not bool(start_pos.any()) and bool((seq_lens == T).all()):
        # A fresh, unpadded prefill: the keys are exactly the new tokens, so SDPA's causal kernel applies
        # (no (B, T, T) mask to build; 266 -> 2xx ms time to first token at 1024 tokens on the tiny CPU preset).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    Tk = int((start_pos + seq_lens).max())
    key_pos = torch.arange(Tk, device=q.device).view(1, 1, Tk)
    mask = (key_pos <= positions.unsqueeze(-1)) & valid.unsqueeze(-1)  # (B, T, Tk)
    out = _sdpa_gqa(q.transpose(1, 2), k_cache[:, :, :Tk], v_cache[:, :, :Tk], mask.unsqueeze(1))
    return out.transpose(1, 2)


def rotary_causal_attention(q, k, v, cos, sin):
    """Training attention: RoPE at positions 0..T-1, causal, no cache; differentiable.

    q (B, T, H, D), k/v (B, T, Hkv, D). Right padding needs no mask: a valid token never sees a later one.
    """
    B, T = q.shape[:2]
    positions = torch.arange(T, device=q.device).expand(B, T)
    q, k = apply_rope(q, cos, sin, positions), apply_rope(k, cos, sin, positions)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return _sdpa_gqa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal).transpose(1, 2)


def vision_attention(q, k, v):
    """Non-causal attention for the CLIP encoder. q/k/v (N, T, H, D) -> (N, T, H, D)."""
    mask = torch.ones(1, 1, dtype=torch.bool, device=q.device)
    return _sdpa_gqa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


# ------------------------------------------------------------------------------------------------------
# Training loss
# ------------------------------------------------------------------------------------------------------


def linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index=-100):
    """Mean next-token cross-entropy of lm_head(hidden) over labels != ignore_index.

    hidden (N, C), lm_head_weight (V, C), labels (N,) already shifted. The Triton version never
    materialises the (N, V) logits.
    """
    logits = F.linear(hidden, lm_head_weight).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


# ------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------

OP_NAMES = (
    "rms_norm", "layer_norm", "swiglu", "quick_gelu", "patch_embed", "splice_image_embeddings",
    "rotary_cached_attention", "rotary_causal_attention", "vision_attention", "linear_cross_entropy",
)
TORCH_OPS = {name: globals()[name] for name in OP_NAMES}


def default_backend():
    requested = os.environ.get("LLAVA_FAST_KERNELS", "").strip().lower()
    if requested in ("torch", "triton"):
        return requested
    if requested:
        raise ValueError(f"LLAVA_FAST_KERNELS={requested!r}: expected 'triton' or 'torch'")
    return "triton" if torch.cuda.is_available() else "torch"


def use_backend(name):
    """Rebind this module's op names to the chosen implementation ('torch' or 'triton')."""
    global BACKEND
    if name == "torch":
        table = TORCH_OPS
    elif name == "triton":
        from llava_fast.kernels import TRITON_OPS  # imported only when asked for: triton is optional

        table = {**TORCH_OPS, **TRITON_OPS}  # ops without a kernel yet keep the reference
    else:
        raise ValueError(f"unknown kernel backend {name!r}: expected 'triton' or 'torch'")
    globals().update(table)
    BACKEND = name


BACKEND = "torch"
