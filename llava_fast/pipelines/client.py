"""A chat-completions client for any OpenAI-compatible endpoint (OpenAI, `llava-fast serve`, vLLM, llama.cpp's
server), on the official `openai` package, with the retry policy the pipelines need.

In: messages [{"role": "system"|"user"|"assistant", "content": str}, ...] and sampling settings.
Out: a `Reply` (the text and the server's finish_reason).

Retries: 408, 409, 429, 5xx, time-outs and refused connections are retried `retries` times, waiting
backoff, 2 x backoff, 4 x backoff, ... (at most 60 s) between attempts; a server's Retry-After (seconds)
is honoured when longer. Any other 4xx (a wrong model name, a bad key) is not retried. When the retries run
out the call raises EndpointError (an InputError: the CLI exits 2 with one line; the pipelines save what they
have first). The openai client's own retries are turned off so that this one policy applies.

Configuration: endpoint = --endpoint, else OPENAI_BASE_URL, else https://api.openai.com/v1; key = --api-key,
else OPENAI_API_KEY, else "none" (local servers ignore it; OpenAI's endpoint without a key is an InputError).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from llava_fast.errors import InputError

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
_RETRIED_STATUS = {408, 409, 429}
_MAX_WAIT_S = 60.0


class EndpointError(InputError):
    """The chat endpoint cannot be used: unreachable, still failing after the retries, or refusing the
    request (unknown model, bad key)."""


@dataclass
class Reply:
    text: str
    finish_reason: str | None


class ChatClient:
    """client.chat(messages, temperature=, max_tokens=) -> Reply. Thread-safe (one HTTP connection pool), so
    the pipelines call it from `--workers` threads."""

    def __init__(self, model, endpoint=None, api_key=None, *, timeout=120.0, retries=5, backoff=1.0):
        try:
            import openai
        except ImportError:
            raise InputError("the data and evaluation pipelines need the openai package: "
                             "pip install 'llava-fast[pipelines]'") from None
        if not model:
            raise InputError("--model: the name of the model the endpoint serves is required")
        self.openai = openai
        self.model = model
        self.endpoint = endpoint or os.environ.get("OPENAI_BASE_URL") or DEFAULT_ENDPOINT
        self.retries, self.backoff = retries, backoff
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key and self.endpoint.rstrip("/") == DEFAULT_ENDPOINT:
            # OpenAI answers a request without a key with 401; offline, the run retried for a minute and then
            # said only that the endpoint cannot be reached.
            raise InputError(f"no API key for {DEFAULT_ENDPOINT}: set OPENAI_API_KEY or pass --api-key, or point "
                             "--endpoint at another OpenAI-compatible server (e.g. llava-fast serve's "
                             "http://127.0.0.1:8000/v1)")
        self.client = openai.OpenAI(base_url=self.endpoint, api_key=api_key or "none", timeout=timeout,
                                    max_retries=0)

    def _retry_after(self, error) -> float:
        response = getattr(error, "response", None)
        value = response.headers.get("retry-after") if response is not None else None
        try:
            return float(value) if value is not None else 0.0
        except ValueError:
            return 0.0

    def chat(self, messages, *, temperature=None, max_tokens=None) -> Reply:
        openai = self.openai
        extra = {}
        if temperature is not None:
            extra["temperature"] = temperature
        if max_tokens is not None:
            extra["max_tokens"] = max_tokens
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.backoff * 2 ** (attempt - 1), _MAX_WAIT_S)
                time.sleep(max(wait, min(self._retry_after(last), _MAX_WAIT_S)))
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, **extra)
            except openai.APIConnectionError as e:  # includes APITimeoutError
                last = e
                continue
            except openai.APIStatusError as e:
                if e.status_code in _RETRIED_STATUS or e.status_code >= 500:
                    last = e
                    continue
                raise EndpointError(f"{self.endpoint} refused the request with HTTP {e.status_code} "
                                    f"({_short(e)})") from None
            if not getattr(response, "choices", None):
                raise EndpointError(f"{self.endpoint} answered without choices (not an OpenAI-compatible "
                                    "chat-completions reply)")
            choice = response.choices[0]
            return Reply(choice.message.content or "", choice.finish_reason)
        if isinstance(last, openai.APITimeoutError):
            why = "timed out"
        elif isinstance(last, openai.APIConnectionError):
            why = f"cannot be reached ({_short(last)})"
        else:
            why = f"kept failing with HTTP {last.status_code} ({_short(last)})"
        raise EndpointError(f"the endpoint {self.endpoint} {why} after {self.retries + 1} attempts")


def _short(error) -> str:
    text = str(getattr(error, "message", None) or error).replace("\n", " ")
    return text[:200]


def add_endpoint_args(parser, *, model_help="model name the endpoint serves (e.g. gpt-4-0314)"):
    """The flags every endpoint-calling command takes."""
    parser.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                        "(default: $OPENAI_BASE_URL, else https://api.openai.com/v1)")
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent requests")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--http-retries", type=int, default=5,
                        help="retries of a request that failed with 408/409/429/5xx or a time-out")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="seconds before the first retry; doubles each retry (at most 60)")


def client_from_args(args) -> ChatClient:
    if args.workers < 1:
        raise InputError("--workers must be at least 1")
    return ChatClient(args.model, args.endpoint, args.api_key, timeout=args.timeout, retries=args.http_retries,
                      backoff=args.backoff)
