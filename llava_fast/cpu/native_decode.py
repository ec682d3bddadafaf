"""The CPU decode step in one native call (csrc/decode.cpp), for batches of up to `MAX_ROWS` (64) rows, and
the prefill of float32 models with float32, int8 or int4 projections and of bfloat16 models (AVX-512 and AVX2
kernels), through the same code (a prompt's tokens as rows of one cache row, up to 128 at a time).

In: a LlavaForCausalLM on the CPU in float32 or bfloat16 whose decoder projections are fused (q/k/v and
gate/up, as load() leaves them) and are GemvLinear layers (any weight format of gemv.py: float32, bfloat16,
int8, int4) or float nn.Linear layers (with or without bias). Out: `NativeDecodeStep`, called as
`step(cache, lengths, tokens)` with generate.decode_step's contract: tokens (B,) int64 at positions
lengths (B,) int32 -> next-token logits (B, V) float32, K/V written into `cache`, lengths advanced by one.

Why: the torch decode step pays Python and ATen dispatch for ~25 small ops per layer; on SmolLM2-135M float32
(2-core EPYC) that was 32 of a step's 60 ms, the weight reads (the GEMVs) the other 28. The native step runs
the same math with no dispatch between the GEMVs. Prefill (float32, int8 or int4 weights):
`NativeDecodeStep.prefill`, the GEMMs on gemv.cpp's tile kernel (float32), gemm_q8.cpp (int8) or gemm_q4.cpp
(int4), attention in blocks of 4 positions with the output in registers; float32: SmolLM2-135M 130-token prompt
449 -> 544 tok/s, tiny 274 tokens 2933 -> 3312, 1,024 tokens 2807 -> 3075 (interleaved, 2 cores) over the torch
prefill with a 4 x 4 tile; then the 4 x 6 tile and the glue (SwiGLU, RMSNorm, RoPE, K/V writes) on AVX-512 took
tiny's 274 tokens from 78.6 to 62.5 ms (medians of 40 interleaved pairs, 2 cores); int4-32: SmolLM2 746 -> 1133;
int8 (AVX2 forced, 130 tokens): 14.7 tok/s through torch -> 550. Its reference is generate.decode_step (the torch
path), which tests/test_native_decode.py compares it with: float32 within 1e-4, bfloat16 to bfloat16 rounding.

`for_model(net)` returns None, with the reason in `why_not(net)`, where the native step cannot run the model (no
native extension, not on the CPU, a dtype or layer kind it does not know). Whether the Decoder runs it, and its
prefill, is the model's plan's choice (plan.py); LLAVA_FAST_NATIVE_DECODE=0 at load turns it off (comparisons).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from llava_fast.cpu import gemv
from llava_fast.cpu.gemv import BF16, F32, GemvLinear

# Rows per native step. The GEMVs read each weight once for all rows and do one multiply-add per weight per
# row; tiny preset, 2 cores, ms per step native vs the torch step: 4 rows 9.3 vs 21.8, 16 rows 29.4 vs 75.3,
# 64 rows 79 vs 118 (float32); int8/int4 at 64 rows 44 vs 100-103. Above this the torch step runs.
MAX_ROWS = 64
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def native_bf16_prefill() -> bool:
    """Whether a bfloat16 model (bfloat16 projections) prefills through the native step: on the AVX-512 and AVX2
    tables, whose multi-row bfloat16 kernels (AMX tiles, the VDPBF16PS tile, AVX2's widening FMA tile) run a prompt
    chunk's GEMMs at or above oneDNN's speed on the same CPU with no torch op between them. SmolLM2's gate_up and
    down at 128 rows, 2 threads, Sapphire Rapids with oneDNN capped at the same instructions (bench/gemv_rows.py):
    AVX2 tile 4.5x / 3.4x F.linear, VDPBF16PS tile 0.93x / 1.00x, AMX 0.8-1.0x. Not on neon (its kernel widens one
    output at a time; unmeasured) or scalar. Read at each call: the kernels can be switched at run time."""
    return gemv.NATIVE and gemv._C.cpu_isa() in ("avx512", "avx2")


def enabled() -> bool:
    return os.environ.get("LLAVA_FAST_NATIVE_DECODE", "1") != "0"


def _linear(layer, dtype):
    """(w, format, n, k, group, scales, mins, bias) of a GemvLinear or a float nn.Linear, or None."""
    if isinstance(layer, GemvLinear):
        if layer.out_dtype != dtype or not layer.weight.is_contiguous():
            return None
        s, m = layer.scale, layer.minimum
        return (layer.weight.data_ptr(), layer.format, layer.out_features, layer.in_features, layer.group or 0,
                0 if s is None else s.data_ptr(), 0 if m is None else m.data_ptr(), 0), (layer.weight, s, m)
    if isinstance(layer, nn.Linear) and layer.weight.dtype == dtype and layer.weight.is_contiguous():
        b = layer.bias
        if b is not None and (b.dtype != dtype or not b.is_contiguous()):
            return None
        fmt = F32 if dtype == torch.float32 else BF16
        return (layer.weight.data_ptr(), fmt, layer.out_features, layer.in_features, 0, 0, 0,
                0 if b is None else b.data_ptr()), (layer.weight, b)
    return None


def why_not(net) -> str | None:
    """Why the native step cannot run this model (None: it can)."""
    if not gemv.NATIVE or not hasattr(gemv._C, "DecodeModel"):
        return "the native extension llava_fast._C is not built"
    emb = net.language_model.embed_tokens.weight
    if emb.device.type != "cpu":
        return f"the model is on {emb.device.type}, not the CPU"
    if emb.dtype not in _DTYPES:
        return f"compute dtype {emb.dtype} (float32 and bfloat16 only)"
    for layer in net.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None or mlp.gate_up_proj is None:
            return "the q/k/v and gate/up projections are not fused (net.fuse_projections())"
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if lin.weight.dtype == torch.bfloat16 and lin.in_features % 2:
                return f"a bfloat16 decoder projection ({lin!r}) has an odd in_features (the kernels need it even)"
            if _linear(lin, emb.dtype) is None:
                return f"a decoder projection ({lin!r}) is neither a GemvLinear nor a {emb.dtype} nn.Linear"
    if net.lm_head.weight.dtype == torch.bfloat16 and net.lm_head.in_features % 2:
        return f"a bfloat16 lm_head ({net.lm_head!r}) has an odd in_features (the kernels need it even)"
    if _linear(net.lm_head, emb.dtype) is None:
        return f"lm_head ({net.lm_head!r}) is neither a GemvLinear nor a {emb.dtype} nn.Linear"
    return None


class NativeDecodeStep:
    """The native decode step of one model; holds every tensor whose address it passed to C++."""

    def __init__(self, net):
        t = net.cfg.text
        emb = net.language_model.embed_tokens.weight
        self.dtype = emb.dtype
        if net.rope is None or net.rope[0].device != emb.device:
            net.init_rope(emb.device)
        cos, sin = (x.contiguous() for x in net.rope)
        lm_head, keep = _linear(net.lm_head, self.dtype)
        self._keep = [emb, cos, sin, net.language_model.norm.weight, *keep]
        self.vocab = net.lm_head.out_features
        self.model = gemv._C.DecodeModel(
            t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size, self.vocab,
            emb.shape[0], cos.shape[0], float(t.rms_norm_eps), _DTYPES[self.dtype], emb.data_ptr(),
            net.language_model.norm.weight.data_ptr(), cos.data_ptr(), sin.data_ptr(), lm_head)
        self.model.sliding_window = t.sliding_window or 0
        # int4 and int8 projections run a prompt's rows through their own GEMMs (gemm_q4.cpp, gemm_q8.cpp), whose
        # bits are not the GEMV's: then a call cannot carry a decode step's rows and a prompt's rows together
        # (`mixed`).
        self.prompt_gemm = False
        for layer in net.language_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = []
            for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                desc, keep = _linear(lin, self.dtype)
                linears.append(desc)
                self.prompt_gemm = self.prompt_gemm or desc[1] in (gemv.Q4, gemv.Q8)
                self._keep += keep
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            self._keep += norms
            self.model.add_layer(norms[0].data_ptr(), norms[1].data_ptr(), *linears)
        self.model.check()
        # The addresses of what the module holds now: a module whose tensors were replaced since (load_state_dict
        # with assign, .to()) no longer matches, and for_model() builds a new step.
        self.signature = _signature(net)

    def __call__(self, cache, lengths, tokens, threads=None):
        """tokens (B,) at positions lengths (B,) int32 -> logits (B, V) float32; cache rows 0..B-1 of any
        KVCache view, lengths advanced in place. threads: the plan's (None: torch's thread count)."""
        B = tokens.shape[0]
        tokens = tokens.reshape(B).to(torch.int64).contiguous()
        assert lengths.dtype == torch.int32 and lengths.is_contiguous() and cache.k.dtype == self.dtype
        k, v = cache.k, cache.v
        assert k.stride() == v.stride() and k.shape[1] >= B
        logits = torch.empty(B, self.vocab, dtype=torch.float32)
        threads = threads or torch.get_num_threads()
        self.model.step(tokens.data_ptr(), lengths.data_ptr(), B, k.data_ptr(), v.data_ptr(), k.stride(0),
                        k.stride(1), k.stride(2), k.stride(3), k.shape[3], logits.data_ptr(), threads)
        return logits

    def prefill(self, cache, slot, start, embeds, threads=None):
        """One prompt's rows: embeds (T, C) in the compute dtype (image features spliced in) at positions
        start..start+T-1 of cache row `slot` -> the last token's logits (1, V) float32; K/V written, causal
        (csrc/decode.h DecodeRows). The reference is the torch prefill (generate.Decoder.prefill_slot's
        decode_hidden), which tests/test_native_decode.py compares it with. int4 and int8 projections run the prefill
        GEMMs (csrc/gemm_q4.cpp, csrc/gemm_q8.cpp): the same bits however the prompt is split, close to (not the
        bits of) the decode step fed one token at a time."""
        T = embeds.shape[0]
        embeds = embeds.contiguous()
        assert embeds.dtype == self.dtype and embeds.dim() == 2 and cache.k.dtype == self.dtype
        k, v = cache.k, cache.v
        slots = torch.full((T,), slot, dtype=torch.int64)
        positions = torch.arange(start, start + T, dtype=torch.int32)
        last = torch.tensor([T - 1], dtype=torch.int64)
        logits = torch.empty(1, self.vocab, dtype=torch.float32)
        threads = threads or torch.get_num_threads()
        self.model.forward(T, 0, embeds.data_ptr(), slots.data_ptr(), positions.data_ptr(), last.data_ptr(), 1,
                           k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2), k.stride(3), k.shape[3],
                           k.shape[1], logits.data_ptr(), threads, prompt=True)
        return logits


    def mixed(self, cache, embeds, slots, positions, logit_rows, threads=None):
        """Rows each at its own (cache row, position) in one call: embeds (R, C) in the compute dtype, slots (R,)
        int64, positions (R,) int32 -> logits (len(logit_rows), V) float32 of the rows logit_rows (ascending)
        names; every row's K/V written. The server's iteration: one row per decoding request (its last token's
        embedding) and a prompt's next slice as consecutive positions of its cache row, so the weights are read
        once for both instead of once per call (SmolLM2-135M bfloat16, AMX, 2 loaded cores: 15 decode rows + a
        32-token slice 89-118 ms, against 131-184 ms as a step and a prefill). A row's bits are those of the same row in
        `__call__` or `prefill` (the GEMVs' and the AMX tiles' sums per row do not depend on the other rows, and
        attention runs per query: csrc/decode.h), except with int4 or int8 projections (`prompt_gemm`), which
        refuse."""
        if self.prompt_gemm:
            raise ValueError("int4 and int8 projections run a prompt's rows through their own GEMMs: no mixed calls")
        if logit_rows.shape[0] < 1:  # the native call reads an empty list (a null pointer) as every row
            raise ValueError("mixed: logit_rows is empty; name at least one row")
        R = embeds.shape[0]
        embeds = embeds.contiguous()
        assert embeds.dtype == self.dtype and embeds.dim() == 2 and cache.k.dtype == self.dtype
        assert slots.dtype == torch.int64 and positions.dtype == torch.int32 and logit_rows.dtype == torch.int64
        slots, positions, logit_rows = slots.contiguous(), positions.contiguous(), logit_rows.contiguous()
        k, v = cache.k, cache.v
        logits = torch.empty(logit_rows.shape[0], self.vocab, dtype=torch.float32)
        threads = threads or torch.get_num_threads()
        self.model.forward(R, 0, embeds.data_ptr(), slots.data_ptr(), positions.data_ptr(), logit_rows.data_ptr(),
                           logit_rows.shape[0], k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                           k.stride(3), k.shape[3], k.shape[1], logits.data_ptr(), threads, prompt=False)
        return logits


def _signature(net):
    # Every tensor's address, not a sample of them: a single replaced weight (an in-process LoRA merge of one
    # projection kind, param.data = ...) would otherwise leave the step reading the old copy, silently.
    # ~300 data_ptr() calls for SmolLM2's 30 layers: ~0.1 ms per Decoder.
    modules = (net.language_model, net.lm_head)
    return tuple(t.data_ptr() for m in modules for t in (*m.parameters(), *m.buffers()))


def for_model(net):
    """The model's NativeDecodeStep (built once and kept on the module), or None where it cannot run the model."""
    if why_not(net) is not None:
        return None
    step = net.__dict__.get("_native_decode_step")
    if step is None or step.signature != _signature(net):
        step = NativeDecodeStep(net)
        net.__dict__["_native_decode_step"] = step
    return step
