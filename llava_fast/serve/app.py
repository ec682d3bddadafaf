"""The HTTP side of `llava-fast serve` (FastAPI on uvicorn): routes, validation, errors, limits, shutdown.

In:  HTTP requests. POST /v1/chat/completions bodies are checked (protocol.py), their messages split and
     images decoded, hashed and bounded (messages.py) and their prompt tokenized on a worker thread, so bad
     input never reaches the model; the request then goes to the Scheduler, whose events come back here.
Out: OpenAI chat.completion objects or SSE chunks ending with `data: [DONE]`; GET /v1/models (and /v1/models/ID),
     /health, /metrics (Prometheus text), / (the chat page). Errors are OpenAI's error JSON: 400 for bad input, 401
     without the API key, 404/405, 413 for an oversized body, 503 + Retry-After when the queue is full, 500
     (generic message, traceback in the log) for anything unexpected; the scheduler keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_fast.errors import InputError, count
from llava_fast.generate import Sampling
from llava_fast.image.loading import DEFAULT_MAX_IMAGE_PIXELS
from llava_fast.prompts.messages import load_image_url, split_openai_messages
from llava_fast.serve.metrics import ServeMetrics
from llava_fast.serve.protocol import ChatCompletionRequest, Completion, error_body, json_excerpt, usage
from llava_fast.serve.scheduler import QueueFull, Request, Scheduler, SchedulerStopped

log = logging.getLogger("llava_fast.serve")
PAGE = os.path.join(os.path.dirname(__file__), "page", "index.html")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still connected


@dataclass
class ServeConfig:
    model_name: str = "llava-fast"
    max_batch: int = 16  # KV-cache rows (concurrent requests decoding together)
    max_model_len: int | None = None  # tokens per row (prompt + reply); default the model's context length
    max_waiting: int = 256  # queued requests before 503
    image_cache_mb: float = 256.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height, checked before decoding
    max_images_per_request: int = 4
    allowed_local_media_path: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    default_max_tokens: int = 256  # when a request names no max_tokens (capped by the room left in the row)
    shutdown_timeout: float = 30.0
    max_batched_tokens: int | None = None  # tokens per scheduler iteration (chunked prefill); None: the default
    kv_cache_memory: int | None = None  # bytes of K/V the server may hold (CPU); None: 4 GiB or RAM / 4


class _BodyTooLarge(StarletteHTTPException):
    """A body past max_body_bytes, found while it is read (chunked, no Content-Length). An HTTP exception,
    since FastAPI's body parsing passes those through and turns any other into its own 400 ("There was an
    error parsing the body"), which the client read as a body that is not UTF-8 or nests too deeply."""

    def __init__(self):
        super().__init__(413)


class _EventHandoff:
    """Scheduler thread -> the event loop: events are queued here and delivered by one callback per batch.

    A decode step of 16 rows emits 16 events; one `call_soon_threadsafe` each woke the loop (a self-pipe
    write, 27 us of the scheduler's time per token on the 2-core CPU) 16 times a step while the next step was
    computing on the same cores. Now the first event of a step schedules a drain and the others ride along.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.scheduled = loop, [], False
        self.lock = threading.Lock()

    def emit(self, queue: asyncio.Queue, event):  # any thread
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self):  # the event loop
        with self.lock:
            batch, self.pending, self.scheduled = self.pending, [], False
        for queue, event in batch:
            queue.put_nowait(event)


class _Guard:
    """ASGI middleware: request-body size limit, Bearer API key on /v1/*, and requests-by-status metrics."""

    ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self, app, config: ServeConfig, metrics: ServeMetrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
                return await self._error(scope, send_counted, 413,
                                         f"request body over {self.config.max_body_bytes} bytes")
            key = self.config.api_key
            if key and scope["path"].startswith("/v1/") and headers.get(b"authorization") != f"Bearer {key}".encode():
                return await self._error(scope, send_counted, 401,
                                         "missing or wrong API key (Authorization: Bearer ...)",
                                         "authentication_error", "invalid_api_key")
            seen = 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > self.config.max_body_bytes:
                    raise _BodyTooLarge()
                return message

            await self.app(scope, receive_limited, send_counted)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()

    async def _error(self, scope, send, status, message, type_="invalid_request_error", code=None):
        await JSONResponse(error_body(message, type_, None, code), status)(scope, None, send)


def _field_path(error) -> list[str]:
    # pydantic puts union members' type names in the path ("content", "str"); the param is the field path.
    return [str(x) for x in error.get("loc", ()) if isinstance(x, int) or (
        x != "body" and x.isidentifier() and not x[0].isupper() and x not in ("str", "int", "float", "bool"))]


def _validation_message(err: RequestValidationError):
    # A union reports one error per member; the deepest is the member the value was meant as (a part's "detail"
    # of 3, not the string member's "Input should be a valid string" for the whole content).
    first = max(err.errors(), key=lambda e: len(_field_path(e)))
    loc = _field_path(first)
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing" and not loc:
        return "the request needs a JSON body", None
    param = ".".join(loc) or None
    if first.get("type") == "value_error":  # our validators' messages (protocol.py) say what was given
        message = str(first["ctx"]["error"]) if "error" in first.get("ctx", {}) else first.get("msg")
    else:  # pydantic's own ("Input should be a valid integer") say what is accepted: add what was sent
        message = f"{first.get('msg')}, got {json_excerpt(first['input'])}" if "input" in first and first.get(
            "type") != "missing" else first.get("msg")
    return (f"{param}: {message}" if param else str(message)), param


def create_app(model, config: ServeConfig | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a LlavaModel). The scheduler starts and stops with the app."""
    config = config or ServeConfig()
    scheduler = scheduler or Scheduler(model, max_batch=config.max_batch, max_model_len=config.max_model_len,
                                       max_waiting=config.max_waiting,
                                       image_cache_bytes=int(config.image_cache_mb * (1 << 20)),
                                       max_batched_tokens=config.max_batched_tokens,
                                       kv_cache_memory=config.kv_cache_memory)
    metrics = scheduler.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Everything alive now (the model, torch's and the libraries' objects: ~330k) goes to the permanent
        # generation, so the cyclic GC's full collections stop traversing it: one of them stalled every running
        # row for 230 ms in a 64-request run (tiny, 2-core CPU; 2.5 ms at most after this). SGLang does the same.
        gc.collect()
        gc.freeze()
        app.state.handoff = _EventHandoff(asyncio.get_running_loop())  # the loop the requests are served on
        if not scheduler.thread.is_alive():
            scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop, 0)
        # Back to the collected generations, so the interpreter's last collections free what was frozen: triton's
        # nanobind extension counts its objects at exit, and 4 ir.attribute instances held in cycles that only
        # the cyclic GC frees made every shutdown print 29 "nanobind: leaked ..." lines.
        gc.unfreeze()

    app = FastAPI(title="llava-fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.config = scheduler, config
    app.add_middleware(_Guard, config=config, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, err):
        # FastAPI parses the body as JSON only under a JSON Content-Type (or none); under any other, such as
        # the application/x-www-form-urlencoded that `curl -d` sends without -H, the body reaches validation
        # as raw bytes, and the message built from them failed with a 500.
        if any(isinstance(e.get("input"), (bytes, bytearray)) for e in err.errors()):
            content_type = request.headers.get("content-type", "")
            return JSONResponse(error_body(f"the request body must be JSON sent with Content-Type: "
                                           f"application/json, got Content-Type: {content_type}"), 415)
        message, param = _validation_message(err)
        return JSONResponse(error_body(message, param=param), 400)

    @app.exception_handler(InputError)
    async def _bad_input(request, err):
        return JSONResponse(error_body(str(err)), 400)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request, err):
        return JSONResponse(error_body(f"request body over {config.max_body_bytes} bytes"), 413)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        message = str(err.detail)
        if err.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's words when the JSON decoder fails with something other than a syntax error: bytes that
            # are not UTF-8 (UnicodeDecodeError) or nesting past Python's recursion limit (RecursionError).
            message = "the request body is not valid JSON: it is not UTF-8 text, or it nests too deeply"
        if err.status_code == 404:  # Starlette's bare "Not Found": say what is served instead
            message = (f"no route {request.method} {request.url.path}: this server answers POST "
                       "/v1/chat/completions, GET /v1/models, /health, /metrics and /")
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(message, "not_found_error" if err.status_code == 404 else
                                       "invalid_request_error"), err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, err):
        log.error("unexpected error on %s", request.url.path, exc_info=err)
        return JSONResponse(error_body("internal server error", "internal_error"), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": scheduler.num_running, "waiting": len(scheduler.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_object():
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "llava-fast",
                "max_model_len": scheduler.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{name:path}")  # OpenAI's retrieve (client.models.retrieve); :path keeps "org/name" ids
    async def retrieve_model(name: str):
        if name != config.model_name:
            return JSONResponse(error_body(f"unknown model {name!r}: this server serves {config.model_name!r}",
                                           "not_found_error", "model", "model_not_found"), 404)
        return model_object()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    def prepare(body: ChatCompletionRequest) -> dict:
        """Everything that can reject a request, off the event loop: messages, images, tokens, limits."""
        turns, urls, system = split_openai_messages(body.openai_messages())
        if urls and model.net.vision_tower is None:  # before decoding any image; in the client's terms
            raise InputError(f"the model {config.model_name!r} is text-only: it takes no images, but the request "
                             f"has {count(len(urls), 'image_url part')}; send text parts only")
        if len(urls) > config.max_images_per_request:
            limit = config.max_images_per_request
            raise InputError(f"the request has {count(len(urls), 'image')}; at most {limit} "
                             f"{'is' if limit == 1 else 'are'} allowed per request")
        images = [load_image_url(u, allowed_local_media_path=config.allowed_local_media_path,
                                 max_pixels=config.max_image_pixels) for u in urls]
        keys = [hashlib.blake2b(np.asarray(im).tobytes(), digest_size=16, key=str(im.size).encode()).hexdigest()
                for im in images]
        sizes = [(im.height, im.width) for im in images]  # LLaVA-NeXT: an image's positions follow from its size
        ids = model.encode_prompt(turns, len(images), system=system, image_sizes=sizes)
        room = scheduler.max_model_len - len(ids)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested or min(config.default_max_tokens, room)
        if max_tokens > room or room < 1:
            raise InputError(f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: together more "
                             f"than the {scheduler.max_model_len}-token context")
        if body.top_logprobs and not body.logprobs:
            raise InputError("top_logprobs needs logprobs: true")
        if body.min_tokens > max_tokens:
            raise InputError(f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_tokens})")
        return dict(ids=ids, images=images, image_keys=keys, image_tokens=model.image_token_counts(sizes),
                    max_tokens=max_tokens,
                    sampling=Sampling(body.temperature, body.top_p, body.top_k, body.seed,
                                      min_tokens=body.min_tokens, ignore_eos=body.ignore_eos),
                    stop=model._stop_strings(body.stop, None), logprobs=body.logprobs,
                    top_logprobs=body.top_logprobs or 0)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        if body.model is not None and body.model != config.model_name:
            return JSONResponse(error_body(f"unknown model {body.model!r}: this server serves "
                                           f"{config.model_name!r}", param="model", code="model_not_found"), 400)
        fields = await run_in_threadpool(prepare, body)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        handoff = app.state.handoff
        req = Request(**fields, emit=lambda ev: handoff.emit(events, ev))
        try:
            scheduler.submit(req)
        except (QueueFull, SchedulerStopped) as err:
            return JSONResponse(error_body(f"server busy: {err}; retry shortly", "server_busy"), 503,
                                headers={"Retry-After": "1"})
        completion = Completion(config.model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(req, events, completion, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, logprobs = [], []
        try:
            check_at = loop.time() + DISCONNECT_POLL_S
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    ev = None
                # Polled on a clock, not only when no token came for a while: a row decoding steadily never
                # leaves the queue idle, and a gone client's 1000-token request then ran to its end.
                if loop.time() >= check_at:
                    check_at = loop.time() + DISCONNECT_POLL_S
                    if await http.is_disconnected():
                        req.cancel()
                        return Response(status_code=499)
                if ev is None:
                    continue
                if ev.kind == "token":
                    text.append(ev.text)
                    logprobs += ev.logprobs or []
                elif ev.kind == "done":
                    return completion.response("".join(text), ev.finish_reason,
                                               usage(ev.prompt_tokens, ev.completion_tokens),
                                               logprobs if body.logprobs else None)
                else:  # cut by the shutdown, nothing failed: 503, as a request the stopping server no longer takes
                    return JSONResponse(error_body(ev.error, ev.error_type),
                                        503 if ev.error_type == "server_shutdown" else 500)
        finally:
            req.cancel()  # a no-op once done; frees the row if this handler was cancelled

    return app


async def _stream(req, events, completion: Completion, include_usage):
    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield sse(completion.chunk({"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            if ev.kind == "token":
                yield sse(completion.chunk({"content": ev.text}, logprobs=ev.logprobs))
            elif ev.kind == "done":
                yield sse(completion.chunk({}, ev.finish_reason))
                if include_usage:
                    yield sse(completion.usage_chunk(usage(ev.prompt_tokens, ev.completion_tokens)))
                break
            else:
                yield sse(error_body(ev.error, ev.error_type))
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()  # the client went away (Starlette cancels this generator), or a no-op after the end


# Seconds past --shutdown-timeout before uvicorn cancels what still runs: the scheduler's error events for the
# replies it ended reach their clients first (an iteration and one event-loop pass; tiny CPU preset: ~10 ms).
SHUTDOWN_GRACE = 5.0


def serve(model, config: ServeConfig, host="127.0.0.1", port=8000, log_level="info") -> int:
    """Run the server until SIGTERM/SIGINT; then stop accepting, let running requests finish within
    config.shutdown_timeout seconds, and return 0."""
    import uvicorn

    app = create_app(model, config)
    scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        """At the first SIGTERM/SIGINT, a timer gives the running requests shutdown_timeout seconds, then stops the
        scheduler, which ends each reply still running with an error event: a stream sends it and [DONE], a
        plain request gets its error body. uvicorn's own cut-off, SHUTDOWN_GRACE seconds later, only backs it up:
        at the same moment it closed streams mid-body, with no error and no [DONE]."""

        timer = None

        def handle_exit(self, sig, frame):
            if not self.should_exit:  # daemon, and cancelled below: a drain that ends sooner does not wait for it
                self.timer = threading.Timer(config.shutdown_timeout, scheduler.stop, args=(0,))
                self.timer.daemon = True
                self.timer.start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=config.shutdown_timeout + SHUTDOWN_GRACE))
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    started = time.monotonic()
    server.run()
    if server.timer is not None:
        server.timer.cancel()
    log.info("llava-fast serve: stopped after %.0f s", time.monotonic() - started)
    return 0
