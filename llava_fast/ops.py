"""The fusable operations of LLaVA, registered as torch.library custom ops, and the one place that picks
their implementation.

Each op has a plain-PyTorch reference here (`<op>_reference`): it is the CPU path, and it is the oracle the
Triton kernels in `llava_fast.kernels` are tested against. Each op is registered as
`torch.ops.llava_fast.<op>` (a fake implementation for tracing, an autograd formula for training) whose
implementation is the active backend's; `llava_fast/model.py` calls only the functions at the end of this
file (`ops.<op>`), so switching the backend never touches the model code.

Backend: `LLAVA_FAST_KERNELS=triton|torch`, read once at import. Default: triton when CUDA is available,
torch otherwise. `triton` on a CPU runs the same kernels through Triton's interpreter (TRITON_INTERPRET=1
must be set before triton is imported; the end of this file does that when asked for triton on a CPU).

Shapes use B batch, T tokens, H query heads, Hkv key/value heads, D head dim, C channels.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------------------
# Normalisation and activations
# ------------------------------------------------------------------------------------------------------


def rms_norm_reference(x, weight, eps, residual=None):
    """LLaMA RMSNorm with the residual add fused in front.

    Returns (normed, hidden): hidden = x + residual (x itself when residual is None) is the new residual
    stream; normed = weight * hidden / rms(hidden), computed in fp32 and cast back as LLaMA does.
    """
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(hidden.dtype), hidden


class _RMSNormSavingStatistics(torch.autograd.Function):
    """rms_norm_reference for eager training with a hand-written backward. Autograd through the reference
    records ~8 ops per norm (add, cast, pow, mean, add, rsqrt, mul, cast, mul) and replays ~12 in backward,
    each a pass over the (B, T, C) rows, and keeps the normed rows alive until backward. This saves the
    residual stream `hidden` and rstd (B, T, 1) only, and backward is

        dn = dout * weight                      dweight = sum over rows of dout * n   (only when trained)
        dhidden = rstd * dn - hidden * rstd^3 * mean(dn * hidden)   (+ the residual stream's own gradient)

    in float32, cast once to hidden's dtype as the reference's autograd rounds it: five passes instead of ~12.
    The forward runs the reference's very ops, so the outputs are bitwise the reference's."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        hidden = x if residual is None else x + residual
        h32 = hidden.float()
        rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        normed = (h32 * rstd).to(hidden.dtype)
        ctx.save_for_backward(hidden, rstd, weight)
        ctx.has_residual = residual is not None
        out = weight * normed
        return (out, hidden) if ctx.has_residual else out  # without a residual the stream is x itself

    @staticmethod
    def backward(ctx, grad_out, grad_hidden=None):
        hidden, rstd, weight = ctx.saved_tensors
        h32 = hidden.float()
        dweight = dhidden = None
        if grad_out is not None:
            dn32 = (grad_out * weight).float()  # (..., C), as the reference's mul backward, then its cast
            if ctx.needs_input_grad[1]:
                normed = (h32 * rstd).to(hidden.dtype)
                dweight = (grad_out * normed).sum_to_size(weight.shape)
            coef = (dn32 * h32).sum(-1, keepdim=True).mul_(rstd.pow(3) / hidden.shape[-1])  # (..., 1)
            dhidden = torch.addcmul(dn32 * rstd, h32, coef, value=-1).to(hidden.dtype)
        if grad_hidden is not None:
            dhidden = grad_hidden if dhidden is None else dhidden.add_(grad_hidden)
        return dhidden, dweight, None, dhidden if ctx.has_residual else None


def layer_norm_reference(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def swiglu_reference(gate, up):
    """SwiGLU's elementwise half: silu(gate) * up."""
    return F.silu(gate) * up


class _SwiGLUSavingInputs(torch.autograd.Function):
    """swiglu_reference for eager training, saving only gate and up: autograd through the reference also keeps
    silu(gate), one more (B, T, intermediate) tensor per decoder layer until backward (7 MiB per layer at
    B*T = 1280 on the tiny preset, float32). Backward recomputes silu(gate) (one elementwise pass) and then
    runs the very ops autograd runs for the reference, so the gradients are bitwise the reference's."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_up = grad * F.silu(gate)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return d_gate, d_up


# Training with the optimizer's step inside backward (the trainer's OptimizerInBackward): a float32 weight's
# gradient goes to weight_grad_sink(weight, lo, hi, rows' gradient) WEIGHT_GRAD_ROWS_PER_CHUNK output rows at a
# time, each formed after the last op that reads the weight and stepped at once, instead of one whole gradient
# returned to autograd: 16 MiB alive instead of 64 MiB for a 4096 x 4096 projection and 43 instead of 172 MiB for
# an 11008-wide MLP weight at LLaVA-1.5-7B, float32. A row chunk's GEMM dy[:, lo:hi]^T x gives the whole GEMM's
# rows bit for bit where the BLAS sums each element over the tokens in one order, as MKL does for 1024-row chunks
# at 640 and 2048 tokens (7B shapes, 2 threads; 256-row chunks of 512 x 512 at 2048 tokens split the token sum
# across threads and differ in the last bits). 1024: a multiple of 16 rows, the fused AdamW's unit, so the rows'
# updates are the whole tensor's (step_row_sparse in the trainer).
WEIGHT_GRAD_ROWS_PER_CHUNK = 1024


def weight_grad_rows_to_sink(sink, weight, dy, x):
    """The gradient dy^T x of `weight` (out, in) to sink(weight, lo, hi, rows lo:hi) by WEIGHT_GRAD_ROWS_PER_CHUNK
    output rows; dy (N, out), x (N, in)."""
    for lo in range(0, weight.shape[0], WEIGHT_GRAD_ROWS_PER_CHUNK):
        hi = min(weight.shape[0], lo + WEIGHT_GRAD_ROWS_PER_CHUNK)
        sink(weight, lo, hi, dy[:, lo:hi].t() @ x)


class _LinearWeightGradToSink(torch.autograd.Function):
    """F.linear whose weight gradient goes to a sink by row chunks (weight_grad_rows_to_sink) after dx = dy W is
    formed (the sink steps W). dx and the bias gradient are autograd's own ops for F.linear, so they are its bits."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink):
        ctx.save_for_backward(x, weight)
        # the parameter itself for the sink (the step's key), not what unpacking the saved tensor gives
        ctx.sink, ctx.has_bias, ctx.weight = sink, bias is not None, weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dy = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dx = torch.mm(dy, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            weight_grad_rows_to_sink(ctx.sink, ctx.weight, dy, x.reshape(-1, x.shape[-1]))
        return dx, None, dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None, None


def linear_weight_grad_to_sink(x, linear, sink=None):
    """linear(x) for an nn.Linear; with a sink (and grad enabled) its weight's gradient goes to
    sink(weight, lo, hi, rows) inside backward (see WEIGHT_GRAD_ROWS_PER_CHUNK) instead of .grad."""
    if sink is None or not torch.is_grad_enabled():
        return linear(x)
    return _LinearWeightGradToSink.apply(x, linear.weight, linear.bias, sink)


class _SwiGLUMLPRecomputed(torch.autograd.Function):
    """The LLaMA MLP, down(silu(gate(x)) * up(x)), keeping only its input x for backward, which recomputes gate
    and up (one more pair of GEMMs) and the SwiGLU. Autograd through the three linears keeps gate, up and the
    SwiGLU output until backward: 3 x (rows, intermediate) per decoder layer, 20 MiB per layer at B*T = 1280
    on the tiny preset in float32 (120 MiB over its 6 layers, which stage 2's peak at the start of backward
    holds all at once), for 2 x 2 x rows x C x intermediate more FLOPs (+13% of a tiny stage-2 step). The
    gradients are formed by the ops autograd runs for the plain path (the SwiGLU's as _SwiGLUSavingInputs);
    dx sums the gate and up paths in one accumulating GEMM."""

    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down, weight_grad_sink=None):
        ctx.save_for_backward(x, w_gate, b_gate, w_up, b_up, w_down, b_down)
        # the parameters themselves, for the sink (the step's keys, not what unpacking the saved tensors gives); only
        # with one: a weight made for this op (the trainer's bf16 cast on use) must not be kept from forward
        ctx.sink, ctx.weights = weight_grad_sink, None if weight_grad_sink is None else (w_gate, w_up, w_down)
        return F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)

    @staticmethod
    def backward(ctx, grad):
        x, w_gate, b_gate, w_up, b_up, w_down, b_down = ctx.saved_tensors
        want = ctx.needs_input_grad
        p_gate, p_up, p_down = ctx.weights or (None, None, None)

        def out(weight, dy, x):  # a weight's gradient dy^T x, or to the sink by rows (then None)
            if ctx.sink is None:
                return dy.t() @ x
            weight_grad_rows_to_sink(ctx.sink, weight, dy, x)
            return None

        x2, dy = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (N, C), (N, C_out)
        gate, up = F.linear(x2, w_gate, b_gate), F.linear(x2, w_up, b_up)  # (N, I) each
        silu = F.silu(gate)
        d_h = dy @ w_down  # (N, I); before the sink may step w_down
        d_w_down = out(p_down, dy, silu * up) if want[5] else None  # (C_out, I)
        d_up = d_h * silu
        d_gate = torch.ops.aten.silu_backward(d_h * up, gate)
        del gate, up, silu, d_h
        dx = None
        if want[0]:
            dx = torch.mm(d_gate, w_gate).addmm_(d_up, w_up).view(x.shape)
        d_w_gate = out(p_gate, d_gate, x2) if want[1] else None  # after dx: the sink may step them
        d_w_up = out(p_up, d_up, x2) if want[3] else None
        return (dx, d_w_gate, d_gate.sum(0) if want[2] else None, d_w_up, d_up.sum(0) if want[4] else None,
                d_w_down, dy.sum(0) if want[6] else None, None)


def swiglu_mlp_recomputed(x, w_gate, b_gate, w_up, b_up, w_down, b_down, weight_grad_sink=None):
    """down(silu(gate(x)) * up(x)) for training, saving only x for backward (see _SwiGLUMLPRecomputed).
    weight_grad_sink(weight, lo, hi, rows): takes the three weights' gradients by row chunks as backward forms them
    (see WEIGHT_GRAD_ROWS_PER_CHUNK) instead of returning them to autograd together (3 x 172 MiB at LLaVA-1.5-7B
    float32)."""
    return _SwiGLUMLPRecomputed.apply(x, w_gate, b_gate, w_up, b_up, w_down, b_down, weight_grad_sink)


def quick_gelu_reference(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


# ------------------------------------------------------------------------------------------------------
# Vision embedding and the projector splice
# ------------------------------------------------------------------------------------------------------


def patch_embed_reference(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps):
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


def splice_image_embeddings_reference(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2=None,
                                      b2=None, sparse_grad=False):
    """The decoder's input embeddings: text rows gathered from the table, image rows projected.

    input_ids (B, T); embed_weight (V, C); image_features (K, Nimg, Cv): K images in the order their
    token runs appear in input_ids (row-major), each filling Nimg consecutive image-token positions.
    Returns (B, T, C). The caller checks that the number of image positions equals K * Nimg.
    sparse_grad: embed_weight's gradient is a sparse COO tensor of the B * T looked-up rows (nn.Embedding's
    sparse=True) instead of a dense (V, C) one.
    """
    is_image = input_ids == image_token_id
    embeds = F.embedding(input_ids.masked_fill(is_image, 0), embed_weight, sparse=sparse_grad)
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
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=bool(q.shape[1] != k.shape[1]))
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


def _window_mask(query_pos, Tk, window):
    """(..., Tq) query positions -> (..., Tq, Tk) boolean, True where key position j is in (pos - window, pos]
    (window 0: [0, pos], plain causal), as transformers' Mistral masks its sliding window."""
    key_pos = torch.arange(Tk, device=query_pos.device)
    mask = key_pos <= query_pos.unsqueeze(-1)
    return mask & (key_pos > query_pos.unsqueeze(-1) - window) if window else mask


def rotary_cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, start_pos=None, seq_lens=None,
                                      window=0):
    """Causal attention of new tokens against a static KV cache, RoPE applied, K/V written in place.

    q (B, T, H, D), k/v (B, T, Hkv, D) not yet rotated; cos/sin (Tmax, D/2) fp32;
    k_cache/v_cache (B, Hkv, Tmax, D), written in place; start_pos (B,) int: tokens already cached per
    row, None for an empty cache; seq_lens (B,) int: valid new tokens per row (<= T; the rest of the row
    is padding), None when every row's T tokens are valid.
    Row b's token i sits at position start_pos[b] + i and attends to cache positions [0, start_pos[b] + i],
    or with a sliding window (window > 0, Mistral) to the last `window` of them, (start_pos[b] + i - window,
    start_pos[b] + i].
    Prefill is start_pos = None; decode is T = 1, seq_lens = None. Returns (B, T, H, D); padded query rows
    are 0. What the caller knows on the host selects the path, so the two paths the decoder runs every
    token (decode, unpadded prefill) never read a tensor back to the host and trace whole under
    torch.compile; only a padded batch (seq_lens given) pays the host syncs of nonzero() and max().
    """
    B, T = q.shape[:2]
    steps = torch.arange(T, device=q.device).view(1, T)
    positions = steps.expand(B, T) if start_pos is None else start_pos.view(B, 1).long() + steps  # (B, T)
    q, k = apply_rope(q, cos, sin, positions), apply_rope(k, cos, sin, positions)
    if seq_lens is None and start_pos is None and not (window and T > window):
        # A fresh, unpadded prefill: the keys are exactly the new tokens, so SDPA's causal kernel applies
        # (no (B, T, T) mask to build; 266 -> 2xx ms time to first token at 1024 tokens on the tiny CPU preset).
        k_cache[:, :, :T] = k.transpose(1, 2).to(k_cache.dtype)  # (B, Hkv, T, D)
        v_cache[:, :, :T] = v.transpose(1, 2).to(v_cache.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=bool(q.shape[2] != k.shape[2]))
        return out.transpose(1, 2)
    if seq_lens is None:  # decode, a chat turn appended to a cache, a fresh prefill past the window: all written
        rows = torch.arange(B, device=q.device).view(B, 1).expand(B, T)
        k_cache[rows, :, positions] = k.to(k_cache.dtype)  # (B, T, Hkv, D) into (B, Hkv, Tmax, D) at positions
        v_cache[rows, :, positions] = v.to(v_cache.dtype)
        # Keys: the whole cache, later positions masked. Cutting it at max(start_pos) + T would need that
        # number on the host (a sync per token); the masked tail costs Tmax / (start + T) more K/V reads,
        # 1.0x on the CPU (whose decoders are sized to the request) and small next to the weights elsewhere.
        mask = _window_mask(positions, k_cache.shape[2], window)  # (B, T, Tk)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache, attn_mask=mask.unsqueeze(1),
                                             enable_gqa=bool(q.shape[2] != k.shape[2]))
        return out.transpose(1, 2)
    # A padded batch: only the valid tokens are written, padded query rows attend to nothing.
    valid = steps < seq_lens.view(B, 1)  # (B, T)
    rows, cols = valid.nonzero(as_tuple=True)
    k_cache[rows, :, positions[rows, cols]] = k[rows, cols].to(k_cache.dtype)  # (N, Hkv, D) each side
    v_cache[rows, :, positions[rows, cols]] = v[rows, cols].to(v_cache.dtype)
    Tk = int((positions[:, :1] + seq_lens.view(B, 1)).max())
    mask = _window_mask(positions, Tk, window) & valid.unsqueeze(-1)  # (B, T, Tk)
    out = _sdpa_gqa(q.transpose(1, 2), k_cache[:, :, :Tk], v_cache[:, :, :Tk], mask.unsqueeze(1))
    return out.transpose(1, 2)


def _rope_from_zero(x, cos, sin):
    """apply_rope at positions 0..T-1, as x * [c, c] + [x2, x1] * [-s, s] (the same products and sums): the
    tables are sliced, not gathered per row, and each product runs over whole contiguous rows instead of the
    halves' strided views; forward + backward 1.5x faster than apply_rope at (4, 320, 8, 64) on the CPU."""
    T = x.shape[1]
    c, s = cos[:T], sin[:T]
    cos_full = torch.cat([c, c], -1).view(1, T, 1, -1).to(x.dtype)  # (1, T, 1, D)
    sin_signed = torch.cat([-s, s], -1).view(1, T, 1, -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_full + torch.cat([x2, x1], dim=-1) * sin_signed


def rotary_causal_attention_reference(q, k, v, cos, sin, window=0):
    """Training attention: RoPE at positions 0..T-1, causal, no cache; differentiable.

    q (B, T, H, D), k/v (B, T, Hkv, D). Right padding needs no mask: a valid token never sees a later one.
    window > 0: position p attends to (p - window, p] only (Mistral's sliding window).
    """
    q, k = _rope_from_zero(q, cos, sin), _rope_from_zero(k, cos, sin)
    T = q.shape[1]
    if window and T > window:  # every row attends to at least itself: no all-masked row
        mask = _window_mask(torch.arange(T, device=q.device), T, window)  # (T, T)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=bool(q.shape[2] != k.shape[2]))
        return out.transpose(1, 2)
    # is_causal rather than a (T, T) mask: SDPA's flash kernel (the CPU's too) then skips the masked blocks
    # and needs no mask in backward; 1.4x faster forward + backward than the masked call at B 4, H 8, T 320
    # on the CPU. Every row attends to at least itself, so no row needs _sdpa_gqa's all-masked fix-up.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=bool(q.shape[2] != k.shape[2]))
    return out.transpose(1, 2)


def vision_attention_reference(q, k, v):
    """Non-causal attention for the CLIP encoder. q/k/v (N, T, H, D) -> (N, T, H, D).

    No mask: every query sees every key. An all-true mask argument kept SDPA off its CPU flash kernel: 0.20 s
    against 0.13 s (medians of 3 interleaved) for 5 LLaVA-NeXT tiles of 577 tokens, 4 heads of 64 (Xeon, 2 cores,
    loaded)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------------------
# Training loss
# ------------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(hidden, lm_head_weight, labels, ignore_index=-100):
    """Mean next-token cross-entropy of lm_head(hidden) over labels != ignore_index.

    hidden (N, C), lm_head_weight (V, C), labels (N,) already shifted. The Triton version never
    materialises the (N, V) logits.
    """
    logits = F.linear(hidden, lm_head_weight).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


# The torch backend's training path: the same math on the target rows only, a chunk of rows at a time, the
# gradients finished in forward (the Triton kernel's algorithm, kernels/cross_entropy.py, in torch ops).
# - Rows without a target (the image's positions, the prompt) contribute neither loss nor gradient, so
#   their logits are never computed: a LLaVA batch of BOS + 256 image tokens + 63 text tokens has 63 target
#   rows of 320, and lm_head is half of the tiny preset's decoder FLOPs per token (16.4M of 33.8M weights).
# - Peak extra memory is one chunk of (rows, V) float32 logits (<= 64 MiB) instead of the reference's (N, V)
#   logits, their float32 copy, the log-softmax autograd saves and the float32 dlogits (4 x 164 MiB for
#   N = 1280, V = 32064).
# - dz is formed once, in place, in forward; backward only scales the finished gradients (no recomputation
#   of the logits GEMM, which the reference's autograd would need in full).
MAX_CHUNK_LOGITS_BYTES_CPU = 64 * 2**20
# weight_grad_sink: the weight's gradient handed over in vocabulary row chunks (rows lo:hi, already times the
# incoming gradient) inside backward, instead of one (V, C) tensor returned to autograd; forward then keeps each
# row chunk's dz (m, V) and target rows (m, C) and backward forms each chunk's gradient from them, while the
# chunks' sum of products is the same one. (M, V + C) held instead of (V, C): at LLaVA-1.5-7B's 32064 x 4096
# float32 that is 640 target rows' 94 MiB instead of 501 MiB (the trainer steps each chunk at once, see
# OptimizerInBackward); from M >= V * C / (V + C) rows (3632 there) forward keeps the whole gradient as before and
# backward hands over its row slices. 1024 rows: a multiple of 16, the fused AdamW's unit (step_row_sparse).
VOCAB_ROWS_PER_GRAD_CHUNK = 1024


class _TargetRowsLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, max_chunk_bytes, weight_grad_sink=None):
        keep = (labels != ignore_index).nonzero().squeeze(1)  # (M,) the rows with a target
        M, V = keep.numel(), weight.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = None
        chunk = max(1, max_chunk_bytes // (4 * V))
        accumulate_fp32 = want_weight and M > chunk and weight.dtype != torch.float32  # one rounding at the end
        # (dz, h) of each row chunk, for a sink, while they are smaller than the (V, C) gradient
        smaller = M * (V + weight.shape[1]) < V * weight.shape[1]
        ctx.parts = [] if want_weight and weight_grad_sink is not None and smaller else None
        ctx.sink, ctx.accumulate_fp32 = weight_grad_sink if want_weight else None, accumulate_fp32
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, M, chunk):
            rows = keep[start:start + chunk]
            h = hidden.index_select(0, rows)  # (m, C)
            y = labels.index_select(0, rows)
            z = F.linear(h, weight).float()  # (m, V) in hidden's dtype as the reference, then float32
            # log_softmax in place (one fused row kernel, as the reference's cross_entropy runs it), where
            # logsumexp + subtract + exp took ~6 passes: 23 against 48 ms at (252, 32064) on one Xeon core.
            logp = torch._log_softmax(z, 1, False, out=z)  # (m, V); each row is read before it is written
            total -= logp.gather(1, y[:, None]).sum()
            if not (want_hidden or want_weight):
                continue
            dz = logp.exp_()  # softmax, in place of the logits
            dz[torch.arange(len(rows), device=dz.device), y] -= 1.0
            dz = dz.div_(M).to(hidden.dtype)  # (m, V) dloss/dlogits, as the reference's autograd rounds it
            if want_hidden:
                grad_hidden.index_copy_(0, rows, dz @ weight)  # (m, C)
            if ctx.parts is not None:
                ctx.parts.append((dz, h))
            elif want_weight:
                part = dz.t() @ h  # (V, C)
                if grad_weight is None:
                    grad_weight = part.float() if accumulate_fp32 else part
                else:
                    grad_weight += part
        if want_weight and grad_weight is None and ctx.parts is None:  # no target row: a zero gradient
            grad_weight = torch.zeros_like(weight)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total / M  # M = 0: nan, as the reference's mean over no targets

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place (the tensors are this op's own; a (V, C) copy would be 65 MiB on the tiny preset),
        # which is why a second backward through the same graph is refused, as the Triton kernel's is.
        if getattr(ctx, "used", False):
            raise RuntimeError("linear_cross_entropy: backward twice through the same loss is not supported")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if ctx.sink is not None:
            _hand_weight_grad_to_sink(ctx, grad_weight, grad_loss)
            grad_weight = None
        return (None if grad_hidden is None else grad_hidden.mul_(grad_loss),
                None if grad_weight is None else grad_weight.mul_(grad_loss), None, None, None, None)


def _hand_weight_grad_to_sink(ctx, grad_weight, grad_loss):
    """The weight's gradient times grad_loss to ctx.sink(lo, hi, rows' gradient), VOCAB_ROWS_PER_GRAD_CHUNK rows at
    a time: slices of the whole gradient, or each chunk's sum over the row chunks' dz^T h in forward's order."""
    V, C = ctx.weight_shape
    parts, ctx.parts = ctx.parts, None
    for lo in range(0, V, VOCAB_ROWS_PER_GRAD_CHUNK):
        hi = min(V, lo + VOCAB_ROWS_PER_GRAD_CHUNK)
        if parts is None:
            g = grad_weight[lo:hi]
        else:
            g = None
            for dz, h in parts:
                part = dz[:, lo:hi].t() @ h  # (hi - lo, C)
                if g is None:
                    g = part.float() if ctx.accumulate_fp32 else part
                else:
                    g += part
            g = torch.zeros((hi - lo, C), dtype=ctx.weight_dtype, device=grad_loss.device) if g is None \
                else g.to(ctx.weight_dtype)
        ctx.sink(lo, hi, g.mul_(grad_loss))


class _SelectRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.shape = x.shape
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_copy_(0, rows, grad), None


def select_rows(x, rows):
    """x (N, ...) -> x[rows] (M, ...) for distinct rows (M,). Its backward writes the rows' gradients into zeros
    (index_copy_) where index_select's own backward adds them (index_add_, a scatter-add over every element's
    index): 0.08 s against 0.4-0.9 s for 252 of 1280 rows x 512 float32 on the loaded Xeon VM."""
    return _SelectRows.apply(x, rows) if torch.is_grad_enabled() and x.requires_grad else x.index_select(0, rows)


def linear_cross_entropy_target_rows(hidden, lm_head_weight, labels, ignore_index=-100,
                                     max_chunk_bytes=MAX_CHUNK_LOGITS_BYTES_CPU, weight_grad_sink=None):
    """linear_cross_entropy_reference's loss and gradients from the target rows' logits only, in chunks.
    weight_grad_sink: see VOCAB_ROWS_PER_GRAD_CHUNK."""
    return _TargetRowsLinearCrossEntropy.apply(hidden, lm_head_weight, labels, ignore_index, max_chunk_bytes,
                                               weight_grad_sink)


# ------------------------------------------------------------------------------------------------------
# The op boundary: torch.library custom ops, one name per op, the backend chosen inside
# ------------------------------------------------------------------------------------------------------
#
# Each op above is registered as `torch.ops.llava_fast.<name>` with a fake (meta) implementation, so
# torch.compile traces through it (shapes only) and a CUDA graph captures the kernels it launches. Its real
# implementation calls the active backend's: the reference above, or the Triton kernel of
# `llava_fast.kernels` (the reference where a family has no kernel). `use_backend` only sets BACKEND.
#
# Training: the autograd formula of every differentiable op recomputes the op's forward with the backend
# that ran it (the reference, or the kernel's autograd.Function) and takes its vector-Jacobian product, so
# the gradients are exactly those the implementation gives without the boundary; the price is one more
# forward of each op per backward (a custom op's setup_context sees only inputs and outputs, not the
# kernels' saved statistics). linear_cross_entropy is the exception: its Triton kernel computes the
# gradients during the forward (it never holds the (N, V) logits), so the op returns them and the backward
# scales them.
#
# Under torch.compile with the torch backend the public functions below call the references themselves:
# an opaque op would hide their elementwise work from inductor, which fuses it (RoPE, norms, SwiGLU) into
# a few C++/Triton loops. With the Triton backend the op stays opaque: its kernels are already fused.

OP_NAMES = (
    "rms_norm", "layer_norm", "swiglu", "quick_gelu", "patch_embed", "splice_image_embeddings",
    "rotary_cached_attention", "rotary_causal_attention", "vision_attention", "linear_cross_entropy",
)
TORCH_OPS = {name: globals()[f"{name}_reference"] for name in OP_NAMES}


def _quick_gelu_one_buffer(x):
    """quick_gelu_reference's bits (sigmoid(1.702 x) * x is x * sigmoid(1.702 x)) in one new tensor instead of
    three where no autograd graph is recorded: CLIP's (tiles, 577, intermediate) activations are 12 MB per layer
    for a LLaVA-NeXT image of 5 tiles at tiny-next's 1,024 wide MLP, each new one faulted in page by page. Under
    autograd (the recompute backward) it is the reference, whose sigmoid keeps its output for backward."""
    if torch.is_grad_enabled():
        return quick_gelu_reference(x)
    return torch.mul(x, 1.702).sigmoid_().mul_(x)


def _patch_embed_gemm(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps):
    """patch_embed_reference with its convolution as the GEMM it is (stride = kernel = P, no bias): the (N * L,
    3 * P * P) patches gathered by one reshape copy, times the (C, 3 * P * P) weight. With oneDNN's conv2d the
    whole op took 3.0 ms for a LLaVA-NeXT image's 5 tiles at tiny-next's 256 channels, this way 1.6 ms (bfloat16,
    2 busy cores, Xeon; fastest of 40 rounds)."""
    N, _, S, _ = pixel_values.shape
    C, Cin, P, _ = patch_weight.shape
    G = S // P  # patches per side (conv2d drops a remainder)
    x = pixel_values[..., : G * P, : G * P].to(patch_weight.dtype).reshape(N, Cin, G, P, G, P)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(N * G * G, Cin * P * P)  # (N * L, 3 * P * P), conv2d's patch order
    patches = torch.mm(x, patch_weight.reshape(C, -1).t()).view(N, G * G, C)  # (N, L, C)
    cls = class_embedding.expand(N, 1, -1)
    x = torch.cat([cls, patches], dim=1) + position_embedding
    return F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)


TORCH_OPS["quick_gelu"] = _quick_gelu_one_buffer
def _patch_embed_torch(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps):
    """Half-precision towers take the GEMM; float32 ones keep conv2d, transformers' op: its other summation
    order over the 588 products of a 14-px patch moved a float32 LLaVA's logits (SmolLM2-135M behind a random
    tower) by 2.5e-4 against transformers', past the 1e-4 float32 parity bound, for ~1 ms of a 5-tile image."""
    f = patch_embed_reference if patch_weight.dtype == torch.float32 else _patch_embed_gemm
    return f(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps)


TORCH_OPS["patch_embed"] = _patch_embed_torch
BACKENDS = ("torch", "triton")
BACKEND = "torch"
_TRITON_OPS = None  # llava_fast.kernels.TRITON_OPS, imported on first use: triton is optional
_KERNELS_WITHOUT_BACKWARD = {"patch_embed"}  # their backward recomputes through the reference


def default_backend():
    requested = os.environ.get("LLAVA_FAST_KERNELS", "").strip().lower()
    if requested in BACKENDS:
        return requested
    if requested:
        raise ValueError(f"LLAVA_FAST_KERNELS={requested!r}: expected 'triton' or 'torch'")
    return "triton" if torch.cuda.is_available() else "torch"


def use_backend(name):
    """Choose the implementation behind every llava_fast op: 'torch' (the references) or 'triton'."""
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected 'triton' or 'torch'")
    if name == "triton":
        _triton_ops()  # import now, so a missing triton fails here rather than at the first op
    BACKEND = name


def _triton_ops():
    global _TRITON_OPS
    if _TRITON_OPS is None:
        from llava_fast.kernels import TRITON_OPS

        _TRITON_OPS = TRITON_OPS
    return _TRITON_OPS


def implementation(name, backend=None, differentiable=False):
    """The function behind op `name` for `backend` (default: the active one)."""
    if (backend or BACKEND) == "triton" and not (differentiable and name in _KERNELS_WITHOUT_BACKWARD):
        return _triton_ops().get(name, TORCH_OPS[name])
    return TORCH_OPS[name]


def _run(name, *args):
    # No autograd graph inside an op (its formula is registered below); under no_grad the Triton wrappers
    # also skip what only a backward needs (the splice's pre-activations, patch_embed's refusal).
    with torch.no_grad():
        return implementation(name)(*args)


def _register_recompute_autograd(op, name):
    """Autograd for `op` by recomputation (see above): save the inputs, and in backward rerun the
    implementation of the backend that ran the forward under autograd and take its VJP."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(x if isinstance(x, torch.Tensor) else None for x in inputs))
        ctx.constants = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.backend = BACKEND

    def backward(ctx, *grads):
        inputs = [t if t is not None else c for t, c in zip(ctx.saved_tensors, ctx.constants)]
        wanted = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            for i in wanted:
                inputs[i] = inputs[i].detach().requires_grad_()
            outs = implementation(name, ctx.backend, differentiable=True)(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        result = [None] * len(inputs)
        if pairs and wanted:
            got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                      allow_unused=True)
            for i, g in zip(wanted, got):
                result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op("llava_fast::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _run("rms_norm", x, weight, eps)[0].contiguous()


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("llava_fast::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: Tensor, weight: Tensor, eps: float, residual: Tensor) -> tuple[Tensor, Tensor]:
    normed, hidden = _run("rms_norm", x, weight, eps, residual)
    return normed.contiguous(), hidden.contiguous()


@_add_rms_norm_op.register_fake
def _(x, weight, eps, residual):
    hidden_dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, hidden_dtype)),
            x.new_empty(x.shape, dtype=hidden_dtype))


@torch.library.custom_op("llava_fast::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return _run("layer_norm", x, weight, bias, eps).contiguous()


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("llava_fast::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _run("swiglu", gate, up).contiguous()


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(torch.broadcast_shapes(gate.shape, up.shape),
                          dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("llava_fast::quick_gelu", mutates_args=())
def _quick_gelu_op(x: Tensor) -> Tensor:
    return _run("quick_gelu", x).contiguous()


@_quick_gelu_op.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("llava_fast::patch_embed", mutates_args=())
def _patch_embed_op(pixel_values: Tensor, patch_weight: Tensor, class_embedding: Tensor,
                    position_embedding: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    return _run("patch_embed", pixel_values, patch_weight, class_embedding, position_embedding, ln_weight,
                ln_bias, eps).contiguous()


@_patch_embed_op.register_fake
def _(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps):
    patches = (pixel_values.shape[-1] // patch_weight.shape[-1]) ** 2
    return patch_weight.new_empty(pixel_values.shape[0], 1 + patches, patch_weight.shape[0])


@torch.library.custom_op("llava_fast::splice_image_embeddings", mutates_args=())
def _splice_op(input_ids: Tensor, embed_weight: Tensor, image_features: Tensor | None, image_token_id: int,
               w1: Tensor, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None) -> Tensor:
    return _run("splice_image_embeddings", input_ids, embed_weight, image_features, image_token_id, w1, b1, w2,
                b2).contiguous()


@_splice_op.register_fake
def _(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2, b2):
    return embed_weight.new_empty(*input_ids.shape, embed_weight.shape[1])


@torch.library.custom_op("llava_fast::rotary_cached_attention", mutates_args=("k_cache", "v_cache"))
def _rotary_cached_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                                v_cache: Tensor, start_pos: Tensor | None, seq_lens: Tensor | None,
                                window: int = 0) -> Tensor:
    if BACKEND == "triton":  # the kernels take lengths on the device always (no host branch, no sync)
        B, T = q.shape[:2]
        start_pos = torch.zeros(B, dtype=torch.int32, device=q.device) if start_pos is None else start_pos
        seq_lens = torch.full((B,), T, dtype=torch.int32, device=q.device) if seq_lens is None else seq_lens
    return _run("rotary_cached_attention", q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens,
                window).contiguous()


@_rotary_cached_attention_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens, window=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llava_fast::rotary_causal_attention", mutates_args=())
def _rotary_causal_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, window: int = 0) -> Tensor:
    return _run("rotary_causal_attention", q, k, v, cos, sin, window).contiguous()


@_rotary_causal_attention_op.register_fake
def _(q, k, v, cos, sin, window=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llava_fast::vision_attention", mutates_args=())
def _vision_attention_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _run("vision_attention", q, k, v).contiguous()


@_vision_attention_op.register_fake
def _(q, k, v):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llava_fast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, ignore_index: int,
                             grad_hidden_wanted: bool, grad_weight_wanted: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dhidden, dloss/dweight); the gradients are empty unless the Triton backend computed
    them in its forward (the torch backend's backward recomputes)."""
    empty = hidden.new_empty(0)
    if BACKEND == "triton" and (grad_hidden_wanted or grad_weight_wanted):
        from llava_fast.kernels.cross_entropy import MAX_CHUNK_LOGITS_BYTES, linear_cross_entropy_forward

        loss, gh, gw = linear_cross_entropy_forward(hidden.contiguous(), lm_head_weight.contiguous(),
                                                    labels.contiguous(), ignore_index, MAX_CHUNK_LOGITS_BYTES,
                                                    grad_hidden_wanted, grad_weight_wanted)
        return loss, empty if gh is None else gh, lm_head_weight.new_empty(0) if gw is None else gw
    loss = _run("linear_cross_entropy", hidden, lm_head_weight, labels, ignore_index)
    return loss.float(), empty, lm_head_weight.new_empty(0)


@_linear_cross_entropy_op.register_fake
def _(hidden, lm_head_weight, labels, ignore_index, grad_hidden_wanted, grad_weight_wanted):
    triton_grads = BACKEND == "triton"
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(hidden.shape if triton_grads and grad_hidden_wanted else (0,)),
            lm_head_weight.new_empty(lm_head_weight.shape if triton_grads and grad_weight_wanted else (0,)))


def _linear_cross_entropy_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index = inputs[:4]
    ctx.backend = BACKEND
    if BACKEND == "triton":
        ctx.save_for_backward(output[1], output[2])
    else:
        ctx.save_for_backward(hidden, weight, labels)
        ctx.ignore_index = ignore_index


def _linear_cross_entropy_backward(ctx, grad_loss, _grad_dhidden, _grad_dweight):
    if ctx.backend == "triton":
        grad_hidden, grad_weight = (g * grad_loss if g.numel() else None for g in ctx.saved_tensors)
    else:
        hidden, weight, labels = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(wanted[0]), weight.detach().requires_grad_(wanted[1])
            loss = linear_cross_entropy_reference(h, w, labels, ctx.ignore_index)
            got = iter(torch.autograd.grad(loss, [t for t, want in zip((h, w), wanted) if want], grad_loss))
        grad_hidden, grad_weight = (next(got) if want else None for want in wanted)
    return grad_hidden, grad_weight, None, None, None, None


_linear_cross_entropy_op.register_autograd(_linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup)
for _op, _name in ((_rms_norm_op, "rms_norm"), (_add_rms_norm_op, "rms_norm"), (_layer_norm_op, "layer_norm"),
                   (_swiglu_op, "swiglu"), (_quick_gelu_op, "quick_gelu"), (_patch_embed_op, "patch_embed"),
                   (_splice_op, "splice_image_embeddings"),
                   (_rotary_causal_attention_op, "rotary_causal_attention"),
                   (_vision_attention_op, "vision_attention")):
    _register_recompute_autograd(_op, _name)


# ------------------------------------------------------------------------------------------------------
# What the model calls
# ------------------------------------------------------------------------------------------------------


def _inline_reference():
    """True where the torch backend calls the reference itself rather than its custom op: while torch.compile
    traces (inductor fuses the reference's elementwise work), and in eager training (grad enabled), where the
    op's autograd formula would recompute every op's forward in backward (attention included) while plain
    autograd through the reference keeps what its forward saved. The gradients are the same either way: the
    formula differentiates this very reference."""
    return BACKEND == "torch" and (torch.compiler.is_compiling() or torch.is_grad_enabled())


def rms_norm(x, weight, eps, residual=None):
    """LLaMA RMSNorm with the residual add fused in front: (normed, hidden). See rms_norm_reference."""
    if BACKEND == "torch" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        if residual is None:
            return _RMSNormSavingStatistics.apply(x, weight, eps, None), x
        return _RMSNormSavingStatistics.apply(x, weight, eps, residual)
    if _inline_reference():
        return rms_norm_reference(x, weight, eps, residual)
    if residual is None:
        return _rms_norm_op(x, weight, eps), x
    return _add_rms_norm_op(x, weight, eps, residual)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dimension. See layer_norm_reference."""
    return layer_norm_reference(x, weight, bias, eps) if _inline_reference() else _layer_norm_op(x, weight, bias, eps)


def swiglu(gate, up):
    """silu(gate) * up. See swiglu_reference."""
    if BACKEND == "torch" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _SwiGLUSavingInputs.apply(gate, up)
    return swiglu_reference(gate, up) if _inline_reference() else _swiglu_op(gate, up)


def quick_gelu(x):
    """x * sigmoid(1.702 x). See quick_gelu_reference."""
    return quick_gelu_reference(x) if _inline_reference() else _quick_gelu_op(x)


def quick_gelu_(x):
    """quick_gelu(x) for an x nothing else reads afterwards (a linear's fresh output): on the torch backend on the
    CPU with no autograd graph, written into x by one native pass (llava_fast/cpu/vision.py), else quick_gelu(x)."""
    if BACKEND == "torch" and x.device.type == "cpu" and not torch.is_grad_enabled():
        from llava_fast.cpu import vision

        if vision.quick_gelu_(x):
            return x
    return quick_gelu(x)


def patch_embed(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps):
    """CLIP's embeddings + pre_layrnorm. See patch_embed_reference."""
    f = patch_embed_reference if _inline_reference() else _patch_embed_op
    return f(pixel_values, patch_weight, class_embedding, position_embedding, ln_weight, ln_bias, eps)


def splice_image_embeddings(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2=None, b2=None,
                            sparse_grad=False):
    """The decoder's input embeddings. See splice_image_embeddings_reference; sparse_grad is honoured by the
    torch backend's training path (the custom op's and the Triton kernel's gradients are dense)."""
    if _inline_reference():
        return splice_image_embeddings_reference(input_ids, embed_weight, image_features, image_token_id, w1, b1,
                                                 w2, b2, sparse_grad)
    return _splice_op(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2, b2)


def rotary_cached_attention(q, k, v, cos, sin, k_cache, v_cache, start_pos=None, seq_lens=None, window=0):
    """Attention against the static KV cache, written in place. See rotary_cached_attention_reference."""
    f = rotary_cached_attention_reference if _inline_reference() else _rotary_cached_attention_op
    return f(q, k, v, cos, sin, k_cache, v_cache, start_pos, seq_lens, window)


def rotary_causal_attention(q, k, v, cos, sin, window=0):
    """Training attention (no cache). See rotary_causal_attention_reference."""
    f = rotary_causal_attention_reference if _inline_reference() else _rotary_causal_attention_op
    return f(q, k, v, cos, sin, window)


def vision_attention(q, k, v):
    """CLIP's non-causal attention. See vision_attention_reference."""
    return vision_attention_reference(q, k, v) if _inline_reference() else _vision_attention_op(q, k, v)


def linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index=-100, weight_grad_sink=None):
    """Mean cross-entropy of lm_head(hidden) over labels != ignore_index. See linear_cross_entropy_reference.
    weight_grad_sink(lo, hi, grad): takes lm_head's weight gradient in vocabulary row chunks inside backward
    (VOCAB_ROWS_PER_GRAD_CHUNK) on the eager torch backend; elsewhere the gradient reaches .grad as usual."""
    if BACKEND == "torch" and torch.compiler.is_compiling():
        return linear_cross_entropy_reference(hidden, lm_head_weight, labels, ignore_index)
    if BACKEND == "torch":
        return linear_cross_entropy_target_rows(hidden, lm_head_weight, labels, ignore_index,
                                                weight_grad_sink=weight_grad_sink)
    grad = torch.is_grad_enabled()
    return _linear_cross_entropy_op(hidden, lm_head_weight, labels, ignore_index,
                                    grad and hidden.requires_grad, grad and lm_head_weight.requires_grad)[0]


# Kernel backend: chosen once, at this module's import, before any Triton kernel is defined (every model path
# imports this module first). Triton on a CPU means the interpreter, which triton.jit only honours if
# TRITON_INTERPRET is set before the kernels are decorated.
if default_backend() == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
use_backend(default_backend())
