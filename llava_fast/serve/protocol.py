"""The wire format of `llava-fast serve`: OpenAI's chat-completions request and response bodies (pydantic).

In:  the JSON body of POST /v1/chat/completions -> `ChatCompletionRequest` (types checked by pydantic; a
     failure becomes HTTP 400 naming the field). Range checks that OpenAI also makes are validators here.
Out: dicts shaped as OpenAI's `chat.completion` / `chat.completion.chunk` objects and its error body
     `{"error": {"message", "type", "param", "code"}}`.
Unknown fields are ignored, as OpenAI's own server does for fields it does not use. Known fields that would shape
the reply in a way this server does not (a JSON schema, tool calls, penalties, logit biases, an audio reply, a
web search) are refused by name unless they hold their neutral value: a client that asked for JSON, a tool call
or audio must not get free text as if it were one. The `developer` role (OpenAI's newer name for `system`) is a
system message.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from llava_fast.errors import count

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    url: StrictStr
    detail: StrictStr | None = None  # accepted and ignored: the checkpoint's preprocessing sets the resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


PART_SHAPES = '{"type": "text", "text": "..."} or {"type": "image_url", "image_url": {"url": "data:image/..."}}'


def json_excerpt(value, limit=80) -> str:
    """A value as the caller wrote it (JSON), cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart | ImagePart]
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, content):
        # Checked before pydantic's union: its error for a list with one bad part is the string member's
        # "Input should be a valid string", which names neither the part nor what is wrong with it.
        if isinstance(content, str):
            return content
        if not isinstance(content, list) or not content:
            raise ValueError(f"must be a string or a non-empty array of content parts ({PART_SHAPES}), got "
                             f"{json_excerpt(content)}")
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else None
                if isinstance(url, str) and url:
                    continue
                raise ValueError(f'part {i} has type "image_url" but no URL: it needs "image_url": {{"url": '
                                 f'"data:image/...;base64,..."}}, got "image_url": {json_excerpt(image_url)}')
            if kind == "text":
                raise ValueError(f'part {i} has type "text" but its "text" is {json_excerpt(part.get("text"))}, '
                                 "not a string")
            raise ValueError(f"part {i} must be {PART_SHAPES}; got {json_excerpt(part)}")
        return content


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    # Strict, as OpenAI's API: a JSON true or "0.7" is refused by name, not read as 1.0 or 0.7 (JSON integers pass).
    temperature: StrictFloat = 1.0  # 0..2 (_sampling_range)
    top_p: StrictFloat = 1.0  # (0, 1]
    top_k: StrictInt = Field(default=0, ge=0)  # extension (vLLM's): 0 = no top-k cut
    seed: StrictInt | None = Field(default=None, ge=-2**63, lt=2**64)  # torch.Generator's range
    stop: StrictStr | list[StrictStr] | None = None  # at most 4 (_stop_list)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's sampling extensions (benchmarks send them so every engine produces the same token count):
    ignore_eos: StrictBool = False  # EOS does not end the reply (max_tokens or a stop string does)
    min_tokens: StrictInt = Field(default=0, ge=0)  # EOS cannot end a reply shorter than this
    # OpenAI fields this server does not implement, accepted only at their neutral value (_unsupported_*).
    response_format: dict | None = None
    tool_choice: StrictStr | dict | None = None  # before tools: tools' validator reads it
    tools: list | None = None
    function_call: StrictStr | dict | None = None  # the deprecated form of tool_choice / tools
    functions: list | None = None
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    logit_bias: dict | None = None
    modalities: list[StrictStr] | None = None  # ["text"] (or ["text", "audio"] for an audio reply)
    audio: dict | None = None  # the voice and format of an audio reply
    web_search_options: dict | None = None  # a search before the reply (OpenAI's search models)

    @field_validator("temperature", "top_p", "top_k", "n", "stream", "logprobs", "presence_penalty",
                     "frequency_penalty", mode="before")
    @classmethod
    def _null_is_the_default(cls, value, info):
        # OpenAI's API types these "number (or integer, boolean) or null", and clients built on its schema send
        # null for a field left unset: it means the default, as leaving the field out does (vLLM reads it so too).
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("response_format")
    @classmethod
    def _unsupported_response_format(cls, value):
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"only {{\"type\": \"text\"}} is supported: this server does not constrain its output "
                             f"to JSON or a schema, got {json_excerpt(value)}")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _unsupported_tools(cls, value, info):
        choice = info.data.get("tool_choice" if info.field_name == "tools" else "function_call")
        if value and choice != "none":
            given = "no tool_choice" if choice is None else f"tool_choice {json_excerpt(choice)}"
            raise ValueError(f"tool calls are not supported (this server never returns tool_calls): tools can only "
                             f"be sent with tool_choice \"none\", got {count(len(value), 'tool')} and {given}")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _unsupported_tool_choice(cls, value):
        if value not in (None, "none", "auto"):
            raise ValueError(f"tool calls are not supported: this server never returns tool_calls, got "
                             f"{json_excerpt(value)}")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _unsupported_penalty(cls, value):
        if value != 0:
            raise ValueError(f"not supported by this server: only 0 (no penalty), got {value}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _unsupported_logit_bias(cls, value):
        if value:
            raise ValueError(f"not supported by this server: only {{}} (no bias), got {json_excerpt(value)}")
        return value

    @field_validator("modalities")
    @classmethod
    def _unsupported_modalities(cls, value):
        if value is not None and set(value) - {"text"}:
            raise ValueError(f"only [\"text\"] is supported: this server replies in text only, got "
                             f"{json_excerpt(value)}")
        return value

    @field_validator("audio", "web_search_options")
    @classmethod
    def _unsupported_audio_or_search(cls, value, info):
        if value is not None:
            what = "replies in text only (no audio)" if info.field_name == "audio" else "searches nothing"
            raise ValueError(f"not supported: this server {what}, got {json_excerpt(value)}")
        return value

    @field_validator("temperature", "top_p")
    @classmethod
    def _sampling_range(cls, value, info):
        # Our check, not Field(ge=, le=): a NaN (JSON NaN) fails every comparison, and pydantic then said only
        # "should be less than or equal to 2". `not (a <= x <= b)` is true for NaN, so it fails here by name.
        if info.field_name == "temperature" and not 0.0 <= value <= 2.0:
            raise ValueError(f"must be a number from 0 to 2 (0 = greedy), got {value}")
        if info.field_name == "top_p" and not 0.0 < value <= 1.0:
            raise ValueError(f"must be a number above 0 and at most 1, got {value}")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        # Before pydantic's union, whose error for [..., 5] was the string member's "Input should be a valid string".
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"must be a string or an array of up to 4 strings, got {json_excerpt(stop)}")
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return stops

    def openai_messages(self) -> list[dict]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Completion:
    """Builds the response objects of one request (one id and creation time for all its chunks)."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _object(self, kind, choices, usage):
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": usage}

    def response(self, text, finish_reason, usage, logprobs=None) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None if logprobs is None else {"content": logprobs}}
        return self._object("chat.completion", [choice], usage)

    def chunk(self, delta: dict, finish_reason=None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": None if logprobs is None else {"content": logprobs}}
        return self._object("chat.completion.chunk", [choice], None)

    def usage_chunk(self, usage) -> dict:
        return self._object("chat.completion.chunk", [], usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
