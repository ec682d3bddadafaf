"""Prefill, the one-token decode step, and sampling (gpt-fast's structure, with batches of ragged rows).

Rows of different lengths share one batch without left padding: each row's tokens sit at positions
0..len-1 (RoPE positions are exact), the static KV cache holds each row's keys at those positions, and every
decode step writes row b's new key at its own position `lengths[b]`. A row therefore attends to exactly the
tokens it would see alone, so greedy output per row equals running the row by itself.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass

import torch

from llava_fast.cpu import native_decode
from llava_fast.cpu import plan as cpu_plan
from llava_fast.cpu.gemv import decode_threads, torch_one_thread
from llava_fast.errors import InputError
from llava_fast.model import KVCache, LlavaForCausalLM

# Temperatures below this are greedy, as in vLLM (its _SAMPLING_EPS): 1e-300 became a float32 0 in the division
# of the logits, every token's probability NaN, and each draw id 0 whatever the logits.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    # vLLM's extensions that benchmarks use: EOS ids cannot be drawn before min_tokens new tokens (their logits
    # are -inf), and with ignore_eos an EOS id is a token like any other (the row runs to its token budget, so
    # two engines under test produce the same number of tokens). Stop strings still end a row either way.
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self):
        # Checked here, before any work: a string or NaN temperature would otherwise fail (or silently
        # sample garbage) deep inside the first decode step. Zeros are valid settings, never "unset".
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = no cut), got {self.top_k!r}")
        if self.seed is not None and not (is_integer(self.seed) and -2**63 <= self.seed < 2**64):
            # torch.Generator.manual_seed's range; beyond it a bare "Overflow when unpacking long long"
            raise InputError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if not is_integer(self.min_tokens) or self.min_tokens < 0:
            raise InputError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0

    def eos_for_row(self, eos_token_ids):
        """The ids that end a row under these settings: none with ignore_eos."""
        return None if self.ignore_eos else eos_token_ids

    def generator(self, device):
        if self.temperature == 0:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def is_integer(value) -> bool:
    """An int (or numpy integer), not a bool and not a float that happens to be whole (5.0)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def positions_needed(prompt_tokens: int, max_new_tokens: int) -> int:
    """KV-cache positions a generation of max_new_tokens after a prompt uses: the prompt's, plus one per new
    token fed back. The last new token is sampled from the logits of the position before it and never fed
    back, so a 512-token context holds a 500-token prompt and 13 new tokens."""
    return prompt_tokens + max_new_tokens - 1


def suppress_eos(logits, eos_token_ids):
    """logits (B, V) with every EOS id at -inf (a copy): min_tokens' rule, applied before sampling."""
    ids = [eos_token_ids] if is_integer(eos_token_ids) else list(eos_token_ids or ())
    if not ids:
        return logits
    logits = logits.clone()
    logits[:, ids] = float("-inf")
    return logits


def greedy_tokens(logits) -> list[int]:
    """logits (B, V) -> each row's argmax as a list of ints (the first of equal maxima; a NaN counts as the
    maximum, as torch.argmax counts it). On the CPU in float32 numpy's argmax does it: a serving step's 16 x
    49k logits took 1.26 ms in torch.argmax on one thread (the scheduler's host work runs on one) and 0.14 ms
    in numpy's (Sapphire Rapids), ~10% of the native 16-row step it follows (tiny LLaVA-1.5, bfloat16)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def sample_next_token(logits, sampling: Sampling, generator):
    """logits (B, V) -> next token ids (B,), on the device, without a host sync."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keeps the smallest set reaching top_p
        # The most likely token always stays: a top_p under float32's smallest number (1e-300) compared as 0 and
        # dropped every token, and the draw from all -inf was id 0.
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # argmax(p / E), E ~ Exp(1), draws from p (the exponential race) with no multinomial host sync.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def decode_step(net: LlavaForCausalLM, cache: KVCache, lengths, tokens):
    """The one-token decode step: tokens (B,) at positions lengths (B,) -> next-token logits (B, V) fp32;
    writes their K/V into `cache` and advances `lengths` in place. No host sync, no data-dependent shape:
    the body torch.compile(fullgraph=True) and a CUDA graph take whole."""
    x = net.embed(tokens.view(-1, 1))  # (B, 1, C)
    hidden = net.decode_hidden(x, cache, lengths.clone(), None)  # (B, 1, C)
    lengths += 1
    return net.lm_head(hidden[:, 0]).float()


def prefill_logits(net: LlavaForCausalLM, cache: KVCache, x, start_pos):
    """Unpadded prefill: embeddings x (B, T, C), every row T tokens after start_pos (B,) cached ones (None:
    an empty cache) -> the last token's logits (B, V) fp32, lm_head on B rows only."""
    hidden = net.decode_hidden(x, cache, start_pos, None)  # (B, T, C)
    return net.lm_head(hidden[:, -1]).float()


class Decoder:
    """One batch's decoding state: the static KV cache and each row's length, allocated once.

    With `cuda_graph=True` (CUDA + the Triton backend, whose decode path never syncs with the host) the
    one-token step is captured as a CUDA graph on its first call and replayed afterwards: a 7B decode step is
    ~1,000 kernel launches, which at ~5 us each would cost as much as the step's own ~5 ms of weight reads.
    The graph bakes in the batch size and cache capacity, so LlavaModel keeps decoders per (batch bucket,
    capacity) and reuses them across calls (`reset()`). With `compiled` (llava_fast.compiled.CompiledSteps)
    the decode step and unpadded prefills run torch.compile'd (and the graph captures the compiled step).
    """

    def __init__(self, net: LlavaForCausalLM, batch_size: int, max_tokens: int, cuda_graph: bool = False,
                 compiled=None, cache: KVCache | None = None):
        self.net = net
        weight = net.language_model.embed_tokens.weight  # the compute dtype even when lm_head is quantized
        self.device, self.dtype = weight.device, weight.dtype
        self.batch_size = batch_size
        # cache: storage of the caller's (the server's, resident only where written: serve/kv_memory.py)
        self.cache = cache if cache is not None else KVCache(net.cfg.text, batch_size, max_tokens, self.device,
                                                             self.dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)  # tokens cached per row
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.compiled = compiled
        # Which path decodes and prefills, on how many threads: the model's plan (cpu/plan.py). Native (CPU,
        # eager): the decode step of <= native_decode.MAX_ROWS rows as one native call (csrc/decode.cpp).
        self.plan = cpu_plan.for_model(net)
        self.native = native_decode.for_model(net) if compiled is None and self.plan.decode == "native" else None
        self.graph = None
        self.static_tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.static_logits = None

    def reset(self):
        self.lengths.zero_()

    @torch.inference_mode()
    def prefill(self, rows, pixel_values=None, start_pos=None, image_sizes=None):
        """Append rows (lists of ids, image tokens expanded) after start_pos[b] cached tokens per row.
        LLaVA-NeXT: pixel_values are the images' tiles and image_sizes (N, 2) their sizes (model.embed).

        Returns the logits of each row's last token, (B, V). start_pos None means an empty cache.
        """
        B, T = len(rows), max(len(r) for r in rows)
        assert B == self.batch_size, "pad the batch to the decoder's batch size"
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        ids = ids.to(self.device, non_blocking=True)
        if start_pos is None:
            self.lengths.zero_()
        else:
            self.lengths.copy_(torch.as_tensor(start_pos, dtype=torch.int32))
        start = time.perf_counter()
        native_prefill = self.native is not None and self.plan.prefill == "native"
        # A text prompt's embedding rows gathered by torch on one thread when the native prefill follows: on two,
        # torch's OpenMP worker spun through the prefill's first milliseconds against its pool (libgomp 2-3% of
        # the samples of SmolLM2-135M int8 127-token prefills, 2 threads, Xeon).
        with self.host_threads() if native_prefill and pixel_values is None else contextlib.nullcontext():
            x = self.net.embed(ids, pixel_values, image_sizes=image_sizes)
        if pixel_values is not None and x.is_cuda:
            torch.cuda.synchronize(x.device)  # the tower's time, not its launch (one sync per image prefill)
        # Where the first token's wait goes: embed_end - start is the vision tower + projector (+ the token
        # embedding rows, ~0.1% of it), the rest of the wait is the prefill.
        self.embed_start, self.embed_end = start, time.perf_counter()
        if native_prefill:  # each row natively (rows are independent)
            logits = torch.cat([self.native.prefill(self.cache, b, int(self.lengths[b]), x[b, :len(r)],
                                                    self.plan.threads) for b, r in enumerate(rows)])
            self.lengths += torch.tensor([len(r) for r in rows], dtype=torch.int32)
            return logits
        # What the host knows picks the attention path: no padding and an empty cache need no masks or syncs.
        starts = None if start_pos is None else self.lengths.clone()
        if all(len(r) == T for r in rows):
            prefill = prefill_logits if self.compiled is None or T < 2 else self.compiled.prefill
            logits = prefill(self.net, self.cache, x, starts)
            self.lengths += T
            return logits
        seq_lens = torch.tensor([len(r) for r in rows], dtype=torch.int32).to(self.device, non_blocking=True)
        hidden = self.net.decode_hidden(x, self.cache, starts, seq_lens)  # (B, T, C)
        last = hidden[torch.arange(B, device=self.device), seq_lens.long() - 1]  # (B, C): lm_head on B rows only
        self.lengths += seq_lens
        return self.net.lm_head(last).float()

    @torch.inference_mode()
    def prefill_slot(self, slot, ids, image_features=None, start_pos=0):
        """Append one row's ids to cache row `slot` after its first start_pos cached tokens, leaving every
        other row's K/V and length untouched (continuous batching: a request joins while others decode).

        image_features: (N, num_image_tokens, Cv) from net.image_features() for the images among the new ids.
        Returns the logits of the last token, (1, V). Runs as its own batch of one, outside any CUDA graph.
        """
        ids_t = torch.as_tensor([ids], dtype=torch.long).to(self.device, non_blocking=True)  # (1, T)
        x = self.net.embed(ids_t, image_features=image_features)  # (1, T, C)
        return self.prefill_embeddings(slot, x[0], start_pos)

    @torch.inference_mode()
    def prefill_embeddings(self, slot, x, start_pos):
        """prefill_slot on embeddings x (T, C) (net.embed's output, images spliced in): a prompt entered in
        chunks (the server's chunked prefill) is this call on consecutive slices of its embeddings, each after
        the positions the previous slices filled. Returns the logits of the last position, (1, V)."""
        T = x.shape[0]
        if self.native is not None and self.plan.prefill == "native":
            logits = self.native.prefill(self.cache, slot, start_pos, x, self.plan.threads)  # raises before writing
            self.lengths[slot] = start_pos + T
            return logits
        start = torch.tensor([start_pos], dtype=torch.int32, device=self.device)
        seq_lens = torch.tensor([T], dtype=torch.int32, device=self.device)
        self.lengths[slot] = start_pos + T
        hidden = self.net.decode_hidden(x[None], self.cache.rows(slot, slot + 1), start, seq_lens)  # (1, T, C)
        return self.net.lm_head(hidden[:, -1]).float()

    @property
    def mixes(self) -> bool:
        """Whether `mixed_step` runs: the native step prefills too, and no int4 or int8 projection has its own GEMM."""
        return self.native is not None and self.plan.prefill == "native" and not self.native.prompt_gemm

    def host_threads(self):
        """Around the host's work between native steps (sampling the logits): torch on one thread, so no OpenMP
        worker of torch's spins through the next native step against its pool (cpu/gemv.py torch_one_thread)."""
        return torch_one_thread() if self.native is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def mixed_step(self, slots, tokens, slices):
        """One decode step of the rows `slots` (their next tokens `tokens`) and prompt slices, in one native call
        (NativeDecodeStep.mixed): slices [(slot, x (T, C), start_pos)] each append x to its row as
        prefill_embeddings does. Rows not named keep their K/V and lengths. Returns (logits (len(slots), V) of
        the decoding rows, logits (len(slices), V) of each slice's last position)."""
        with self.host_threads():  # torch ops on one thread up to the native call: the gather, the cat
            embed = self.net.language_model.embed_tokens.weight  # the native step's own gather of a token's row
            parts, slot_ids = [embed[torch.as_tensor(tokens, dtype=torch.long)]], list(slots)
            positions = [int(self.lengths[s]) for s in slots]
            for slot, x, start in slices:
                parts.append(x)
                slot_ids += [slot] * x.shape[0]
                positions += range(start, start + x.shape[0])
            last = torch.tensor([x.shape[0] for _, x, _ in slices], dtype=torch.int64).cumsum(0) + len(slots) - 1
            logit_rows = torch.cat([torch.arange(len(slots), dtype=torch.int64), last])  # never empty: a call has rows
            logits = self.native.mixed(self.cache, torch.cat(parts), torch.tensor(slot_ids, dtype=torch.int64),
                                       torch.tensor(positions, dtype=torch.int32), logit_rows, self.plan.threads)
            if slots:
                self.lengths[torch.as_tensor(slots, dtype=torch.long)] += 1
            for slot, x, start in slices:
                self.lengths[slot] = start + x.shape[0]
            return logits[:len(slots)], logits[len(slots):]

    @torch.inference_mode()
    def copy_prefix(self, src, dst, n):
        """Copy cache row src's first n positions into row dst: a request reuses another row's prefix (system
        prompt + image) without destroying that row's cache (a 600-token 7B prefix is 300 MiB, ~0.1 ms of
        HBM bandwidth, against ~40 ms to prefill it again)."""
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]

    @torch.inference_mode()
    def step(self, tokens):
        """tokens (B,) -> logits (B, V) for the next position. With a CUDA graph the returned tensor is the
        graph's static output buffer: read it before the next step. Without one, tokens (n,) steps rows 0..n-1."""
        if not self.cuda_graph:
            return self._step(tokens)
        if self.graph is None:
            self._capture()
        self.static_tokens.copy_(tokens)
        self.graph.replay()
        return self.static_logits

    def _step(self, tokens):
        # Without a graph, tokens may cover only the first n <= B rows (the server steps the slots up to its
        # highest active one); the other rows' caches and lengths are untouched (lengths[:n] is a view).
        n = tokens.shape[0]
        cache, lengths = ((self.cache, self.lengths) if n == self.batch_size
                          else (self.cache.rows(0, n), self.lengths[:n]))
        if self.native is not None and n <= native_decode.MAX_ROWS:
            with self.host_threads():
                return self.native(cache, lengths, tokens, self.plan.threads)  # no torch op inside
        step = decode_step if self.compiled is None else self.compiled.decode
        with decode_threads(self.plan):  # CPU: torch ops on one thread, the GEMVs on the plan's (gemv.py)
            return step(self.net, cache, lengths, tokens)

    def _capture(self):
        # Warm up on a side stream (compiles the Triton kernels, and the step itself when compiled; capture
        # cannot compile), then capture. The warm-up steps write K/V at each row's next position, which the
        # real step overwrites; lengths are restored, so the cache state is unchanged.
        saved = self.lengths.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(self.static_tokens)
                self.lengths.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = self._step(self.static_tokens)
        self.lengths.copy_(saved)  # capture records without running; restore in case a warm-up side effect leaked


def generate_token_steps(decoder: Decoder, first_logits, max_new_tokens, sampling: Sampling, eos_token_ids=None):
    """Yield the (B,) tensor of new tokens at each step, max_new_tokens times at most, without reading them
    back to the host; the caller stops early by closing the generator (EOS, stop strings). The first
    sampling.min_tokens tokens are never one of eos_token_ids."""

    def pick(logits, i):
        if i < sampling.min_tokens:
            logits = suppress_eos(logits, eos_token_ids)
        return sample_next_token(logits, sampling, generator)

    generator = sampling.generator(decoder.device)
    tokens = pick(first_logits, 0)
    for i in range(max_new_tokens):
        yield tokens
        if i + 1 < max_new_tokens:
            logits = decoder.step(tokens)  # a native step keeps torch on one thread itself; a torch step must not
            with decoder.host_threads():  # the sampler's ops, or their OpenMP workers spin through the next step
                tokens = pick(logits, i + 1)


def batch_bucket(batch_size):
    """CUDA graphs are captured per bucket (1, 2, 4, 8, ... rows): a batch pads up to its bucket."""
    bucket = 1
    while bucket < batch_size:
        bucket *= 2
    return bucket


class RowOutput:
    """One row's generated ids and text: UTF-8-safe deltas, EOS, and stop strings. Text that could be the
    start of a stop string is held back until it cannot be, so a stream never shows a partial stop string.
    eos_token_id: None, one id, or several (any of them ends the row)."""

    def __init__(self, tokenizer, stop, eos_token_id):
        self.decoder = None if tokenizer is None else tokenizer.stream_decoder()  # None: ids only, no text
        self.stop = stop
        self.eos = frozenset() if eos_token_id is None else frozenset(
            [eos_token_id] if is_integer(eos_token_id) else eos_token_id)
        self.ids: list[int] = []
        self.text, self.emitted, self.done = "", 0, False

    def push(self, token) -> str:
        self.ids.append(token)
        if token in self.eos:
            return self.finish()
        if self.decoder is None:
            return ""
        self.text += self.decoder.push(token)
        if self._cut_at_stop():
            return self.finish(flush=False)
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        delta = self.text[self.emitted : len(self.text) - hold]
        self.emitted += len(delta)
        return delta

    def _cut_at_stop(self) -> bool:
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def finish(self, flush=True) -> str:
        """End the row (EOS, stop string or token budget) and return the text not yet emitted."""
        if not self.done:
            self.done = True
            if flush and self.decoder is not None:
                self.text += self.decoder.flush()
                self._cut_at_stop()
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def common_prefix(a, b) -> int:
    """The length of the longest common prefix of two sequences (the KV-cache positions two prompts share)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
