"""Prometheus metrics of `llava-fast serve` (prometheus_client), in a registry of their own per server.

In: the scheduler and the HTTP routes update them. Out: `render()` -> the text exposition for GET /metrics.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: decode steps take ~1 ms (7B on an H100) to ~100 ms (tiny on a busy CPU); TTFT adds queueing.
RECENT_GAPS = 4096
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llava_fast_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.running = Gauge("llava_fast_running_rows", "requests holding a KV-cache slot", registry=r)
        self.waiting = Gauge("llava_fast_waiting_requests", "requests queued for a slot", registry=r)
        self.prompt_tokens = Counter("llava_fast_prompt_tokens", "prompt tokens admitted (image tokens included)",
                                     registry=r)
        self.cached_prompt_tokens = Counter("llava_fast_cached_prompt_tokens",
                                            "prompt tokens whose K/V a slot already held (not prefilled)", registry=r)
        self.generation_tokens = Counter("llava_fast_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram("llava_fast_time_to_first_token_seconds",
                                             "request accepted -> first token sampled", registry=r,
                                             buckets=_LATENCY_BUCKETS)
        # The time to first token of a request, in parts (each summed over the request's slices and images; all
        # three lie inside its TTFT, which also holds its wait in the queue and the decode steps between slices).
        self.image_preprocess = Histogram("llava_fast_image_preprocess_seconds", "a request's images the feature "
                                          "cache lacks -> pixel_values (resize, crop, normalise); requests that "
                                          "ran the vision tower", registry=r, buckets=_LATENCY_BUCKETS)
        self.vision_encode = Histogram("llava_fast_vision_encode_seconds", "a request's vision tower + projector; "
                                       "requests that ran the vision tower", registry=r, buckets=_LATENCY_BUCKETS)
        self.prefill = Histogram("llava_fast_prefill_seconds", "a request's prompt slices through the decoder "
                                 "(what a cached prefix left to prefill); every request", registry=r,
                                 buckets=_LATENCY_BUCKETS)
        self.inter_token_latency = Histogram("llava_fast_inter_token_latency_seconds",
                                             "time between a request's consecutive tokens", registry=r,
                                             buckets=_LATENCY_BUCKETS)
        # The histogram's buckets double, so a quantile read from them is only known within 2x; these are exact
        # over the most recent gaps (what a dashboard and `bench serve` compare: p99 against p50).
        self.recent_inter_token_latency = Gauge("llava_fast_recent_inter_token_latency_seconds",
                                                f"inter-token latency quantiles over the last {RECENT_GAPS} gaps",
                                                ["quantile"], registry=r)
        self._recent_gaps = collections.deque(maxlen=RECENT_GAPS)
        self._recent_lock = threading.Lock()
        self.prefill_chunks = Counter("llava_fast_prefill_chunks", "prompt slices prefilled between decode steps "
                                      "(chunked prefill; a prompt within one iteration's budget is one slice)",
                                      registry=r)
        self.max_batched_tokens = Gauge("llava_fast_max_batched_tokens", "token budget of one iteration: one per "
                                        "decoding row, the rest for prefill slices", registry=r)
        self.kv_cache_budget_bytes = Gauge("llava_fast_kv_cache_budget_bytes", "KV-cache memory the server may "
                                           "hold (--kv-cache-memory; on a GPU the dense cache's size)", registry=r)
        self.kv_cache_held_bytes = Gauge("llava_fast_kv_cache_held_bytes", "KV-cache memory reserved by running "
                                         "rows plus cached prefixes of free rows (whole blocks)", registry=r)
        self.kv_cache_live_tokens = Gauge("llava_fast_kv_cache_live_tokens", "positions whose K/V running rows "
                                          "hold now", registry=r)
        self.image_cache_hits = Counter("llava_fast_image_cache_hits", "images that skipped the vision tower "
                                        "(feature cache or reused prefix)", registry=r)
        self.image_cache_misses = Counter("llava_fast_image_cache_misses", "images run through the vision tower",
                                          registry=r)

    @staticmethod
    def stage_clock(req, device):
        """A stopwatch for req's first-token parts: clock(part) adds the time since the last call (or since this
        one) to req.stage_seconds[part]. On CUDA it synchronises first, so a part is its kernels' time, not
        their launch."""
        sync = torch_cuda_sync if getattr(device, "type", device) == "cuda" else None
        last = [time.perf_counter()]

        def clock(part):
            if sync is not None:
                sync()
            now = time.perf_counter()
            req.stage_seconds[part] = req.stage_seconds.get(part, 0.0) + now - last[0]
            last[0] = now

        return clock

    def observe_first_token(self, seconds: float, stage_seconds: dict):
        """A request's time to first token and its parts (ServeMetrics.stage_clock)."""
        self.time_to_first_token.observe(seconds)
        for part, histogram in (("preprocess", self.image_preprocess), ("vision", self.vision_encode)):
            if part in stage_seconds:
                histogram.observe(stage_seconds[part])
        self.prefill.observe(stage_seconds.get("prefill", 0.0))

    def observe_inter_token(self, seconds: float):
        self.inter_token_latency.observe(seconds)
        with self._recent_lock:
            self._recent_gaps.append(seconds)

    def render(self) -> bytes:
        with self._recent_lock:
            gaps = np.array(self._recent_gaps)
        for q in ("0.5", "0.99"):
            self.recent_inter_token_latency.labels(q).set(float(np.quantile(gaps, float(q))) if gaps.size else 0.0)
        return generate_latest(self.registry)


def torch_cuda_sync():
    import torch

    torch.cuda.synchronize()
