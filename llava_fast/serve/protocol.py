"""The wire format of `llava-fast serve`: OpenAI's chat-completions request and response bodies (pydantic).

In:  the JSON body of POST /v1/chat/completions -> `ChatCompletionRequest` (types checked by pydantic; a
     failure becomes HTTP 400 naming the field). Range checks that OpenAI also makes are validators here.
Out: dicts shaped as OpenAI's `chat.completion` / `chat.completion.chunk` objects and its error body
     `{"error": {"message", "type", "param", "code"}}`.
Unknown fields are ignored, as OpenAI's own server does for fields it does not use.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    url: StrictStr
    detail: StrictStr | None = None  # accepted and ignored: LLaVA-1.5 sees every image at one resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[Union[TextPart, ImagePart]]]
    name: StrictStr | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=0)  # extension (vLLM's): 0 = no top-k cut
    seed: StrictInt | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's sampling extensions (benchmarks send them so every engine produces the same token count):
    ignore_eos: StrictBool = False  # EOS does not end the reply (max_tokens or a stop string does)
    min_tokens: StrictInt = Field(default=0, ge=0)  # EOS cannot end a reply shorter than this

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
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
