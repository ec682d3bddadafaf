"""`llava-fast serve`: an OpenAI-compatible HTTP server over one continuous-batching scheduler.

In: HTTP requests (POST /v1/chat/completions with text and image parts, GET /v1/models, /health, /metrics) and
one loaded `LlavaModel`. Out: OpenAI's response bodies (streamed or whole), 4xx errors in OpenAI's error JSON,
Prometheus metrics. Each row's greedy output equals `generate()` of that request alone (the tests' oracle).

    app.py        routes, validation, limits, errors, shutdown (FastAPI on uvicorn)
    protocol.py   the request and response bodies (pydantic), checked before any work
    scheduler.py  the engine thread: admission, chunked prefill under a token budget, decode steps, the caches
    kv_memory.py  KV-cache memory that follows the live tokens, within --kv-cache-memory
    metrics.py    the Prometheus registry behind /metrics
"""
