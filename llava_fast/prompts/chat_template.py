"""A checkpoint's own chat template (jinja2), rendered as transformers' `apply_chat_template` renders it.

In: the template text (from tokenizer_config.json's "chat_template", chat_template.json or chat_template.jinja,
or a GGUF's tokenizer.chat_template), the name of the file it came from (for errors), and the tokenizer's
special-token strings. `render` takes a conversation as a list of {"role", "content"} dicts, content a string
or a list of parts ({"type": "text", "text": ...}, {"type": "image"}), and returns the prompt text.

Templates come from model repositories, so they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment (no attribute access to Python internals, no mutation of the values passed in),
configured as transformers configures it (trim_blocks, lstrip_blocks, the loopcontrols extension), with the
names templates use: bos_token/eos_token/unk_token/pad_token, add_generation_prompt, raise_exception(message),
strftime_now(format), a tojson filter that does not HTML-escape, and `{% generation %}` blocks (transformers
marks assistant text with them for training masks; here they render as their content).

Two content formats exist in the wild: ChatML/LLaMA-3 style templates print `message['content']` as a string;
multimodal templates (llava-hf's) iterate over content parts and print an image placeholder per image part.
`content_format` finds out which one a template reads by rendering a probe both ways.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llava_fast.checkpoints.config import read_json
from llava_fast.errors import CheckpointError, InputError

IMAGE_MARKER = "<image>"
_PROBE = "llava-fast probe 7f3a"


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """One checkpoint's jinja chat template. `origin` names the file it came from; `special_tokens` maps
    bos_token/eos_token/unk_token/pad_token to their strings (None where the tokenizer has none)."""

    def __init__(self, text: str, origin: str, special_tokens: dict | None = None):
        if not isinstance(text, str) or not text.strip():
            raise CheckpointError(f"{origin}: the chat template is empty or not a string")
        self.text, self.origin = text, origin
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"{origin}: the chat template is not valid jinja "
                                  f"(line {e.lineno}: {e.message})") from None
        self._content_format = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": str or list of parts}, ...]). `variables`
        are passed to the template beside messages (e.g. tools, or a template's own switches)."""
        context = {**self.special_tokens, **variables}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:  # raise_exception(), undefined names, sandbox violations
            raise InputError(f"the chat template in {self.origin} rejected the conversation: {e}") from None
        except Exception as e:  # a template may fail on any Python operation (e.g. "+" of str and list)
            raise InputError(f"the chat template in {self.origin} failed on the conversation: "
                             f"{type(e).__name__}: {e}") from None

    @property
    def content_format(self) -> str:
        """"string" when the template prints a message's content as a string (ChatML, LLaMA-3), "parts" when
        it reads a list of {"type": ...} parts (llava-hf's templates). Found once, by rendering a probe."""
        if self._content_format is None:
            self._content_format = "string"
            for fmt, content in (("string", _PROBE), ("parts", [{"type": "text", "text": _PROBE}])):
                try:
                    if _PROBE in self.render([{"role": "user", "content": content}]):
                        self._content_format = fmt
                        break
                except InputError:
                    continue
        return self._content_format

    def message(self, role: str, text: str) -> dict:
        """A {"role", "content"} message for text with "<image>" markers, in this template's content format:
        the text itself, or parts with one {"type": "image"} per marker (the "\\n" LLaVA puts after a marker
        is dropped: parts templates print their own)."""
        if self.content_format == "string":
            return {"role": role, "content": text}
        parts = []
        for index, chunk in enumerate(text.split(IMAGE_MARKER)):
            if index > 0:
                parts.append({"type": "image"})
                chunk = chunk[1:] if chunk.startswith("\n") else chunk
            if chunk:
                parts.append({"type": "text", "text": chunk})
        return {"role": role, "content": parts}


def read_chat_template(directory: str, tokenizer_config: dict) -> tuple[str, str] | None:
    """(template text, the file it came from) of a checkpoint directory, or None. Looked up as transformers
    does: chat_template.jinja, then chat_template.json (llava-hf's processor template), then the
    "chat_template" of tokenizer_config.json (a string, or a list of named templates: "default" is used)."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                return f.read(), jinja_path
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {jinja_path}: {e}") from None
    json_path = os.path.join(directory, "chat_template.json")
    if os.path.isfile(json_path):
        template = read_json(json_path).get("chat_template")
        if not isinstance(template, str):
            raise CheckpointError(f"{json_path}: no \"chat_template\" string")
        return template, json_path
    template = tokenizer_config.get("chat_template")
    origin = os.path.join(directory, "tokenizer_config.json")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise CheckpointError(f"{origin}: chat_template lists templates {sorted(map(str, named))} but no "
                                  "\"default\" one")
        template = named["default"]
    return (template, origin) if template is not None else None
