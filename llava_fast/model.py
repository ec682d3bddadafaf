"""The whole LLaVA model in one file: CLIP vision tower -> projector -> LLaMA decoder.

References: Liu et al. 2023, "Visual Instruction Tuning" (LLaVA); Liu et al. 2023, "Improved Baselines with
Visual Instruction Tuning" (LLaVA-1.5: mlp2x_gelu projector, 336 px); Liu et al. 2024, "LLaVA-NeXT" (LLaVA-1.6:
AnyRes tiles, see image/anyres.py); Radford et al. 2021 (CLIP); Touvron et al. 2023 (LLaMA).

The fusable operations (norms, activations, attention, patch embedding, the projector splice) go through
`llava_fast.ops`, whose plain-PyTorch versions are the CPU path and the oracle for the Triton kernels; the
backend switch lives there alone. Parameter names follow transformers' llava-hf layout, so checkpoints map
onto this module with prefix renames only (see loading.py).

Shapes: B batch, T tokens, C channels, H heads, Hkv key/value heads, D head dim, N images, L patches.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from llava_fast import ops
from llava_fast.checkpoints.config import LlavaConfig, TextConfig, VisionConfig
from llava_fast.image import anyres

# ------------------------------------------------------------------------------------------------------
# CLIP vision tower
# ------------------------------------------------------------------------------------------------------


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        # CLIP's patch conv has no bias; stride = kernel = patch size, so it is a GEMM over 14x14x3 patches.
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)


class ClipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)
        self.qkv_proj = None  # q/k/v as one weight, after LlavaForCausalLM.fuse_projections()

    def forward(self, x):
        N, T, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        if self.qkv_proj is not None:  # one GEMM; q, k, v are strided views of its (N, T, 3, H, D) output
            q, k, v = self.qkv_proj(x).view(N, T, 3, H, D).unbind(2)
        else:
            q, k, v = self.q_proj(x).view(N, T, H, D), self.k_proj(x).view(N, T, H, D), self.v_proj(x).view(N, T, H, D)
        return self.out_proj(ops.vision_attention(q, k, v).reshape(N, T, C))


class ClipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(ops.quick_gelu_(h) if self.quick else F.gelu(h))  # h: fc1's fresh output, read once


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x):  # pre-norm residual block, (N, T, C) -> (N, T, C)
        h = self.self_attn(ops.layer_norm(x, self.layer_norm1.weight, self.layer_norm1.bias, self.eps))
        # Without autograd the residual sums land in the blocks' fresh outputs (h + x is x + h, bit for bit): two
        # (N, T, C) tensors fewer per layer to allocate and fault in.
        x = h.add_(x) if not torch.is_grad_enabled() else x + h
        h = self.mlp(ops.layer_norm(x, self.layer_norm2.weight, self.layer_norm2.bias, self.eps))
        return h.add_(x) if not torch.is_grad_enabled() else x + h


class ClipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(num_layers))


class ClipVisionTower(nn.Module):
    """CLIP ViT up to the feature layer LLaVA reads. Layers after it (and post_layernorm, which only feeds
    CLIP's pooled output) are never built, so they are never loaded or computed."""

    def __init__(self, cfg: VisionConfig, num_layers_run: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: CLIP's spelling
        self.encoder = ClipEncoder(cfg, num_layers_run)

    def forward(self, pixel_values):  # (N, 3, S, S) -> (N, 1 + L, C)
        e = self.embeddings
        x = ops.patch_embed(pixel_values, e.patch_embedding.weight, e.class_embedding, e.position_embedding.weight,
                            self.pre_layrnorm.weight, self.pre_layrnorm.bias, self.cfg.layer_norm_eps)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


class MultiModalProjector(nn.Module):
    """linear (LLaVA v1): one Linear. mlp2x_gelu (LLaVA-1.5): Linear-GELU-Linear."""

    def __init__(self, vision_size: int, text_size: int, projector_type: str):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.linear_2 = nn.Linear(text_size, text_size) if projector_type == "mlp2x_gelu" else None

    def weights(self):
        l2 = self.linear_2
        return self.linear_1.weight, self.linear_1.bias, l2.weight if l2 else None, l2.bias if l2 else None


# ------------------------------------------------------------------------------------------------------
# LLaMA decoder
# ------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x, residual=None):  # -> (normed, new residual stream)
        return ops.rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.H, self.Hkv, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        C, bias = cfg.hidden_size, cfg.attention_bias  # biases: Qwen-style LLaMA variants (attention_bias)
        self.q_proj = nn.Linear(C, self.H * self.D, bias=bias)
        self.k_proj = nn.Linear(C, self.Hkv * self.D, bias=bias)
        self.v_proj = nn.Linear(C, self.Hkv * self.D, bias=bias)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=bias)
        self.qkv_proj = None  # q/k/v as one weight, after fuse_projections()
        self.window = cfg.sliding_window or 0  # Mistral: each position sees the last `window` keys; 0: all
        self.weight_grad_sink = None  # training: see ops.linear_weight_grad_to_sink (plain linears)

    def forward(self, x, rope, cache, start_pos, seq_lens, rows=None):
        """rows: (M,) flat indices into the B*T positions: o_proj runs on those rows only -> (M, C)."""
        B, T, _ = x.shape
        sink = self.weight_grad_sink
        if self.qkv_proj is not None:  # one GEMM reads the three weights in one pass
            q, k, v = self.qkv_proj(x).split((self.H * self.D, self.Hkv * self.D, self.Hkv * self.D), dim=-1)
        else:
            q, k, v = (ops.linear_weight_grad_to_sink(x, lin, sink) for lin in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = q.view(B, T, self.H, self.D), k.view(B, T, self.Hkv, self.D), v.view(B, T, self.Hkv, self.D)
        if cache is None:  # training / full-sequence logits: positions 0..T-1, causal
            out = ops.rotary_causal_attention(q, k, v, *rope, self.window)
        else:  # inference: K/V written into the static cache in place
            out = ops.rotary_cached_attention(q, k, v, *rope, cache[0], cache[1], start_pos, seq_lens, self.window)
        out = out.reshape(B, T, self.H * self.D)
        out = out if rows is None else ops.select_rows(out.view(B * T, -1), rows)
        return ops.linear_weight_grad_to_sink(out, self.o_proj, sink)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj = None  # gate/up as one weight, after fuse_projections()
        self.recompute = False  # training: keep only x, recompute gate/up/SwiGLU in backward (plain linears)
        self.weight_grad_sink = None  # training: see ops.swiglu_mlp_recomputed, ops.linear_weight_grad_to_sink

    def forward(self, x):
        if self.recompute and torch.is_grad_enabled():
            g, u, d = self.gate_proj, self.up_proj, self.down_proj
            return ops.swiglu_mlp_recomputed(x, g.weight, g.bias, u.weight, u.bias, d.weight, d.bias,
                                             self.weight_grad_sink)
        sink = self.weight_grad_sink
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = (ops.linear_weight_grad_to_sink(x, lin, sink) for lin in (self.gate_proj, self.up_proj))
        return ops.linear_weight_grad_to_sink(ops.swiglu(gate, up), self.down_proj, sink)


def fuse_linears(module, names, fused_name):
    """Replace module.<names> (nn.Linear of one input size, all with or all without bias) by one Linear
    module.<fused_name> whose weight (and bias) is theirs stacked along the output dim; state_dict() still
    splits it back into the original names, so checkpoints written from a fused model keep the standard
    layout."""
    parts = [getattr(module, n) for n in names]
    weights = [p.weight for p in parts]
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=has_bias, device="meta")
    fused.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=weights[0].requires_grad)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]),
                                  requires_grad=parts[0].bias.requires_grad)
    sizes = [w.shape[0] for w in weights]
    for n in names:
        delattr(module, n)
    setattr(module, fused_name, fused)

    def split_on_save(mod, state_dict, prefix, local_metadata):
        for kind in ("weight", "bias") if has_bias else ("weight",):
            tensor = state_dict.pop(f"{prefix}{fused_name}.{kind}")
            for n, part in zip(names, tensor.split(sizes)):
                state_dict[f"{prefix}{n}.{kind}"] = part

    module.register_state_dict_post_hook(split_on_save)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, residual, rope, cache, start_pos, seq_lens, rows=None):
        # The residual add is fused into each RMSNorm: x is the last block's output, residual the stream.
        # rows (M,): every position is attended to, but the block's output is wanted at these rows only
        # (flat indices into B*T), so o_proj, the second norm and the MLP run on (M, C) rows.
        h, residual = self.input_layernorm(x, residual)
        x = self.self_attn(h, rope, cache, start_pos, seq_lens, rows)
        if rows is not None:
            residual = ops.select_rows(residual.reshape(-1, residual.shape[-1]), rows)  # (M, C)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ------------------------------------------------------------------------------------------------------
# LLaVA
# ------------------------------------------------------------------------------------------------------


class KVCache:
    """Static per-layer K/V buffers, allocated once per generate call and written in place.

    k[i], v[i]: (B, Hkv, Tmax, D) for layer i. One allocation holds all layers so decode never reallocates.
    """

    def __init__(self, cfg: TextConfig, batch_size: int, max_tokens: int, device, dtype):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_tokens, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_tokens(self):
        return self.k.shape[3]

    def layer(self, i):
        return self.k[i], self.v[i]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop) sharing this cache's memory: a prefill into it writes those rows only
        (the server prefills one slot while the other rows keep their K/V)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        return view


class LlavaForCausalLM(nn.Module):
    """The network. Parameter names: vision_tower.*, multi_modal_projector.*, language_model.*, lm_head, and
    LLaVA-NeXT's image_newline."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        # A text-only model (cfg.vision None: a GGUF loaded without its mmproj) has neither.
        self.vision_tower = ClipVisionTower(cfg.vision, cfg.num_vision_layers_run) if cfg.vision else None
        self.multi_modal_projector = MultiModalProjector(cfg.vision.hidden_size, cfg.text.hidden_size,
                                                         cfg.projector_type) if cfg.vision else None
        # LLaVA-NeXT: a learned embedding appended after each row of an image's tile grid (spatial_unpad).
        self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size)) if cfg.anyres and cfg.vision else None
        self.language_model = LlamaModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tie_weights()
        self.rope = None  # (cos, sin) fp32 tables, built by init_rope() once the device is known
        self.gradient_checkpointing = False  # training: recompute each decoder layer in backward
        # training: None, or a callable(lo, hi, grad) that takes lm_head's weight gradient in vocabulary row chunks
        # inside backward instead of .grad (ops.linear_cross_entropy; the trainer's in-backward step)
        self.lm_head_grad_sink = None

    def recompute_mlp_activations(self, on=True):
        """Training without gradient checkpointing: each decoder MLP keeps only its input for backward and
        recomputes gate, up and the SwiGLU there (ops.swiglu_mlp_recomputed), a third of a layer's activations
        for two more GEMMs. For plain (unfused, non-LoRA) MLP linears."""
        for layer in self.language_model.layers:
            mlp = layer.mlp
            plain = all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            if on and not plain:
                raise ValueError("MLP recomputation needs plain gate/up/down linears (not fused, not LoRA)")
            mlp.recompute = on
        return self

    def tie_weights(self):
        """tie_word_embeddings: lm_head reads embed_tokens' tensor (one Parameter, one copy in memory, one
        gradient). Called again after anything that replaces either Parameter (loading with assign=True)."""
        if self.cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def init_rope(self, device=None):
        t = self.cfg.text
        self.rope = ops.rope_tables(t.head_dim, t.max_position_embeddings, t.rope_theta, device=device,
                                    scaling=t.rope_scaling)

    def fuse_projections(self):
        """Inference conversion: q/k/v into one weight and gate/up into one per decoder layer, so a decode step
        runs 4 GEMMs per layer instead of 7 (43 -> 25 for a 6-layer model, lm_head included); each fused GEMM
        reads the same bytes as its parts in one pass, with one launch and one Python dispatch. state_dict()
        keeps the split names. Idempotent; load() and presets.random_model() call it."""
        for layer in self.language_model.layers:
            if layer.self_attn.qkv_proj is None:
                fuse_linears(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
                fuse_linears(layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")
        return self.fuse_vision_projections()

    def fuse_vision_projections(self):
        """The vision tower's q/k/v as one weight per layer: one (3C, C) GEMM instead of three (C, C) ones over every
        tile's positions (2,885 rows for a LLaVA-NeXT image's 5 tiles), one weight to read (and, in a float32 run of a
        half-precision checkpoint, to widen) instead of three. state_dict() keeps the split names. Idempotent."""
        for layer in self.vision_tower.encoder.layers if self.vision_tower is not None else ():
            if layer.self_attn.qkv_proj is None:
                fuse_linears(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        return self

    def image_features(self, pixel_values):
        """(N, 3, S, S) -> (N, num_image_tokens, Cv): the CLIP hidden state at vision_feature_layer."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        # A frozen tower (LLaVA trains none) has no gradient to record: run it as inference does, without autograd,
        # so its residual sums land in the blocks' outputs and quick_gelu is one native pass over fc1's output,
        # not three (x * sigmoid(1.702 x) through autograd keeps and allocates each). The output is the same
        # leaf, no gradient either way.
        frozen = torch.is_grad_enabled() and not pixel_values.requires_grad and not any(
            p.requires_grad for p in self.vision_tower.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            hidden = self.vision_tower(pixel_values.to(dtype))
        return hidden[:, 1:] if self.cfg.vision_feature_select_strategy == "default" else hidden

    def splice_anyres_images(self, x, input_ids, pixel_values, image_sizes, image_features=None):
        """LLaVA-NeXT: write N images' decoder input rows into x (B, T, C), the token embeddings of input_ids
        (B, T), at their image positions; returns x. The images come as their tiles (sum of tiles, 3, S, S),
        image i's base tile then its grid row-major, with image_sizes (N, 2) (height, width); or as
        image_features (sum of tiles, P * P, Cv), the tiles' image_features() computed earlier (the trainer's
        cache of a frozen tower), which skips the tower. Each image fills one run of consecutive positions.

        Per image (mm_patch_merge_type spatial_unpad): the base tile's P x P features first; then the grid's
        tiles put back in place as one (rows * P, cols * P) feature map, cut to the window that saw the image
        (not the padding around it), with image_newline after each of its rows. anyres.feature_order gives the
        tile feature row of every position, so one gather writes an image's run straight into x (no arranged,
        unpadded or concatenated copies of the (tokens, C) rows, no mask scan) and one strided copy its newlines.
        """
        cfg = self.cfg
        S, P = cfg.vision.image_size, cfg.vision.image_size // cfg.vision.patch_size
        sizes = image_sizes.tolist()
        orders = [anyres.feature_order(h, w, cfg.image_grid_pinpoints, S, P, cfg.exact_unpad) for h, w in sizes]
        positions = (input_ids.reshape(-1) == cfg.image_token_id).nonzero().squeeze(1).tolist()  # flat image positions
        if len(positions) != sum(len(index) for index, _, _ in orders):
            raise ValueError(f"input_ids have {len(positions)} image positions where the images' sizes need "
                             f"{sum(len(index) for index, _, _ in orders)}")
        features = self.image_features(pixel_values) if image_features is None else image_features
        projected = ops.project_image_features(features, *self.multi_modal_projector.weights())  # (tiles, P * P, C)
        C = projected.shape[-1]
        flat = x.view(-1, C)  # (B * T, C)
        counts = [anyres.num_tiles(h, w, cfg.image_grid_pinpoints, S) for h, w in sizes]
        first = 0
        for i, (tiles, (index, rows, cols)) in enumerate(zip(projected.split(counts), orders)):
            start, n = positions[first], len(index)
            if positions[first + n - 1] != start + n - 1:
                raise ValueError(f"image {i}'s {n} image positions are not consecutive in input_ids")
            first += n
            run = flat[start:start + n]  # (n, C), contiguous
            source, index = tiles.reshape(-1, C), index.to(x.device)  # (tiles * P * P, C)
            if torch.is_grad_enabled() or source.dtype != x.dtype:
                run.copy_(source.index_select(0, index))  # differentiable; converts as .to(x.dtype) would
            else:
                torch.index_select(source, 0, index, out=run)
            newline = self.image_newline.to(projected.dtype).expand(rows, C)
            run[P * P:].view(rows, cols + 1, C)[:, cols].copy_(newline)  # the newline slot ending each grid row
        return x

    def embed(self, input_ids, pixel_values=None, image_features=None, image_sizes=None):
        """(B, T) ids with image tokens already expanded -> (B, T, C) decoder input. The images come as
        pixel_values (N, 3, S, S), or as image_features (N, num_image_tokens, Cv) that image_features()
        computed earlier (the server's image cache), which skips the vision tower.

        LLaVA-NeXT: pixel_values are the images' tiles (sum of tiles, 3, S, S) and image_sizes (N, 2) their
        sizes, as splice_anyres_images takes them; image_features are then the tiles' features."""
        if self.cfg.anyres and self.vision_tower is not None:
            x = ops.splice_image_embeddings(input_ids, self.language_model.embed_tokens.weight, None,
                                            self.cfg.image_token_id, None, None,
                                            sparse_grad=self.language_model.embed_tokens.sparse)  # (B, T, C)
            if pixel_values is None and image_features is None:
                return x
            if image_sizes is None:
                raise ValueError("LLaVA-NeXT images need their image_sizes")
            return self.splice_anyres_images(x, input_ids, pixel_values, image_sizes, image_features)
        features = image_features if pixel_values is None else self.image_features(pixel_values)
        projector = self.multi_modal_projector.weights() if features is not None else (None, None)
        # embed_tokens.sparse (nn.Embedding's flag; the trainer sets it): the table's gradient is its looked-up rows
        return ops.splice_image_embeddings(input_ids, self.language_model.embed_tokens.weight, features,
                                           self.cfg.image_token_id, *projector,
                                           sparse_grad=self.language_model.embed_tokens.sparse)

    def decode_hidden(self, x, cache=None, start_pos=None, seq_lens=None, rows=None):
        """Run the decoder stack on embeddings (B, T, C) -> final-normed hidden states (B, T, C), or (M, C) at
        rows (M,) (flat indices into B*T; no cache): the last layer's attention output, MLP and the final norm
        then run on those rows only, which is all the loss reads."""
        if self.rope is None or self.rope[0].device != x.device:
            self.init_rope(x.device)
        residual = None
        last = len(self.language_model.layers) - 1
        for i, layer in enumerate(self.language_model.layers):
            layer_rows = rows if i == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, residual = torch.utils.checkpoint.checkpoint(layer, x, residual, self.rope, None, None, None,
                                                                layer_rows, use_reentrant=False)
            else:
                x, residual = layer(x, residual, self.rope, None if cache is None else cache.layer(i), start_pos,
                                    seq_lens, layer_rows)
        return self.language_model.norm(x, residual)[0]

    def forward(self, input_ids, pixel_values=None, image_sizes=None):
        """Full-sequence logits (B, T, V), no cache (parity tests)."""
        return self.lm_head(self.decode_hidden(self.embed(input_ids, pixel_values, image_sizes=image_sizes)))

    def loss(self, input_ids, labels, pixel_values=None, ignore_index=-100, image_features=None, image_sizes=None):
        """Training loss: mean next-token cross-entropy over labels != ignore_index. input_ids/labels (B, T),
        unshifted (labels[t] is the target at position t, as transformers takes them); the (B*T, V) logits are
        never materialised (fused linear + cross-entropy). The images as pixel_values or, for a frozen
        tower, as the image_features it gave before; LLaVA-NeXT: their tiles and image_sizes (see embed)."""
        # Position t predicts labels[t + 1]; only positions with a target reach the loss. In a LLaVA batch most
        # positions are the image's and the prompt's (stage 1 on the tiny preset: 63 target rows of 320), so
        # the last decoder layer's o_proj, MLP and the final norm run on the target rows only (as lm_head does
        # inside linear_cross_entropy): the same loss and gradients.
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T)
        rows = (shifted.reshape(-1) != ignore_index).nonzero().squeeze(1)  # (M,) flat positions with a target
        x = self.embed(input_ids, pixel_values, image_features, image_sizes)  # (B, T, C)
        hidden = self.decode_hidden(x, rows=rows)  # (M, C)
        return ops.linear_cross_entropy(hidden, self.lm_head.weight, shifted.reshape(-1).index_select(0, rows),
                                        ignore_index, self.lm_head_grad_sink)
