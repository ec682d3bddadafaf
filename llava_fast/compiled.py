"""torch.compile of the decoder's hot path: the one-token decode step and the unpadded prefill.

In: the functions `generate.decode_step` and `generate.prefill_logits` (the eager path runs the same
bodies). Out: their compiled versions, which `Decoder` calls when a model was loaded with `compile=True`
(`--compile`), and the wall time spent compiling.

- Both are compiled with fullgraph=True: a graph break would put Python back between the ops of every
  token, which is the overhead compiling removes. The bodies have no host sync (the decoder passes what it
  knows on the host, an empty cache and no padding, as None rather than as tensors to test).
- Shapes: the batch size is static (one graph per batch size); the cache capacity and the prefill length
  are marked dynamic, so a new prompt length or max_new_tokens does not recompile. A padded batch prefill
  runs eagerly (its nonzero() has a data-dependent shape).
- On the CPU inductor generates C++ loops for the torch backend's elementwise work (RoPE, RMSNorm, SwiGLU,
  the masks), which with the ops' custom-op boundary inlined (see ops.py) leaves the GEMMs, SDPA and a few
  fused loops per layer. On CUDA the Decoder captures the compiled step in its CUDA graph, as it does the
  eager one, so the token loop has no launch overhead and no host sync either way.
- Cost: tens of seconds per graph on 2 CPU cores, paid on the first call of each (kind, batch size) in a
  process and never by a model loaded without compile=True. `LlavaModel.last_stats["compile_s"]` reports
  the time of the calls that compiled during the last generation.
"""

from __future__ import annotations

import time

import torch

from llava_fast.generate import decode_step, prefill_logits

_COMPILED = {}  # "decode" / "prefill" -> the torch.compile'd function, shared by every model of the process
_SEEN = set()  # signatures whose graph is already compiled in this process (dynamo reuses a graph for
# another net of the same shapes: the parameters are graph inputs)


def _compiled(kind):
    if kind not in _COMPILED:
        fn = decode_step if kind == "decode" else prefill_logits
        _COMPILED[kind] = torch.compile(fn, fullgraph=True)
    return _COMPILED[kind]


class CompiledSteps:
    """The compiled decode step and prefill of one model; `compile_s` accumulates compile time."""

    def __init__(self):
        self.compile_s = 0.0

    def _call(self, kind, signature, *args):
        from llava_fast import ops

        key = (kind, ops.BACKEND, repr(args[0].cfg.text), *signature)  # args[0]: the net (its shapes)
        if key in _SEEN:
            return _compiled(kind)(*args)
        start = time.perf_counter()
        out = _compiled(kind)(*args)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.compile_s += time.perf_counter() - start
        _SEEN.add(key)
        return out

    def decode(self, net, cache, lengths, tokens):
        """generate.decode_step, compiled."""
        torch._dynamo.maybe_mark_dynamic(cache.k, 3)  # the capacity: one graph for every max_tokens
        torch._dynamo.maybe_mark_dynamic(cache.v, 3)
        return self._call("decode", (tokens.shape[0], net.lm_head.weight.dtype, tokens.device.type), net, cache,
                          lengths, tokens)

    def prefill(self, net, cache, x, start_pos):
        """generate.prefill_logits, compiled (x (B, T, C) with T >= 2: a size-1 dim cannot be dynamic)."""
        torch._dynamo.maybe_mark_dynamic(cache.k, 3)
        torch._dynamo.maybe_mark_dynamic(cache.v, 3)
        torch._dynamo.maybe_mark_dynamic(x, 1)
        return self._call("prefill", (x.shape[0], start_pos is None, x.dtype, x.device.type), net, cache, x,
                          start_pos)
