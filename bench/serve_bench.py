"""`llava-fast bench serve`: the HTTP server under N concurrent clients, beside the same requests one by one.

Workload (seeded, the same for every run): `requests` chat requests; prompt lengths drawn uniformly from
8..128 words, max_tokens uniformly from 16..96 (a chat reply; `--max-tokens N`: 16..N), sent with `ignore_eos`
(vLLM's extension) so every engine produces exactly max_tokens tokens; half carry an image drawn from a pool half
their number, so about half of the image requests repeat an image an earlier request sent (PNG data: URLs of
random pixels).
`--images new`: every request carries an image no earlier request sent (the vision tower runs for each);
`--images none` (or `--text-only`) drops them, for text models. Greedy, the same system prompt for all (the
template's).

Engines, on the same weights in one process:
  - `generate-one-by-one`: `LlavaModel.stream()` of each request in turn (what a program without a server does).
  - `llava-fast/serve`: `llava-fast serve`'s app on uvicorn at 127.0.0.1 (a thread of this process; a fresh
    app per client count, so its image and prefix caches start empty), driven by `clients` concurrent httpx
    clients, each sending its next request when the last one's stream ended, streaming with usage.
  - with `--against URL`, instead of one-by-one: the server at URL (any OpenAI-compatible server: vLLM,
    llama.cpp's server, another llava-fast), driven by the same clients with the same workload, one engine at
    a time (llava-fast first, then the other, at each client count; default counts 1, 4, 8, 16). Requests name
    `--against-model` (default: the first id of the server's /v1/models). A request the server fails (an HTTP
    error, an error event) is counted and its first message kept: that engine's row says so.
    `--against-start CMD`: for a model of which the host holds one copy, not two (a 7B's 14 GB of bfloat16 weights
    on a 23 GiB host): llava-fast runs every client count first and its model is released; then CMD (a shell
    command that starts the other server at URL) is started in its own process group (setsid), the workload
    waits for URL's /v1/models (start-up budget START_TIMEOUT_S), runs every client count there, and the
    command's process group is stopped (SIGTERM, then SIGKILL after 30 s). What this process still held is kept
    in the notes.
Figures per engine and client count: requests/s and output tokens/s over the wall time of the whole
workload; TTFT (request sent -> first content chunk received; for generate(): call -> first text delta)
p50 (the figure's value, samples kept) and p99, split by image kind (`new`, `repeated`, `none`, `all`);
inter-token latency p50/p99 (gaps between a stream's consecutive content chunks); `serve_speedup` = output
tokens/s over one-by-one's; `serve_ttft_repeated_over_new` = TTFT p50 of repeated over new images; with
--against, `serve_ratio_*` = llava-fast's figure over the other server's (output tokens/s: higher is better;
TTFT and ITL: lower is better).
Memory (needs psutil): each server's resident set, sampled every 0.1 s on a thread of this process: idle
(started and warmed up, before the first request) and peak over the run, `serve_rss_idle` / `serve_rss_peak`.
llava-fast's server is this process (its only child is the clients' process, not counted); another server
on this machine is the process listening on its port plus all its children (vLLM's engine core), summed. For
llava-fast the peak sample is split, from its /metrics scraped at the same moment, into the weights (parameter
bytes), the live tokens' K/V (`llava_fast_kv_cache_live_tokens` x bytes per token) and the rest
(`serve_rss_overhead`): what the server holds besides weights and K/V (the runtime, allocator, prefix and
image caches, the cache's partly filled pages), to compare with the idle rest (`serve_rss_idle_overhead`).
The clients run in a child process, as a load generator does (vLLM's benchmark_serving, or any real client):
in this process their SSE reading and JSON parsing held the GIL that the scheduler thread needs between its
native steps (1.5 CPU-s of a 11.5-s run of 64 requests from 16 clients, tiny preset, 2-core CPU).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import numpy as np
import PIL.Image

from llava_fast.bench.device import Telemetry, command_line, device_info, measure_ceilings
from llava_fast.bench.report import figure, find_one, fmt, header_lines, md_table, new_document
from llava_fast.errors import InputError

ONE_BY_ONE, SERVER = "generate-one-by-one", "llava-fast/serve"
DEFAULTS = {
    "cpu": dict(preset="tiny", clients=[1, 4, 16, 64], requests=64, max_batch=16, repeats=1, warmup=1),
    "cuda": dict(preset="llava-1.5-7b", clients=[1, 4, 16, 64], requests=256, max_batch=64, repeats=1, warmup=1),
}
AGAINST_CLIENTS = [1, 4, 8, 16]
# --against-start: how long the other server may take to answer /v1/models. vLLM CPU's start at 7B shapes reads
# 14 GB of weights and compiles its graphs (60-100 s at the tiny shapes, 2-core VM).
START_TIMEOUT_S = 1500
WORDS = ("image", "picture", "colour", "person", "left", "right", "unusual", "describe", "what", "where", "why",
         "the", "a", "of", "in", "is", "this", "that", "detail", "background", "object", "scene", "light")


IMAGE_MIXES = ("mixed", "new", "none")


def workload(n, seed, images="mixed", max_tokens=96):
    """n requests: (messages, max_tokens, image kind), image kind new/repeated/none in send order. images:
    "mixed" (about half with an image, half of those repeated), "new" (every request a new image) or "none"
    (no images); True / False are "mixed" / "none". Each request's max_tokens is drawn from 16..max_tokens
    (1..max_tokens when that is below 16)."""
    import base64
    import io

    images = {True: "mixed", False: "none"}.get(images, images)
    if images not in IMAGE_MIXES:
        raise InputError(f"images: expected one of {', '.join(IMAGE_MIXES)}, got {images!r}")
    rng = np.random.default_rng(seed)
    draws = rng.random(n)
    with_image = np.ones(n, bool) if images == "new" else (draws < 0.5) & (images == "mixed")
    pool = n if images == "new" else max(1, int(with_image.sum()) // 2)
    urls = []
    for _ in range(pool):
        buf = io.BytesIO()
        size = (int(rng.integers(64, 400)), int(rng.integers(64, 400)))
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    seen, out = set(), []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, int(rng.integers(8, 129)))) + "?"
        draw = int(rng.integers(16, 97))  # drawn as for the default, so every max_tokens keeps the same prompts
        lo = min(16, max_tokens)
        reply_tokens = lo + (draw - 16) * (max_tokens - lo + 1) // 81
        if with_image[i]:
            k = i if images == "new" else int(rng.integers(pool))
            kind = "repeated" if k in seen else "new"
            seen.add(k)
            content = [{"type": "image_url", "image_url": {"url": urls[k]}}, {"type": "text", "text": text}]
        else:
            kind, content = "none", text
        out.append(([{"role": "user", "content": content}], reply_tokens, kind))
    return out


def run_one_by_one(model, requests):
    """[(ttft_s, [itl_s], tokens)] per request, and the wall time. Runs on a worker thread, as the server's
    scheduler does: on a 2-core host busy with other work, torch's two OpenMP threads made the main thread's
    generate() 3-5x slower than the same call on a fresh thread (12.2 s vs 3.4 s for 20 tokens on tiny), which
    would credit the server with a speedup that is only threading."""
    results = []

    def work():
        for messages, max_tokens, _ in requests:
            t0 = time.perf_counter()
            stamps = [time.perf_counter() for _ in model.stream(messages, max_new_tokens=max_tokens, ignore_eos=True)]
            stamps = stamps or [time.perf_counter()]
            results.append((stamps[0] - t0, list(np.diff(stamps)), model.last_stats["new_tokens"]))

    start = time.perf_counter()
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    if len(results) != len(requests):
        raise RuntimeError("the one-by-one run failed (see the traceback above)")
    return results, time.perf_counter() - start


async def _one_request(http, url, index, messages, max_tokens, model):
    """(ttft_s, [itl_s], tokens) of one streamed request, or the error message (str) of a failed one."""
    import json

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if model is not None:
        body["model"] = model
    t0, stamps, tokens = time.perf_counter(), [], None
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"request {index}: the server answered {r.status_code}: {(await r.aread())[:300]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # the server's error event (a failed step): its message, not a KeyError
                    return (f"request {index}: the server reported an error: "
                            f"{chunk['error'].get('message', chunk['error'])}")
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as err:  # connection refused or reset, a broken stream: the row says so
        return f"request {index}: {type(err).__name__}: {err}"
    stamps = stamps or [time.perf_counter()]
    return stamps[0] - t0, list(np.diff(stamps)), len(stamps) if tokens is None else tokens


async def _client_loop(http, url, queue, results, model):
    while queue:
        index, (messages, max_tokens, _) = queue.pop(0)
        results[index] = await _one_request(http, url, index, messages, max_tokens, model)


async def _drive(url, requests, clients, model=None):
    import httpx

    queue, results = list(enumerate(requests)), [None] * len(requests)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_client_loop(http, url, queue, results, model) for _ in range(clients)))
        return results, time.perf_counter() - start


def _client_main(job):
    """The child process (`python -c`): read (url, requests, clients) from the pickle file `job`, drive the
    workload, write ("ok", (results, wall)) or ("error", traceback) back into it."""
    import pickle
    import traceback

    with open(job, "rb") as f:
        url, requests, clients, model = pickle.load(f)
    try:
        out = ("ok", asyncio.run(_drive(url, requests, clients, model)))
    except BaseException:
        out = ("error", traceback.format_exc())
    with open(job, "wb") as f:
        pickle.dump(out, f)


def _run_clients_sampled(url, requests, clients, model, memory):
    """_run_clients (failures kept) with the resident memory of the server at url in `memory`, when it runs on
    this machine (else memory stays empty)."""
    processes = listening_processes(url)
    if processes is None:
        return _run_clients(url, requests, clients, model, failures_ok=True)
    sampler = MemorySampler(processes)
    sampler.idle()
    with sampler:
        out = _run_clients(url, requests, clients, model, failures_ok=True)
    memory.update(sampler.result())
    return out


def _run_clients(url, requests, clients, model=None, failures_ok=False):
    """(results, wall seconds) of `clients` concurrent clients in a child process (see the module docstring).
    A failed request's result is its error message; unless failures_ok, the first one raises RuntimeError.
    A plain `python -c` child, not multiprocessing's spawn: spawn re-imports the caller's __main__, which
    re-ran a calling script's whole benchmark in the child when the script had no `if __name__` guard."""
    import os
    import pickle
    import subprocess
    import tempfile

    fd, job = tempfile.mkstemp(suffix=".pkl", prefix="llava-fast-bench-serve-")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump((url, requests, clients, model), f)
        code = f"from llava_fast.bench.serve_bench import _client_main; _client_main({job!r})"
        done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        with open(job, "rb") as f:
            status, payload = pickle.load(f) if done.returncode == 0 else ("error", None)
        if status != "ok":
            raise RuntimeError(f"the benchmark's clients failed (exit code {done.returncode})"
                               + (f":\n{payload}" if payload else ""))
        failed = [r for r in payload[0] if isinstance(r, str)]
        if failed and not failures_ok:
            raise RuntimeError(f"{len(failed)} of {len(requests)} requests failed; the first: {failed[0]}")
        return payload
    finally:
        os.unlink(job)


class MemorySampler:
    """Resident memory of a server's processes while a workload runs (see the module docstring).

    processes: () -> the psutil.Process list to sum (re-read at each sample: a server may start children).
    metrics_url: llava-fast's /metrics, scraped beside each sample for the live tokens' K/V.
    Use: `idle()` before the clients start, then `with sampler:` around the run; `result()` after."""

    def __init__(self, processes, metrics_url=None, kv_bytes_per_token=0, interval=0.1):
        self.processes, self.metrics_url, self.kv_bytes_per_token = processes, metrics_url, kv_bytes_per_token
        self.interval, self.samples, self.idle_rss = interval, [], None  # samples: (rss, live K/V bytes or None)
        self._stop = threading.Event()

    def sample(self):
        import psutil

        rss = 0
        for proc in self.processes():
            try:
                rss += proc.memory_info().rss
            except psutil.Error:  # a child that ended between listing and reading
                pass
        return rss, self._live_kv_bytes()

    def _live_kv_bytes(self):
        if self.metrics_url is None:
            return None
        import httpx

        try:
            text = httpx.get(self.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith("llava_fast_kv_cache_live_tokens "):
                return int(float(line.split()[1])) * self.kv_bytes_per_token
        return None

    def idle(self, n=5):
        """The idle resident size: the median of n samples 0.05 s apart."""
        rss = []
        for _ in range(n):
            rss.append(self.sample()[0])
            time.sleep(0.05)
        self.idle_rss = int(np.median(rss))

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())

    def result(self):
        """{"idle", "peak", "kv_live_at_peak", "kv_live_max", "samples"} in bytes (K/V entries None without
        metrics_url)."""
        # The live K/V of the peak is the most that was live up to the peak sample, not at it: the K/V blocks
        # and the allocator's pages stay resident once touched, so RSS peaks as the run ends (the last sample,
        # every row done: 0 live tokens) and the peak sample's own count split the peak into 0 K/V + overhead.
        first_peak = max(range(len(self.samples)), key=lambda i: self.samples[i][0])
        peak = self.samples[first_peak][0]
        upto = [k for _, k in self.samples[: first_peak + 1] if k is not None]
        kv_at_peak = max(upto) if upto else None
        kv = [k for _, k in self.samples if k is not None]
        return dict(idle=self.idle_rss, peak=peak, kv_live_at_peak=kv_at_peak, kv_live_max=max(kv) if kv else None,
                    samples=len(self.samples))


def _psutil_or_none():
    try:
        import psutil

        return psutil
    except ImportError:
        return None


def listening_processes(url):
    """() -> [the process listening on url's port on this machine, and all its children], or None when the
    server is not local or cannot be found (another user's process, no psutil)."""
    from urllib.parse import urlsplit

    psutil, parts = _psutil_or_none(), urlsplit(url)
    if psutil is None or parts.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                and c.laddr and c.laddr.port == port and c.pid}
    except psutil.Error:
        return None
    if len(pids) != 1:
        return None
    server = psutil.Process(pids.pop())

    def processes():
        try:
            return [server, *server.children(recursive=True)]
        except psutil.Error:
            return []

    return processes


def kv_bytes_per_token(model):
    """Bytes of K and V one position holds across the decoder's layers."""
    t = model.net.cfg.text
    element = model.net.language_model.embed_tokens.weight.element_size()
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * element


def weights_bytes(model):
    """Bytes of the model's parameters and buffers, each storage counted once (tied embeddings share one)."""
    seen, total = set(), 0
    for t in [*model.net.parameters(), *model.net.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def run_server(model, requests, clients, max_batch, max_model_len, failures_ok=False, memory=None,
               **serve_settings):
    """(results, wall seconds) of the workload from `clients` clients against a fresh llava-fast server in this
    process; serve_settings: further ServeConfig fields (max_batched_tokens, kv_cache_memory). memory: a dict
    to fill with MemorySampler.result() of this process (needs psutil)."""
    import uvicorn

    from llava_fast.serve.app import ServeConfig, create_app

    config = ServeConfig(model_name="bench", max_batch=max_batch, max_model_len=max_model_len,
                         max_waiting=len(requests) + clients, max_images_per_request=1,
                         **{k: v for k, v in serve_settings.items() if v is not None})
    server = uvicorn.Server(uvicorn.Config(create_app(model, config), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    try:
        psutil = _psutil_or_none() if memory is not None else None
        if psutil is None:
            return _run_clients(url, requests, clients, failures_ok=failures_ok)
        this = psutil.Process()
        sampler = MemorySampler(lambda: [this], url + "/metrics", kv_bytes_per_token(model))
        sampler.idle()
        with sampler:
            out = _run_clients(url, requests, clients, failures_ok=failures_ok)
        memory.update(sampler.result())
        return out
    finally:
        server.should_exit = True
        thread.join(60)


def _serve_settings(settings):
    return {k: settings.get(k) for k in ("max_batched_tokens", "kv_cache_memory")}


def _figures(engine, clients, requests, results, wall):
    """Figures over the requests that succeeded (a failed one's result is its error message)."""
    figs, labels = [], dict(engine=engine, clients=clients)
    requests = [q for r, q in zip(results, requests) if not isinstance(r, str)]
    results = [r for r in results if not isinstance(r, str)]
    if not results:
        return figs
    tokens = sum(r[2] for r in results)
    figs.append(figure("serve_request_throughput", "requests/s", higher_is_better=True, value=len(results) / wall,
                       **labels))
    figs.append(figure("serve_output_throughput", "tokens/s", higher_is_better=True, value=tokens / wall, **labels))
    for kind in ("all", "new", "repeated", "none"):
        ttft = [1e3 * r[0] for r, q in zip(results, requests) if kind in ("all", q[2])]
        if ttft:
            figs.append(figure("serve_ttft", "ms", higher_is_better=False, samples=ttft, image=kind, **labels))
            figs.append(figure("serve_ttft_p99", "ms", higher_is_better=False,
                               value=float(np.percentile(ttft, 99)), image=kind, **labels))
    itl = [1e3 * x for r in results for x in r[1]]
    if itl:
        for q in (50, 99):
            figs.append(figure(f"serve_itl_p{q}", "ms", higher_is_better=False, value=max(float(np.percentile(itl, q)),
                                                                                              1e-6), **labels))
    return figs


def _memory_figures(engine, clients, memory, weights=None):
    """serve_rss_* figures from a MemorySampler.result(); with weights (bytes) and the live K/V at the peak
    sample, the peak's split into weights + live K/V + overhead."""
    if not memory:
        return []
    labels = dict(engine=engine, clients=clients)
    figs = [figure("serve_rss_idle", "bytes", higher_is_better=False, value=memory["idle"], **labels),
            figure("serve_rss_peak", "bytes", higher_is_better=False, value=memory["peak"], **labels)]
    if weights is not None and memory.get("kv_live_at_peak") is not None:
        kv = memory["kv_live_at_peak"]
        figs += [figure("serve_weights", "bytes", higher_is_better=False, value=weights, **labels),
                 figure("serve_kv_live_at_peak", "bytes", higher_is_better=False, value=kv, **labels),
                 figure("serve_rss_overhead", "bytes", higher_is_better=False,
                        value=max(0, memory["peak"] - weights - kv), **labels),
                 figure("serve_rss_idle_overhead", "bytes", higher_is_better=False,
                        value=max(0, memory["idle"] - weights), **labels)]
    return figs


def run(settings: dict, argv) -> dict:
    import torch

    from llava_fast.checkpoints.load import resolve_device_dtype
    from llava_fast.cli import _load

    device, dtype = resolve_device_dtype(settings["device"], settings["dtype"])
    doc = new_document("serve", command_line(argv), settings)
    doc["device"] = device_info(device)

    class Args:  # the CLI's loader: --model or the preset, random weights; eager, unquantized, no mmproj
        model, preset, vision_tower = settings["model"], settings["preset"], settings["vision_tower"]
        mmproj, compile, quantize = None, False, None
        max_image_pixels = None  # the default limit

    Args.device, Args.dtype = str(device), settings["dtype"]
    model = _load(Args)
    settings.update(device=str(device), dtype=str(dtype).replace("torch.", ""),
                    model_name=settings["model"] or settings["preset"])
    if max(settings["clients"]) > settings["requests"]:
        raise InputError(f"--requests {settings['requests']} is fewer than the largest client count")
    images = "none" if settings.get("text_only") else settings.get("images") or "mixed"
    reply_tokens = settings.get("max_tokens") or 96
    requests = workload(settings["requests"], settings["seed"], images, reply_tokens)
    from llava_fast.prompts.messages import split_openai_messages

    def prompt_tokens(messages):
        turns, urls, system = split_openai_messages(messages)
        return len(model.encode_prompt(turns, len(urls), system=system))

    # KV-cache rows as long as the workload needs (a 7B's full 4k context x 64 rows would be 128 GiB).
    max_model_len = min(model.context_length, max(prompt_tokens(m) + t for m, t, _ in requests))
    settings.update(max_model_len=max_model_len, kinds={k: sum(q[2] == k for q in requests)
                                                        for k in ("new", "repeated", "none")})
    if _psutil_or_none() is None:
        doc["notes"].append("psutil is not installed: no resident-memory figures (pip install psutil)")
    telemetry = Telemetry(device).start()
    try:
        doc["ceilings"] = measure_ceilings(device)
        warm = workload(max(2, settings["warmup"] * 2), settings["seed"] + 1, images, reply_tokens)
        if settings.get("against"):
            held = [model]
            del model  # --against-start releases the model before the other server starts: held is then the only
            _run_against(doc, held, requests, warm, max_model_len)
        else:
            _run_beside_one_by_one(doc, model, requests, warm, max_model_len)
    finally:
        telemetry.stop()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    doc["telemetry"] = telemetry.to_dict()
    return doc


def _run_beside_one_by_one(doc, model, requests, warm, max_model_len):
    """One-by-one generate() of the workload, then llava-fast's server at each client count."""
    settings = doc["settings"]
    run_one_by_one(model, warm)
    print(f"bench serve: {len(requests)} requests one by one ...", file=sys.stderr, flush=True)
    base, wall = run_one_by_one(model, requests)
    doc["figures"] += _figures(ONE_BY_ONE, 1, requests, base, wall)
    base_tput = find_one(doc["figures"], "serve_output_throughput", engine=ONE_BY_ONE)["value"]
    for clients in settings["clients"]:
        run_server(model, warm, 1, settings["max_batch"], max_model_len, **_serve_settings(settings))
        print(f"bench serve: {len(requests)} requests from {clients} clients ...", file=sys.stderr, flush=True)
        memory = {}
        results, wall = run_server(model, requests, clients, settings["max_batch"], max_model_len, memory=memory,
                                   **_serve_settings(settings))
        figs = _figures(SERVER, clients, requests, results, wall)
        figs += _memory_figures(SERVER, clients, memory, weights_bytes(model))
        tput = find_one(figs, "serve_output_throughput")["value"]
        figs.append(figure("serve_speedup", "x", higher_is_better=True, value=tput / base_tput, engine=SERVER,
                           baseline=ONE_BY_ONE, clients=clients))
        new, rep = find_one(figs, "serve_ttft", image="new"), find_one(figs, "serve_ttft", image="repeated")
        if new and rep:
            figs.append(figure("serve_ttft_repeated_over_new", "x", higher_is_better=False,
                               value=rep["value"] / new["value"], engine=SERVER, clients=clients))
        doc["figures"] += figs
        doc["checks"].setdefault("completion_tokens", {})[str(clients)] = sum(r[2] for r in results)
    doc["checks"]["completion_tokens"]["one_by_one"] = sum(r[2] for r in base)
    counts = doc["checks"]["completion_tokens"]
    if len(set(counts.values())) != 1:
        doc["notes"].append(f"completion token counts differ between runs: {counts}")


def _first_model_id(url):
    import httpx

    try:
        r = httpx.get(url + "/v1/models", timeout=30)
        return r.json()["data"][0]["id"]
    except Exception as err:
        raise InputError(f"--against {url}: could not read a model id from {url}/v1/models ({type(err).__name__}: "
                         f"{err}); name it with --against-model") from None


def _run_against(doc, held, requests, warm, max_model_len):
    """llava-fast's server, then the other server, at each client count: the same requests, one engine at a time
    (held: [the model]; with --against-start, every client count of llava-fast first, then held is emptied and the
    other server started)."""
    s = doc["settings"]
    other = s["against"].rstrip("/")
    other = s["against"] = other[:-3] if other.endswith("/v1") else other  # an OpenAI base_url names /v1 too
    start = s.get("against_start")
    if not start:
        s["against_model"] = s.get("against_model") or _first_model_id(other)
    model = held[0]
    weights = weights_bytes(model)
    run_server(model, warm, 1, s["max_batch"], max_model_len, failures_ok=True, **_serve_settings(s))
    if not start:
        _run_clients(other, warm, 1, s["against_model"], failures_ok=True)  # its warm-up (e.g. compiling) too
    tokens, failures = doc["checks"].setdefault("completion_tokens", {}), doc["checks"].setdefault("failures", {})
    figs = {}

    def measure(engine, clients):
        print(f"bench serve: {len(requests)} requests from {clients} clients to {engine} ...", file=sys.stderr,
              flush=True)
        memory = {}
        if engine == SERVER:
            results, wall = run_server(model, requests, clients, s["max_batch"], max_model_len, failures_ok=True,
                                       memory=memory, **_serve_settings(s))
        else:
            results, wall = _run_clients_sampled(other, requests, clients, s["against_model"], memory)
        got = figs[engine, clients] = _figures(engine, clients, requests, results, wall)
        if any(not isinstance(r, str) for r in results):  # a server that failed every request has no figures
            got += _memory_figures(engine, clients, memory, weights if engine == SERVER else None)
        doc["figures"] += got
        tokens[f"{engine} x{clients}"] = sum(r[2] for r in results if not isinstance(r, str))
        failed = [r for r in results if isinstance(r, str)]
        doc["checks"].setdefault("failed_requests", {})[f"{engine} x{clients}"] = len(failed)
        if failed:
            failures[f"{engine} x{clients}"] = f"{len(failed)} of {len(results)} failed; the first: {failed[0]}"

    if start:
        for clients in s["clients"]:
            measure(SERVER, clients)
        alive = weakref.ref(model)
        held.clear()
        del model
        _clear_web_framework_caches()
        gc.collect()
        if alive() is not None:
            raise InputError("--against-start: llava-fast's model is still referenced after its runs, so the other "
                             "server would start beside a second copy of the weights; not started")
        psutil = _psutil_or_none()
        if psutil is not None:
            doc["notes"].append(f"llava-fast's model released before --against-start: this process then held "
                                f"{psutil.Process().memory_info().rss / 2**30:.2f} GiB resident")
        peer = start_server(start, other)
        try:
            s["against_model"] = s.get("against_model") or _first_model_id(other)
            _run_clients(other, warm, 1, s["against_model"], failures_ok=True)
            for clients in s["clients"]:
                measure(other, clients)
        finally:
            stop_server(peer)
    else:
        for clients in s["clients"]:
            for engine in (SERVER, other):
                measure(engine, clients)
    for clients in s["clients"]:
        for name, ratio in (("serve_output_throughput", "serve_ratio_output_throughput"),
                            ("serve_ttft", "serve_ratio_ttft_p50"), ("serve_ttft_p99", "serve_ratio_ttft_p99"),
                            ("serve_itl_p50", "serve_ratio_itl_p50"), ("serve_itl_p99", "serve_ratio_itl_p99")):
            extra = {"image": "all"} if name.startswith("serve_ttft") else {}
            ours, theirs = (find_one(figs[e, clients], name, **extra) for e in (SERVER, other))
            if ours and theirs and theirs["value"] > 0:
                doc["figures"].append(figure(ratio, "x", higher_is_better=name == "serve_output_throughput",
                                             value=ours["value"] / theirs["value"], engine=SERVER, baseline=other,
                                             clients=clients))
    per_clients = {}
    for key, n in tokens.items():
        per_clients.setdefault(key.rsplit(" x", 1)[1], set()).add(n)
    if any(len(v) > 1 for v in per_clients.values()):
        doc["notes"].append(f"the engines produced different token counts (ignore_eos not honoured, or failed "
                            f"requests): {tokens}")


def _clear_web_framework_caches():
    """Empty FastAPI's and Starlette's functools caches: FastAPI memoizes facts about each endpoint function
    (fastapi.dependencies.models._is_async_gen_callable_cached in FastAPI 0.165), which keeps the last
    apps' endpoint closures, and through them their scheduler and model, alive after the server stopped. The
    caches only save recomputing those facts."""
    import functools

    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper) and getattr(obj, "__module__", "").startswith(
                ("fastapi", "starlette")):
            obj.cache_clear()


def start_server(command, url, timeout=None):
    """Start `command` (a shell command line) in its own process group (setsid) and wait until url/v1/models
    answers 200.
    Returns the Popen; its output goes to a temporary file, whose last lines an error shows. A command that exits
    first, or a server that does not answer within `timeout` seconds (START_TIMEOUT_S), is an error (the
    process group stopped)."""
    import httpx

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, shell=True, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"bench serve: started {command!r} (pid {proc.pid}); waiting for {url}/v1/models ...", file=sys.stderr,
          flush=True)
    proc.log = log
    deadline = time.monotonic() + (timeout or START_TIMEOUT_S)
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
            stop_server(proc)
            what = (f"exited with status {code}" if code is not None
                    else f"did not answer within {timeout or START_TIMEOUT_S} s")
            raise InputError(f"--against-start {command!r} {what}; its last lines: {' | '.join(tail) or '(none)'}")
        time.sleep(1)


def stop_server(proc):
    """SIGTERM to the process group start_server made (the server and its children: vLLM's engine core), SIGKILL
    to what is left after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        deadline = time.monotonic() + wait
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reaps the group's leader, else it stays a member as a zombie
                os.killpg(proc.pid, 0)
                time.sleep(0.2)
        except ProcessLookupError:  # the group is gone
            break
    proc.log.close()


def _against_markdown(doc):
    s, figs = doc["settings"], doc["figures"]
    other = s["against"]
    lines = [f"## llava-fast bench serve --against {other} ({s['against_model']}): {s['model_name']} "
             f"({s['dtype']}) on {doc['device']['name']}, {s['requests']} requests ({s['kinds']}), "
             f"max batch {s['max_batch']}, ignore_eos", ""]
    lines += [f"- {x}" for x in header_lines(doc)] + [""]
    rows = []
    for clients in s["clients"]:
        for engine in (SERVER, other):
            def get(name, engine=engine, clients=clients, **extra):
                hit = find_one(figs, name, engine=engine, clients=clients, **extra)
                return fmt(hit["value"]) if hit else "-"

            failure = doc["checks"].get("failures", {}).get(f"{engine} x{clients}")
            rows.append([clients, engine, get("serve_output_throughput"), get("serve_ttft", image="all"),
                         get("serve_ttft_p99", image="all"), get("serve_itl_p50"), get("serve_itl_p99"),
                         _mib(figs, "serve_rss_idle", engine, clients), _mib(figs, "serve_rss_peak", engine, clients),
                         f"FAILED: {failure}" if failure else "all ok"])

        def ratio(name, clients=clients):
            hit = find_one(figs, name, clients=clients)
            return fmt(hit["value"], "x") if hit else "-"

        rows.append([clients, "llava-fast / other", ratio("serve_ratio_output_throughput"),
                     ratio("serve_ratio_ttft_p50"), ratio("serve_ratio_ttft_p99"), ratio("serve_ratio_itl_p50"),
                     ratio("serve_ratio_itl_p99"), "", "", ""])
    lines.append(md_table(["clients", "engine", "out tok/s", "TTFT p50 ms", "TTFT p99", "ITL p50 ms", "ITL p99",
                           "RSS idle MiB", "RSS peak MiB", "requests"], rows))
    lines += _memory_lines(figs, s["clients"])
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def _mib(figs, name, engine, clients):
    hit = find_one(figs, name, engine=engine, clients=clients)
    return fmt(hit["value"] / 2**20) if hit else "-"


def _memory_lines(figs, clients_list):
    """llava-fast's peak resident memory split into weights + live K/V + overhead, per client count."""
    rows = []
    for clients in clients_list:
        parts = [_mib(figs, name, SERVER, clients) for name in ("serve_rss_peak", "serve_weights",
                                                                  "serve_kv_live_at_peak", "serve_rss_overhead",
                                                                  "serve_rss_idle", "serve_rss_idle_overhead")]
        if parts[1] != "-":
            rows.append([clients, *parts])
    if not rows:
        return []
    return ["", f"{SERVER} resident memory, MiB: the peak = weights + the live tokens' K/V at that moment + overhead",
            "", md_table(["clients", "peak RSS", "weights", "live K/V", "overhead", "idle RSS", "idle overhead"], rows)]


def markdown(doc: dict) -> str:
    if doc["settings"].get("against"):
        return _against_markdown(doc)
    s, figs = doc["settings"], doc["figures"]
    lines = [f"## llava-fast bench serve: {s['model_name']} ({s['dtype']}) on {doc['device']['name']}, "
             f"{s['requests']} requests ({s['kinds']}), max batch {s['max_batch']}", ""]
    lines += [f"- {x}" for x in header_lines(doc)] + [""]
    rows = []
    for f in [f for f in figs if f["name"] == "serve_output_throughput"]:
        lab = f["labels"]

        def get(name, lab=lab, **extra):
            hit = find_one(figs, name, **lab, **extra)
            return fmt(hit["value"]) if hit else "-"

        speed = find_one(figs, "serve_speedup", clients=lab["clients"])
        rows.append([lab["engine"], lab["clients"], get("serve_request_throughput"), fmt(f["value"]),
                     fmt(speed["value"], "x") if speed and lab["engine"] == SERVER else "-",
                     get("serve_ttft", image="all"), get("serve_ttft_p99", image="all"),
                     get("serve_ttft", image="new"), get("serve_ttft", image="repeated"),
                     get("serve_itl_p50"), get("serve_itl_p99"), _mib(figs, "serve_rss_idle", **lab),
                     _mib(figs, "serve_rss_peak", **lab)])
    lines.append(md_table(["engine", "clients", "req/s", "out tok/s", "vs one-by-one", "TTFT p50 ms", "TTFT p99",
                           "TTFT new img", "TTFT repeated img", "ITL p50 ms", "ITL p99", "RSS idle MiB",
                           "RSS peak MiB"], rows))
    lines += _memory_lines(figs, s["clients"])
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
