"""The continuous-batching engine behind `llava-fast serve`: one thread owns the model and its KV cache.

In:  `Request`s (prompt ids with image tokens expanded, decoded images keyed by a pixel hash with the number
     of positions each fills, sampling settings, a thread-safe `emit` callback) through `Scheduler.submit()`
     from any thread. An image fills a fixed number of positions (LLaVA v1 / 1.5: 576) or, LLaVA-NeXT, a
     number that depends on its size (its base tile, the unpadded AnyRes grid and one newline per grid row:
     image/anyres.py); every count below (admission, the token budget, the caches) uses each image's own.
Out: `Event`s through each request's `emit`: "token" (a text delta and, when asked, that token's logprobs),
     then exactly one "done" (finish_reason "stop"/"length", token counts) or "error".

The loop (after vLLM's and Orca's iteration-level scheduling, Yu et al. 2022), one iteration per decode step:
  1. admit: each waiting request takes a free slot (a row of the KV cache: max_batch rows of max_model_len
     tokens) and the longest cached prefix of its prompt (below); it is then a prefilling row.
  2. chunked prefill: the iteration's token budget (max_batched_tokens, vLLM's max_num_batched_tokens) goes to
     the decoding rows first, one token each; what is left goes to the prefilling rows in admission order: a
     row's images the feature cache lacks go through the vision tower (counted as the positions each
     fills), then its prompt enters its slot in slices of the budget (`Decoder.prefill_embeddings`), the other
     rows keeping their K/V. When its last slice is in, its first token is sampled and it decodes. A new
     image's 576 tokens thus no longer stall every decoding row for the whole prefill: each step waits for at
     most one budget's worth of prefill. The vision tower is not split (one image's tower is one piece of work):
     a request's missing images, all their tiles, go through it as one batch, charged to the budget at their
     positions or, where the budget is measured (CPU, none given: serve/budget.py), at the tower's measured
     cost in prompt tokens, so it shares its iteration with other slices, its own first one included, when
     the budget has room for it. Where the budget is measured, it bounds the iteration's time: fewer decoding
     rows leave their time to the slices, and while no row decodes, whole prompts go in (up to a cap that
     bounds memory), since no decoding row waits on them.
  3. step: one decode step of the decoding rows; each row samples its own next token. With the native CPU step
     (Decoder.mixes) the step and the slices of 2. are one call over all their rows, reading the weights once:
     a slice then costs the decoding rows its own arithmetic, not a second pass over the weights (SmolLM2-135M
     bfloat16, 2 cores, 16 clients: output tokens/s ~65 -> ~110, ITL p99/p50 3.8-5.9x -> 2.3-2.6x, loaded
     host), and a row whose last slice went in samples its first token from that call and decodes from the next.
     Elsewhere the slices are prefilled first, then rows [0, highest decoding slot] are stepped together.
  4. a row that ends (EOS, stop string, max_tokens) or is cancelled (client gone) frees its slot at once.
Rows never pad each other: each row attends only to its own positions (see generate.py), so a row's greedy
output equals `generate()` of the same request alone, whatever else shares the batch and however its prompt
was sliced (tests/test_serve_chunked.py).

Two caches save work for repeated images:
  - image features: CLIP features of all of an image's tiles (before the projector, which is cheap, and before
    LLaVA-NeXT's unpadding; Cv = 1024 wide instead of the decoder's 4096, so 4x more images per MiB on
    llava-1.5-7b) in an LRU keyed by the hash of the decoded pixels and their size, bounded in bytes: a
    repeated image skips preprocessing and the vision tower.
  - prefix reuse: a freed slot keeps the K/V of its prompt (and reply), and a running row's prompt K/V stays
    as it is while the row decodes; a new request takes the longest prefix of its own that any row holds
    (image positions compared by image hash), in place when it is a free row's whole cache, else copied into
    a free row, and prefills only the rest. System prompt + the same image is then prefilled once.
  - image prefixes: after a prefill with images, the K/V of its prompt up to the end of its last image
    (system prompt + image) is kept in an LRU bounded in bytes (the same budget as the features, each), so a
    repeated image finds its prefix after every row that held it has been reused (16 clients on 16 rows
    leave no spare rows to keep prefixes in): it is copied into the new row like a row's prefix.
Each admission batch is queued for prefill cheapest first (tokens left after the reused prefix, plus the vision
tower's work for images the feature cache lacks), so a repeated image does not wait behind a new one.
Without mixing, rows inside the stepped range that are not decoding (free, or prefilling) are parked: their
length is reset after each step to the end of what their slot holds, so the step's write lands on a position no
cached prefix holds (a prefilling row's next slice overwrites it).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from llava_fast.errors import InputError
from llava_fast.generate import (
    Decoder,
    RowOutput,
    Sampling,
    common_prefix,
    greedy_tokens,
    positions_needed,
    sample_next_token,
    suppress_eos,
)
from llava_fast.image import anyres
from llava_fast.serve.budget import MIN_CALLS, SPREAD_STEPS, IterationCost
from llava_fast.serve.kv_memory import KVMemory, default_kv_cache_memory

log = logging.getLogger("llava_fast.serve")


RETUNE_CALLS = 16  # mixed calls between refits of the measured budget (a fit of 256 calls takes ~0.1 ms)
MAX_MEASURED_BUDGET = 2048  # the GPU default: beyond it a prompt is one slice anyway on the models served here
# Prompt tokens of an iteration in which no row decodes (measured budget only): nothing waits on the slices then,
# so whole prompts go in, until this cap. Four ~700-token image prompts at 7B shapes went in as 96-token slices
# (the budget's start value), one call each, each re-reading the 14 GB of weights; one call runs them in chunks
# of 128 rows (csrc/decode.cpp) with the activations of 128 rows and ~1 MB of attention scores at any T; what the
# cap bounds is the call's input and the prompts' embeddings, T x C (2048 x 4096 floats, 32 MiB, at 7B shapes).
IDLE_PREFILL_TOKENS = MAX_MEASURED_BUDGET
# Seconds of prompt arithmetic a call may add beside decoding rows when fewer rows decode than a full batch (the
# room the missing rows and the spread allowance give a slice, _prompt_budget): a full batch's own slice is never
# cut. At LLaVA-1.5-7B shapes (2 cores, c ~9.6 ms per prompt token, a step ~0.6-0.8 s) that room was up to a
# 700-token prompt beside 1-3 rows, 5-10 s while they waited (ITL p99 9.7 s at 4 clients, p50 0.77 s); 1 s is
# ~100 tokens there, a call of ~2x a step. On the tiny LLaVA-1.5 (0.13 ms) and SmolLM2-135M (0.25-0.6 ms) 1 s is
# 1700-7700 tokens, at or past MAX_MEASURED_BUDGET: the cap does not bind.
MAX_SLICE_SECONDS = 1.0
# The start-up calls' prompt slice: CALIBRATION_TOKENS tokens at positions CALIBRATION_START.., attending to ~192
# earlier positions on average as a 128-token slice at 128..255 did (at positions 0..63 the fit's c came out at
# 0.025-0.036 ms per token against the served calls' 0.071-0.079, tiny LLaVA-1.5). 64 tokens, not 128: at
# LLaVA-1.5-7B shapes a prompt token costs ~9 ms on 2 cores, so the slice call's excess over a step halves (~1.2
# -> ~0.6 s) while 64 tokens' cost still stands out of a call's noise (a step ~0.6 s there; tiny: 8 ms beside ~6).
CALIBRATION_TOKENS = 64
CALIBRATION_START = 160
# The start-up measurement (Scheduler._calibrate): one round of calls where it takes CALIBRATION_SECONDS or more
# (LLaVA-1.5-7B shapes: each call re-reads 13 GB of weights, ~0.6 s on 2 cores, and the slice adds ~0.6 s), else a
# warm-up round (the first calls' allocations) and timed rounds until CALIBRATION_SECONDS are spent, each call's
# median over them fitted (the host's other work lands on a few calls: tiny LLaVA-1.5's fits from two rounds of
# single calls set budgets of 140-289 tokens, one run to the next, on a loaded 2-core host).
CALIBRATION_SECONDS = 0.5
# The measured budget's least slice beside a full batch: a prompt then needs at most ~5 iterations' slices
# (bench prompts: 20-170 tokens) however costly a token is beside a step.
MIN_SLICE_TOKENS = 32


def default_max_batched_tokens(device, mixes=False) -> int:
    """Tokens per iteration (decode rows + prefill slices) when the server is given none.
    CPU, step and slices in one call (`mixes`): 96. An iteration then costs one pass over the weights plus its
    rows' arithmetic, so the budget bounds it against a decode step. SmolLM2-135M bfloat16 (AMX), 16 clients,
    32 requests, 2 quiet cores, two interleaved rounds each, ITL p99/p50 / TTFT p50 ms / output tok/s: 128:
    3.4x / 179 / 317; 96: 2.9x / 184 / 322; 80: 2.4x / 215 / 323; 64: 2.3x / 317 / 312 (separate calls at 128:
    4.5x / 177 / 282). Below 96 a ~130-token prompt takes a third slice, and TTFT grows.
    CPU, separate calls: 128, so a slice of 112 tokens beside 16 decoding rows costs about two decode steps (tiny
    preset, 2 busy cores: 132 ms for 112 prompt tokens natively, 60 ms per 16-row step). 16 clients, 32
    requests, interleaved rounds: 64 / 128 / 256 gave ITL p99/p50 2.1 / 2.5-3.2 / 3.9-4.6 and output tokens/s
    71 / 84-113 / 78 (64 also doubled TTFT p50).
    A GPU runs 2,048 (vLLM's default) in about a decode step's time.
    With `mixes` and no budget given, the scheduler replaces this start value by one measured on the model
    (serve/budget.py)."""
    if torch.device(device).type != "cpu":
        return 2048
    return 96 if mixes else 128


class QueueFull(Exception):
    """More requests are waiting than the scheduler accepts (the server answers 503 + Retry-After)."""


class SchedulerStopped(Exception):
    """The scheduler is shutting down and takes no new requests."""


@dataclass
class Event:
    kind: str  # "token", "done", "error"
    text: str = ""
    logprobs: list | None = None  # OpenAI logprobs content entries for this event's tokens
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # The error body's type: "internal_error" (HTTP 500) or "server_shutdown" (HTTP 503: the server stopped
    # before the request finished, nothing the request did wrong).
    error_type: str = "internal_error"


@dataclass
class Request:
    """One generation. ids: the prompt with image tokens expanded; images: decoded PIL RGB images, in the
    order of their token runs; image_keys: a hash of each image's pixels and size (the feature-cache key);
    image_tokens: the positions each image's run fills in ids."""

    ids: list[int]
    images: list
    image_keys: list[str]
    image_tokens: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    emit: callable
    logprobs: bool = False
    top_logprobs: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set from any thread; the scheduler frees the row at its next step
    stage_seconds: dict = field(default_factory=dict)  # the first token's wait by part (ServeMetrics.stage_clock)

    def cancel(self):
        self.cancelled = True


class FeatureCache:
    """LRU of CLIP image features (tiles, L, Cv) keyed by pixel hash, bounded by the bytes its tensors hold."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def get(self, key):
        features = self.entries.get(key)
        if features is not None:
            self.entries.move_to_end(key)
        return features

    def put(self, key, features):
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


class _Row:
    """A request while it holds a slot."""

    def __init__(self, req: Request, slot: int, tokenizer, eos_token_id, device):

        self.req, self.slot = req, slot
        self.out = RowOutput(tokenizer, req.stop, req.sampling.eos_for_row(eos_token_id))
        self.generator = req.sampling.generator(device)  # seeded: the same draws as generate() of this request
        self.generated: list[int] = []
        self.last_time = None
        # Prefill state: the prompt's positions [start, position) are in the slot; embeddings (T, C) hold
        # positions start.. once the images from first_image on have their features (None before).
        self.keys: list = []
        self.start = self.position = self.first_image = 0
        self.embeddings = None
        self.decoding = False


class Scheduler:
    """Owns `model` (a LlavaModel) on its own thread. max_batch rows x max_model_len tokens of KV cache are
    allocated once; max_waiting bounds the queue; image_cache_bytes bounds the feature LRU."""

    def __init__(self, model, *, max_batch=16, max_model_len=None, max_waiting=256, image_cache_bytes=256 << 20,
                 max_batched_tokens=None, kv_cache_memory=None, metrics=None):
        from llava_fast.serve.metrics import ServeMetrics

        self.model = model
        self.max_batch = max_batch
        if max_batched_tokens is not None and max_batched_tokens <= max_batch:
            raise InputError(f"max_batched_tokens ({max_batched_tokens}) must be more than max_batch "
                             f"({max_batch}): the decoding rows take one token each of it first")
        if max_model_len is not None and not 1 <= max_model_len <= model.context_length:
            # Refused, as vLLM refuses it, rather than capped without a word: the operator asked for a context the
            # model was not trained for (its positions end at max_position_embeddings).
            raise InputError(f"max_model_len (--max-model-len) must be from 1 to the model's context length of "
                             f"{model.context_length} tokens, got {max_model_len}")
        self.max_model_len = max_model_len or model.context_length
        self.max_waiting = max_waiting
        self.metrics = metrics or ServeMetrics()
        self.features = FeatureCache(image_cache_bytes)
        self.prefixes = FeatureCache(image_cache_bytes)  # keys tuple -> K and V stacked, (2, L, Hkv, P, D)
        self.kv = None  # CPU: K/V resident only where written, under a budget (kv_memory.py); GPU: dense
        if model.device.type == "cpu":
            self.kv = KVMemory(model.net.cfg.text, max_batch, self.max_model_len,
                               model.net.language_model.embed_tokens.weight.dtype,
                               kv_cache_memory or default_kv_cache_memory())
            if self.kv.budget_blocks < 1:
                raise InputError(f"kv_cache_memory ({self.kv.budget_bytes} bytes) holds no block of "
                                 f"{self.kv.block_tokens} tokens ({self.kv.block_bytes} bytes)")
            log.info(self.kv.describe())
        self.decoder = Decoder(model.net, max_batch, self.max_model_len, cuda_graph=model._use_cuda_graphs(),
                               cache=None if self.kv is None else self.kv.cache)
        # A default leaves the prefill at least as many tokens as max_batch decoding rows take (--max-batch 128).
        self.max_batched_tokens = max_batched_tokens or max(
            default_max_batched_tokens(model.device, self.decoder.mixes), 2 * max_batch)
        # Without a budget given, the mixed CPU call's measured costs raise it (serve/budget.py): it starts at the
        # default above and follows the fit every RETUNE_CALLS calls, never below that default. Below it, the
        # default's own tuning on SmolLM2 (where the fit gives 80-96) showed each 16 tokens less costing more
        # TTFT (184 -> 215 -> 317 ms) than it saved in ITL p99.
        self.cost = IterationCost(max_batch) if max_batched_tokens is None and self.decoder.mixes else None
        # The measured budget's floor: the default's own tuning above was of a budget that held at every row
        # count; the measured one's slice grows as rows go missing (_prompt_budget), so beside a full batch the
        # fit decides (SmolLM2 bfloat16, 2-core VM: 85-110 tokens at one step of slice, around the default 96, which
        # would otherwise hold the full batch's slice at 80 as often as not).
        self.min_budget = max_batch + MIN_SLICE_TOKENS
        self.metrics.max_batched_tokens.set(self.max_batched_tokens)
        self.eos = model.tokenizer.eos_token_ids  # any of them ends a row (as generate() ends it)
        self.rows: list[_Row | None] = [None] * max_batch
        self.slot_keys: list[list] = [[] for _ in range(max_batch)]  # the tokens whose K/V each slot holds
        self.freed_at = [0.0] * max_batch
        self.parked = torch.zeros(max_batch, dtype=torch.int32, device=model.device)  # free rows' lengths
        self.active = torch.zeros(max_batch, dtype=torch.bool, device=model.device)
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[_Row] = []  # rows whose prompt is entering their slot, in admission order
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="llava-fast-scheduler", daemon=True)
        self.fault = None  # tests: a callable run before each prefill slice, to inject an unexpected error
        self._report_kv()

    # ------------------------------------------------------------------------------------------------
    # The outside: submit, counts, start/stop (any thread)
    # ------------------------------------------------------------------------------------------------

    def start(self):
        if self.cost is not None:
            self._calibrate()
        self.thread.start()
        return self

    def submit(self, req: Request):
        if self.kv is not None:
            need = positions_needed(len(req.ids), req.max_tokens)
            if self.kv.blocks(need) > self.kv.budget_blocks:
                raise InputError(f"the prompt ({len(req.ids)} tokens) and max_tokens ({req.max_tokens}) need "
                                 f"{need} positions of KV cache, more than the server's whole kv-cache-memory "
                                 f"holds ({self.kv.budget_tokens})")
        with self.cond:
            if self.stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self.metrics.waiting.set(len(self.waiting))
            self.cond.notify()

    @property
    def num_running(self):
        return sum(r is not None for r in self.rows)

    def stop(self, timeout=None):
        """Stop taking requests; rows still running after `timeout` seconds are ended with an error event."""
        with self.cond:
            self.stopping = True
            self.drain_deadline = time.monotonic() + (timeout or 0)
            self.cond.notify()
        self.thread.join()

    # ------------------------------------------------------------------------------------------------
    # The loop (scheduler thread only)
    # ------------------------------------------------------------------------------------------------

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.waiting and not self.num_running and not self.stopping:
                        self.cond.wait()
                    if self.stopping and (not self.num_running or time.monotonic() > self.drain_deadline):
                        break
                    admit = []
                    free = [s for s, r in enumerate(self.rows) if r is None]
                    while self.waiting and len(admit) < len(free):
                        req = self.waiting.popleft()
                        if not req.cancelled:
                            admit.append(req)
                    self.metrics.waiting.set(len(self.waiting))
                admitted = set()
                # Cheapest prefill first (stable: FIFO among equals; every request of this batch is admitted
                # before the next step, so none starves): a repeated image's short prefill no longer waits
                # behind a new image's tower + full prefill that arrived just before it.
                admit.sort(key=self._prefill_cost)
                try:
                    for i, req in enumerate(admit):
                        if not self._admit(req):  # no KV-cache memory for it yet: it and the rest wait
                            with self.cond:
                                self.waiting.extendleft(sorted(admit[i:], key=lambda r: r.arrival, reverse=True))
                                self.metrics.waiting.set(len(self.waiting))
                            admitted.update(id(r) for r in admit[i:])
                            break
                        admitted.add(id(req))
                    self._drop_cancelled()
                    self._iterate()
                except Exception:  # a bug outside the model calls: fail the rows in flight, keep serving
                    log.exception("scheduler iteration failed")
                    in_rows = {id(row.req) for row in self.rows if row is not None}
                    for row in self.rows:
                        if row is not None:
                            self._end(row, error="internal error", keep_cache=False)
                    for req in admit:  # failed before it had a row: its client still gets an answer (500)
                        if id(req) not in admitted and id(req) not in in_rows:
                            self._emit(req, Event("error", error="internal error"))
                self.metrics.running.set(self.num_running)
                self._report_kv()
        for row in self.rows:
            if row is not None:
                self._end(row, error="the server shut down before this request finished",
                          error_type="server_shutdown")
        with self.cond:
            for req in self.waiting:
                self._emit(req, Event("error", error="the server shut down before this request started",
                                      error_type="server_shutdown"))
            self.waiting.clear()

    def _choose_slot(self, keys):
        """(slot, reused prefix length) for a request: a free slot, holding the longest prefix of keys that any
        row's cache holds. A running row's prompt K/V never changes while it decodes (it only appends), so a
        prefix held by a running row (system prompt + the same image) is copied from there; a free row's
        prefix is copied too when taking that row would destroy cached tokens beyond the shared prefix, so the
        source keeps serving later requests."""
        free = [s for s, row in enumerate(self.rows) if row is None]
        source, source_common = free[0], -1
        for slot in free + [s for s, row in enumerate(self.rows) if row is not None]:  # free rows win ties
            common = common_prefix(keys, self.slot_keys[slot])
            if common > source_common:
                source, source_common = slot, common
        kept, kept_common = self._kept_prefix(keys)
        if self.rows[source] is None and source_common == len(self.slot_keys[source]) >= kept_common:
            return source, source_common  # nothing beyond the prefix to lose (e.g. a chat follow-up)
        # Rows below the highest active one are stepped anyway (parked), and so are the next two: take the least
        # valuable of those (never used, else freed longest ago). Farther rows are taken only when these are
        # busy, so a lone client does not walk its steps up through all max_batch rows (1-client output
        # tokens/s fell to 0.43x of one-by-one generate() on the tiny CPU preset when every prefix copy went to
        # the least recently used row of all 16), while two rows still alternate and keep each other's prefix.
        hi = max((s + 1 for s, row in enumerate(self.rows) if row is not None), default=0)
        victim = min(free, key=lambda s: (s >= hi + 2, bool(self.slot_keys[s]), self.freed_at[s], s))
        victim_common = common_prefix(keys, self.slot_keys[victim])
        if kept_common > max(source_common, victim_common):
            self.decoder.cache.k[:, victim, :, :kept_common] = kept[0, :, :, :kept_common]
            self.decoder.cache.v[:, victim, :, :kept_common] = kept[1, :, :, :kept_common]
            return victim, kept_common
        if source != victim and source_common > victim_common:
            self.decoder.copy_prefix(source, victim, source_common)
            return victim, source_common
        return victim, victim_common

    def _kept_prefix(self, keys):
        """(K/V (2, L, Hkv, P, D), shared length) of the kept image prefix sharing the longest prefix with
        keys; (None, 0) when none shares any."""
        best, best_common = None, 0
        for held in self.prefixes.entries:
            common = common_prefix(keys, held)
            if common > best_common:
                best, best_common = held, common
        return (self.prefixes.get(best), best_common) if best is not None else (None, 0)

    def _keep_prefix(self, slot, keys):
        """Keep slot's K/V up to the end of the prompt's last image (see the module docstring)."""
        end = max((i + 1 for i, k in enumerate(keys) if not isinstance(k, int)), default=0)
        if end and tuple(keys[:end]) not in self.prefixes.entries:
            k, v = self.decoder.cache.k[:, slot, :, :end], self.decoder.cache.v[:, slot, :, :end]
            self.prefixes.put(tuple(keys[:end]), torch.stack([k, v]))

    def _prompt_keys(self, req):
        """The prompt as cache keys: token ids, with each image position as (image hash, index in image)."""
        image_id = self.model.image_token_id
        keys, image, index = [], 0, 0
        for t in req.ids:
            if t == image_id:
                keys.append((req.image_keys[image], index))
                index += 1
                if index == req.image_tokens[image]:
                    image, index = image + 1, 0
            else:
                keys.append(t)
        return keys

    def _prefill_cost(self, req):
        """A request's admission work in prompt tokens: those after the longest prefix any row's cache holds,
        plus the positions of each image the feature cache lacks (the vision tower's work is of that order:
        0.7 s for one 576-position image against 2.1 s to prefill 328 tokens, tiny preset on the 2-core CPU;
        a LLaVA-NeXT image's tiles and positions grow together, 577 tower tokens per tile)."""
        keys = self._prompt_keys(req)
        cached = max([common_prefix(keys, held) for held in self.slot_keys] + [self._kept_prefix(keys)[1]])
        missing = sum(n for k, n in zip(req.image_keys, req.image_tokens) if self.features.entries.get(k) is None)
        return len(keys) - cached + missing

    def _image_features(self, req, first_image):
        """(CLIP features (tiles, L, Cv) of the request's images from first_image on, their tiles concatenated
        in order; (N, 2) image sizes for LLaVA-NeXT, else None; the positions of the images that went through
        the vision tower)."""
        images, keys = req.images[first_image:], req.image_keys[first_image:]
        out = [self.features.get(key) for key in keys]
        missing = {}  # key -> index of its first occurrence: an image repeated within the request runs once
        for i, features in enumerate(out):
            if features is None:
                missing.setdefault(keys[i], i)
        self.metrics.image_cache_hits.inc(len(out) - len(missing))
        self.metrics.image_cache_misses.inc(len(missing))
        if missing:
            clock = self.metrics.stage_clock(req, self.model.device)
            pixel_values, sizes = self.model.image_inputs([images[i] for i in missing.values()])  # all tiles
            clock("preprocess")
            computed = self.model.net.image_features(pixel_values)  # (tiles, L, Cv), one batch
            clock("vision")
            cfg = self.model.config
            tiles = [1] * len(missing) if sizes is None else [
                anyres.num_tiles(h, w, cfg.image_grid_pinpoints, cfg.vision.image_size) for h, w in sizes.tolist()]
            fresh = dict(zip(missing, computed.split(tiles)))
            for key, features in fresh.items():
                self.features.put(key, features)
            out = [fresh[k] if f is None else f for k, f in zip(keys, out)]
        sizes = (torch.tensor([(im.height, im.width) for im in images], dtype=torch.long)
                 if self.model.config.anyres else None)
        towered = sum(req.image_tokens[first_image + i] for i in missing.values())
        return (torch.cat(out) if out else None), sizes, towered

    def _admit(self, req):
        """Give req a slot and start its prefill; False (nothing changed) when the KV-cache budget cannot hold
        it until running rows end."""
        need = positions_needed(len(req.ids), req.max_tokens)
        if self.kv is not None:
            running = sum(self.kv.held[r.slot] for r in self.rows if r is not None)
            if running + self.kv.blocks(need) > self.kv.budget_blocks:
                return False
        keys = self._prompt_keys(req)
        slot, common = self._choose_slot(keys)
        common = min(common, len(keys) - 1)  # at least one new token gives the next-token logits
        while common > 0 and not isinstance(keys[common], int) and keys[common][1] != 0:
            common -= 1  # never start mid-image: the splice takes whole images
        first_image = sum(1 for k in keys[:common] if not isinstance(k, int) and k[1] == 0)  # images in the prefix
        self.metrics.image_cache_hits.inc(first_image)  # images inside the reused prefix skip the tower too
        if self.kv is not None:
            self._make_room(slot, need)
        row = _Row(req, slot, self.model.tokenizer, self.eos, self.model.device)
        row.keys, row.start, row.position, row.first_image = keys, common, common, first_image
        self.rows[slot] = row
        self.slot_keys[slot] = keys[:common]  # grows as the prompt's slices go in
        self.parked[slot] = common  # a step while this row prefills writes past what its slot holds
        self.decoder.lengths[slot] = common
        self.prefilling.append(row)
        self.metrics.prompt_tokens.inc(len(req.ids))
        self.metrics.cached_prompt_tokens.inc(common)
        return True

    def _make_room(self, slot, need):
        """Reserve `need` positions for slot: its pages past them (an older request's) go back to the system,
        then free rows' cached K/V, least recently freed first, until the reservation fits the budget."""
        self.kv.release(slot, keep_tokens=need)
        free = sorted((s for s, row in enumerate(self.rows) if row is None and s != slot and self.kv.held[s]),
                      key=lambda s: self.freed_at[s])
        while not self.kv.fits(slot, need):
            victim = free.pop(0)  # _admit checked that the running rows leave room, so one is left
            self.kv.release(victim, 0)
            self.slot_keys[victim] = []
            self.parked[victim] = self.decoder.lengths[victim] = 0
        self.kv.reserve(slot, need)

    def _report_kv(self):
        m = self.metrics
        if self.kv is None:
            k = self.decoder.cache.k
            m.kv_cache_budget_bytes.set(2 * k.numel() * k.element_size())
            m.kv_cache_held_bytes.set(2 * k.numel() * k.element_size())
        else:
            m.kv_cache_budget_bytes.set(self.kv.budget_bytes)
            m.kv_cache_held_bytes.set(self.kv.reserved_bytes)
        m.kv_cache_live_tokens.set(sum(len(r.keys) + len(r.generated) - 1 if r.decoding else r.position
                                       for r in self.rows if r is not None))

    def _iterate(self):
        """One iteration's model work: the prefill slices the token budget leaves room for, and one decode step
        of the decoding rows. Where the decoder mixes them (the native CPU step), both go in one call, so the
        weights are read once: a slice then delays the decoding rows by its own arithmetic only, not by a
        second pass over the weights (SmolLM2-135M bfloat16, 2 cores: a pass ~60 ms at any row count)."""
        slices = self._plan_slices()
        if self.decoder.mixes:
            with self.decoder.host_threads():  # sampling too (Decoder.host_threads); the vision tower is above
                self._mixed(slices)
            return
        for row, n in slices:
            self._prefill_slice(row, n)
        if any(row is not None and row.decoding for row in self.rows):
            self._step()  # Decoder.step keeps torch on one thread around a native step, not around a torch one

    def _plan_slices(self):
        """[(row, tokens)]: what the decoding rows leave of this iteration's token budget, given to the
        prefilling rows in admission order. A row's images go through the vision tower (and its prompt through
        the embedding) here, before its first slice; a row whose embedding fails ends with an error."""
        decoding = sum(1 for row in self.rows if row is not None and row.decoding)
        left = full = self._prompt_budget(decoding)
        slices = []
        for row in list(self.prefilling):
            if left <= 0 or (not decoding and slices and not self._joins_idle_call(len(slices), row)):
                break
            req = row.req
            if row.embeddings is None and left < full and self._tower_charge(req, row.first_image) > left:
                continue  # the vision tower is not split: it waits for an iteration with room for it
            try:
                if self.fault is not None:
                    self.fault()
                if row.embeddings is None:
                    started = time.perf_counter()
                    features, sizes, towered = (self._image_features(req, row.first_image)
                                                if len(req.images) > row.first_image else (None, None, 0))
                    clock = self.metrics.stage_clock(req, self.model.device)
                    ids = torch.as_tensor([req.ids[row.start:]], dtype=torch.long, device=self.model.device)
                    row.embeddings = self.model.net.embed(ids, image_features=features, image_sizes=sizes)[0]  # (T, C)
                    clock("vision" if features is not None else "prefill")  # the projector, or embedding rows
                    if towered and self.cost is not None:  # preprocessing, tower and projector, measured
                        self.cost.add_tower(towered, time.perf_counter() - started)
                        measured = self.cost.tower_tokens(towered)
                        towered = towered if measured is None else measured
                    left -= towered
                    if left <= 0:
                        break
            except Exception:
                log.exception("prefill failed")
                self._fail_prefill(row)
                continue
            n = min(left, len(req.ids) - row.position)
            slices.append((row, n))
            left -= n
        return slices

    def _joins_idle_call(self, prompts, row):
        """Whether row's prompt (and its tower) goes into a call that no decoding row waits on beside the
        `prompts` whole prompts already in it, rather than into the next call. Joining delays each of those
        prompts' first token by its work and saves it the next call's fixed cost a (the pass over the weights),
        so it joins when prompts x its work < a; otherwise it waits one call, and the prompts finish in
        arrival order one call apart instead of all together after the last one's work. Tiny LLaVA-1.5 on 2
        cores: a ~3 ms against ~30 ms for a new image's tower and prompt, so 8 requests arriving together get
        their first tokens ~35 ms apart from ~35 ms on, where all 8 towers and 4 prompts in one call gave the
        first four theirs after ~160 ms. Unmeasured (no fit yet): it joins, up to the budget."""
        if self.cost is None or self.cost.coef is None:
            return True
        a, _, c = self.cost.coef
        work = len(row.req.ids) - row.position + (self._tower_charge(row.req, row.first_image)
                                                  if row.embeddings is None else 0)  # in prompt tokens
        return prompts * work * c < a

    def _prompt_budget(self, decoding):
        """The prompt tokens this iteration may take beside `decoding` rows. A budget given (or a decoder that
        does not mix) is a hard cap, as vLLM's max_num_batched_tokens: what the rows leave of it. A measured one
        bounds the iteration's time instead (serve/budget.py): rows that are not decoding leave their cost to
        the prompt, and with no row decoding whole prompts go in, up to IDLE_PREFILL_TOKENS.
        What a slice adds to an iteration is a delay for every row waiting on it, the decoding rows and the
        prompt's own: the allowance a full batch gives a slice (max_batch rows) bounds those rows' delay summed,
        so beside k decoding rows the slice takes max_batch / (k + 1) times the full batch's slice tokens. Beside
        max_batch - 1 rows nothing changes (the 16-client ITL p99); beside 7 of 16 (8 clients) a slice has
        twice the room, and a tiny LLaVA-1.5 image prompt (~330 tokens after its tower) goes in 2 slices
        instead of 3 (2-core VM: slice calls per 32 requests 73-90 -> 49, server-side TTFT p50 ~20% lower).
        The allowance spread is SPREAD_STEPS steps', the full batch's own slice one step's (serve/budget.py): the
        iterations of 14-15 decoding rows, the ITL's tail at 16 clients, lose the excess; beside fewer rows the
        slice keeps the room the missing rows and the spread leave, up to MAX_SLICE_SECONDS of its arithmetic."""
        left = self.max_batched_tokens - decoding
        if self.cost is None:
            return left
        if decoding == 0:
            return max(left, IDLE_PREFILL_TOKENS)
        shared = 0  # the slice's allowance beyond a full batch's, spread over the rows that wait on it (below)
        if self.cost.coef is not None:
            spread = max(self.max_batch / (decoding + 1) - 1, 0.0)  # 0 at a full batch: no row left to prefill
            shared = int(min(self.cost.slice_tokens(SPREAD_STEPS), MAX_MEASURED_BUDGET) * spread)
        tokens = min(left + self.cost.spare_row_tokens(self.max_batch - decoding) + shared, MAX_MEASURED_BUDGET)
        if self.cost.coef is not None:  # what the growth beyond a full batch's slice may delay a decoding row
            tokens = min(tokens, max(left, int(MAX_SLICE_SECONDS / self.cost.coef[2])))
        return tokens

    def _tower_charge(self, req, first_image):
        """What the vision tower run for req's images from first_image on takes of the budget: its measured
        cost in prompt tokens where the budget is measured, else one token per image position; 0 when the
        feature cache holds them all."""
        positions = sum(n for k, n in zip(req.image_keys[first_image:], req.image_tokens[first_image:])
                        if self.features.entries.get(k) is None)
        measured = self.cost.tower_tokens(positions) if positions and self.cost is not None else None
        return positions if measured is None else measured

    def _retune(self, min_calls=MIN_CALLS, min_sliced=4):
        """Set the budget from the fit of the recent mixed calls: the decoding rows plus the prompt tokens
        that cost SLICE_STEPS full-batch decode steps (serve/budget.py), at least min_budget."""
        if self.cost.fit(min_calls, min_sliced) is None:
            return
        tokens = self.max_batch + self.cost.slice_tokens()
        self.max_batched_tokens = min(max(tokens, self.min_budget), MAX_MEASURED_BUDGET)
        self.metrics.max_batched_tokens.set(self.max_batched_tokens)

    def _calibrate(self):
        """Measure the budget before the first request (start(), before the server answers): rounds of three
        mixed calls on scratch rows (max_batch - 1 decoding rows, 1 row (at max_batch 2: the slice alone), and
        max_batch - 1 rows beside a CALIBRATION_TOKENS-token slice), which determine a, b and c, fitted at once;
        the vision tower's cost until its first run is measured is its FLOPs' worth of prompt tokens
        (IterationCost.set_tower_prior).
        The served calls' fit takes over from MIN_CALLS calls on. Without this, a fresh server ran its first
        MIN_CALLS calls at the start value (96 tokens: tiny LLaVA-1.5 image prompts of ~330 tokens went in as 4-5
        slices, and 8 requests arriving together waited 90-640 ms for their first token, all above the run's
        median) and charged the first towers at one token per position (256, ~2.5x their measured cost).
        A round that takes CALIBRATION_SECONDS or more is the only one: at LLaVA-1.5-7B shapes each call re-reads
        13 GB of weights, and two rounds of four calls (a 128-token slice), a warm-up call and two tower runs took
        11.0-11.8 s beside a 16 s load. A cheaper round was a warm-up: timed rounds follow for CALIBRATION_SECONDS,
        and each call's median over them is fitted. Where the fit is not physical (a call slowed by the host's other
        work: 1 of 6 single rounds at 7B shapes on a loaded 2-core host), rounds are added, up to three, whose
        median drops one slowed call. The rows' K/V is given back afterwards."""
        B, T = self.max_batch, min(CALIBRATION_TOKENS, self.max_model_len // 2)
        if B < 2 or T < 1:
            return
        start = min(CALIBRATION_START, self.max_model_len - T)  # earlier positions (zeros), as a later slice's
        embed = self.model.net.language_model.embed_tokens.weight
        generator = torch.Generator(device=embed.device).manual_seed(0)
        x = embed[torch.randint(embed.shape[0], (T,), generator=generator, device=embed.device)]  # (T, C)
        slot = B - 1  # the slice's row; rows 0..B-2 decode
        # At --max-batch 2 the full batch's B - 1 rows are the 1-row call's one row, and three calls of one row
        # cannot tell a from b: there the second call is the slice alone (0 rows), which can.
        shapes = [(B - 1, False), (1, False) if B > 2 else (0, True), (B - 1, True)]

        def timed_round():
            seconds = []
            for rows, sliced in shapes:
                self.decoder.lengths.zero_()
                started = time.perf_counter()
                self.decoder.mixed_step(list(range(rows)), [0] * rows, [(slot, x, start)] if sliced else [])
                seconds.append(time.perf_counter() - started)
            return seconds

        def fitted():
            self.cost.calls.clear()
            for (rows, sliced), seconds in zip(shapes, zip(*rounds)):
                self.cost.add(rows, T if sliced else 0, float(np.median(seconds)))
            return self.cost.fit(len(shapes), min_sliced=1) is not None

        measured_from = time.perf_counter()
        with torch.inference_mode(), self.decoder.host_threads():
            rounds = [timed_round()]
            if sum(rounds[0]) < CALIBRATION_SECONDS:  # a warm-up: time rounds until CALIBRATION_SECONDS are spent
                rounds = [timed_round()]
                while sum(map(sum, rounds)) < CALIBRATION_SECONDS:
                    rounds.append(timed_round())
            while not fitted() and len(rounds) < 3:  # other work slowed a call enough to make the fit unphysical
                rounds.append(timed_round())
        if self.model.net.vision_tower is not None:
            self.cost.set_tower_prior(*self._tower_flops())
        self.decoder.lengths.zero_()
        for s in range(B):
            self.kv.release(s, 0)
        self._retune(min_calls=len(shapes), min_sliced=1)
        log.info(self.describe_budget(time.perf_counter() - measured_from))

    def describe_budget(self, seconds: float) -> str:
        """The start-up log line: the prompt-token budget per call and the costs it came from."""
        if self.cost.coef is None:
            return (f"token budget: {self.max_batched_tokens} per call (the start value: the measurement's "
                    f"calls could not tell a row's cost from a prompt token's in {seconds:.1f} s)")
        a, b, c = self.cost.coef
        return (f"token budget: {self.max_batched_tokens} per call, measured in {seconds:.1f} s (a call "
                f"{a * 1e3:.2f} ms + {b * 1e3:.3f} ms a decoding row + {c * 1e3:.3f} ms a prompt token; the "
                f"budget follows the served calls from here)")

    def _tower_flops(self):
        """(FLOPs per image position of the vision tower's encoder layers run and the projector, FLOPs per
        prompt token of the decoder's layers): their weights' multiply-adds x 2. Attention's share is left out
        (ViT-L/14-336: ~9% of its layer's FLOPs over 577 positions; a decoder token at position ~200: ~3%)."""
        cfg = self.model.config
        v, t = cfg.vision, cfg.text
        tower = cfg.num_vision_layers_run * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
        tower += v.hidden_size * t.hidden_size + (t.hidden_size ** 2 if cfg.projector_type == "mlp2x_gelu" else 0)
        qkvo = t.hidden_size * (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim
        token = t.num_layers * (qkvo + 3 * t.hidden_size * t.intermediate_size)
        return 2 * tower, 2 * token

    def _slice_embeddings(self, row, n):
        return row.embeddings[row.position - row.start: row.position - row.start + n]  # (n, C)

    def _fail_prefill(self, row):
        self.prefilling.remove(row)
        self.parked[row.slot] = self.decoder.lengths[row.slot] = 0
        self._end(row, error="internal error")

    def _prefill_slice(self, row, n):
        """Prefill row's next n prompt positions on their own (the decoder does not mix them into the step)."""
        try:
            clock = self.metrics.stage_clock(row.req, self.model.device)
            logits = self.decoder.prefill_embeddings(row.slot, self._slice_embeddings(row, n), row.position)
            clock("prefill")
        except Exception:
            log.exception("prefill failed")
            self._fail_prefill(row)
            return
        self._slice_done(row, n, logits[0])

    def _slice_done(self, row, n, logits):
        """Row's next n prompt positions are in its slot; logits (V,): its last position's. A row whose whole
        prompt is in samples its first token and decodes from now on."""
        req, slot = row.req, row.slot
        row.position += n
        self.parked[slot] = row.position
        # The positions in so far are final: a request with the same system prompt + image arriving now
        # copies them from here instead of prefilling them again.
        self.slot_keys[slot] = row.keys[:row.position]
        self.metrics.prefill_chunks.inc()
        if row.position < len(req.ids):
            return
        self.prefilling.remove(row)
        row.embeddings, row.decoding = None, True
        self.slot_keys[slot] = row.keys
        self._keep_prefix(slot, row.keys)
        self.active[slot] = True
        self._push(row, logits)

    def _mixed(self, slices):
        """The decode step of every decoding row and this iteration's prompt slices in one native call
        (Decoder.mixed_step): only the decoding rows are stepped (no parked rows). A row whose slice completes
        its prompt samples its first token from this call and joins the next step."""
        decoding = [r for r in self.rows if r is not None and r.decoding]
        if not decoding and not slices:
            return
        work = [(row.slot, self._slice_embeddings(row, n), row.position) for row, n in slices]
        try:
            started = time.perf_counter()
            step_logits, slice_logits = self.decoder.mixed_step([r.slot for r in decoding],
                                                                [r.generated[-1] for r in decoding], work)
            spent = time.perf_counter() - started
        except Exception:
            log.exception("decode step failed")
            for r in decoding + [row for row, _ in slices]:
                self._end(r, error="internal error", keep_cache=False)
            return
        if self.cost is not None:
            self.cost.add(len(decoding), sum(n for _, n in slices), spent)
            if self.cost.added % RETUNE_CALLS == 0:
                self._retune()
        for (row, n), logits in zip(slices, slice_logits):
            row.req.stage_seconds["prefill"] = row.req.stage_seconds.get("prefill", 0.0) + spent
            self._slice_done(row, n, logits)
        greedy = greedy_tokens(step_logits)
        for i, r in enumerate(decoding):
            self._push(r, step_logits[i], greedy[i])

    def _step(self):
        hi = max(s for s, r in enumerate(self.rows) if r is not None and r.decoding) + 1
        n = self.max_batch if self.decoder.cuda_graph else hi  # a CUDA graph runs its whole batch
        tokens = [0] * n  # parked rows feed token 0 (their write lands past what their slot holds)
        for r in self.rows[:n]:
            if r is not None and r.decoding:
                tokens[r.slot] = r.generated[-1]
        try:
            logits = self.decoder.step(torch.tensor(tokens, device=self.model.device))  # (n, V)
            lengths = self.decoder.lengths
            lengths.copy_(torch.where(self.active, lengths, self.parked))
        except Exception:
            log.exception("decode step failed")
            for r in self.rows:
                if r is not None:
                    self._end(r, error="internal error", keep_cache=False)
            return
        greedy = greedy_tokens(logits)
        for r in list(self.rows[:n]):
            if r is not None and r.decoding:
                self._push(r, logits[r.slot], greedy[r.slot])

    def _push(self, row, logits, greedy_token=None):
        """Sample row's next token from its logits (V,), emit it, and end the row when it is done."""
        req = row.req
        allowed = logits  # logprobs stay the model's (before min_tokens' mask, as before temperature)
        if len(row.generated) < req.sampling.min_tokens:
            allowed, greedy_token = suppress_eos(logits[None], self.eos)[0], None
        if req.sampling.temperature == 0:
            token = int(greedy_token if greedy_token is not None else allowed.argmax())
        else:
            token = int(sample_next_token(allowed[None], req.sampling, row.generator)[0])
        row.generated.append(token)
        delta = row.out.push(token)
        now = time.perf_counter()
        if row.last_time is None:
            self.metrics.observe_first_token(now - req.arrival, req.stage_seconds)
        else:
            self.metrics.observe_inter_token(now - row.last_time)
        row.last_time = now
        self.metrics.generation_tokens.inc()
        entries = self._logprobs(logits, token, req.top_logprobs) if req.logprobs and token not in row.out.eos else None
        finish = "stop" if row.out.done else ("length" if len(row.generated) >= req.max_tokens else None)
        if finish == "length":
            delta += row.out.finish()
        if delta or entries:
            self._emit(req, Event("token", text=delta, logprobs=entries))
        if finish:
            self._end(row, finish_reason=finish)
        elif req.cancelled:
            self._end(row, finish_reason="cancelled")

    def _logprobs(self, logits, token, top):
        """OpenAI's logprobs content entry for `token`: its log-probability under the model (before
        temperature and top-k/top-p, as vLLM reports it) and the `top` most likely tokens."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        entry = self._token_entry(token, float(logprobs[token]))
        entry["top_logprobs"] = []  # OpenAI's ChatCompletionTokenLogprob requires it; its TopLogprob entries lack it
        if top:
            values, ids = logprobs.topk(top)
            entry["top_logprobs"] = [self._token_entry(i, v) for i, v in zip(ids.tolist(), values.tolist())]
        return [entry]

    def _token_entry(self, token, logprob):
        raw = self.model.tokenizer.token_bytes(token)  # " is" for byte-level BPE's "Ġis", a byte for "<0xE4>"
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    @staticmethod
    def _emit(req, event):
        try:
            req.emit(event)
        except Exception:  # e.g. the HTTP side's event loop already closed: the row must still be freed
            log.exception("could not deliver an event")
            req.cancel()

    def _drop_cancelled(self):
        for r in self.rows:
            if r is not None and r.req.cancelled:
                self._end(r, finish_reason="cancelled")

    def _end(self, row, finish_reason=None, error=None, keep_cache=True, error_type="internal_error"):
        slot, req = row.slot, row.req
        if row in self.prefilling:  # cancelled (or failed) before its prompt was all in
            self.prefilling.remove(row)
        self.rows[slot] = None
        self.active[slot] = False
        self.freed_at[slot] = time.monotonic()
        if keep_cache and error is None:
            # Every generated token but the last was fed back through the decoder, so its K/V is cached.
            self.slot_keys[slot] = self.slot_keys[slot] + row.generated[:-1]
        else:
            self.slot_keys[slot] = []
        if self.kv is not None:  # what it wrote stays (prefix reuse) and counts, until room is needed
            if self.slot_keys[slot]:
                self.kv.hold_written(slot, len(self.slot_keys[slot]))
            else:
                self.kv.release(slot, 0)
        self.parked[slot] = len(self.slot_keys[slot])
        self.decoder.lengths[slot] = len(self.slot_keys[slot])
        usage = dict(prompt_tokens=len(req.ids), completion_tokens=len(row.generated))
        if error is not None:
            self._emit(req, Event("error", error=error, error_type=error_type, **usage))
        else:
            self._emit(req, Event("done", finish_reason=finish_reason, **usage))
