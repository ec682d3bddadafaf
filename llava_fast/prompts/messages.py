"""OpenAI-style chat messages -> the (role, text) messages and image list that `encode_prompt` takes.

In:  [{"role": "system" | "developer" | "user" | "assistant", "content": str | [part, ...]}], a part being
     {"type": "text", "text": str} or {"type": "image_url", "image_url": {"url": str} | str}.
Out: (messages, images, system): messages a list of (role, text) with one "<image>" marker where each image
     part was (parts joined by "\\n", so [image, text] renders "<image>\\nquestion" as LLaVA's own prompts
     do; consecutive messages of one role joined by "\\n" into one, as a user's parts are; "<image>" written
     in a text part stays text: escape_image_text), images the URLs in order, system the system and developer
     messages' text (None without one); `developer` is OpenAI's newer name for `system`, which its newer
     clients send in its place.

One request format then works in-process (`model.generate(messages)`) and over HTTP (`llava-fast serve`).
Image URLs are resolved by `load_image_url`: data: URLs (base64) and local files; http(s) is refused,
since llava-fast never fetches from the network.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from urllib.parse import unquote, urlparse

import PIL.Image

from llava_fast.errors import ImageError, InputError, count
from llava_fast.image import load_image
from llava_fast.image.loading import open_image
from llava_fast.prompts.templates import IMAGE_MARKER, escape_image_text

ROLES = ("system", "developer", "user", "assistant")


def is_openai_messages(prompt) -> bool:
    """True for a list of {"role", "content"} dicts (as opposed to a str or (role, text) pairs)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def split_openai_messages(messages) -> tuple[list[tuple[str, str]], list, str | None]:
    """OpenAI chat messages -> ((role, text) messages, image URLs in order, system text or None).

    Consecutive user (or assistant) messages become one, their texts joined by "\\n": OpenAI's clients send
    them (a question after an image in a message of its own), and LLaVA's templates alternate user and
    assistant turns. System messages between them are taken out first, as everywhere. Raises InputError naming
    the message (its index) for an unknown role, a missing or wrongly typed content, an unknown part type, a
    conversation that starts with an assistant message or does not end with a user message.
    """
    if not is_openai_messages(messages):
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    turns, images, system = [], [], []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            pieces = [escape_image_text(content)]
        elif isinstance(content, (list, tuple)) and content:
            pieces = []
            for p_index, part in enumerate(content):
                where = f"messages[{index}].content[{p_index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(escape_image_text(part["text"]))
                elif kind == "image_url":
                    if role != "user":
                        raise InputError(f"{where}: images belong in user messages, not {role} messages")
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise InputError(f"{where}.image_url.url must be a non-empty string")
                    pieces.append(IMAGE_MARKER)
                    images.append(url)
                elif kind in ("text", "image_url"):
                    raise InputError(f"{where}: a {kind!r} part needs a string '{kind}' field")
                else:
                    raise InputError(f"{where}.type must be 'text' or 'image_url', got {kind!r}")
        else:
            raise InputError(f"messages[{index}].content must be a string or a non-empty list of parts")
        text = "\n".join(pieces)
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise InputError("messages must end with a user message")
    if turns[0][0] != "user":
        raise InputError("the first message after any system messages must be a user message (LLaVA's chat "
                         "templates start with the user), got an assistant message")
    return turns, images, ("\n".join(system) if system else None)


def load_image_url(url: str, *, allowed_local_media_path=None, max_pixels: int | None = None,
                   local_files: bool = False) -> PIL.Image.Image:
    """An image URL -> a decoded PIL image in mode RGB.

    Accepted: `data:image/...;base64,...`; a local path or `file://` URL when `local_files` (in-process
    use) or when it resolves (symlinks followed, `..` collapsed) to a file inside `allowed_local_media_path`.
    http(s) URLs are refused. max_pixels bounds width x height, checked from the header before the pixels
    are decoded (a decompression bomb never allocates). Raises ImageError / InputError naming the problem.
    """
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise ImageError("a data URL image must look like data:image/<type>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data URL image is not valid base64") from None
        return _decode(io.BytesIO(data), "the data URL image", max_pixels)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise ImageError(f"http(s) image URLs are not fetched (the server makes no network requests): {url[:100]}; "
                         "send the image as a data:image/...;base64 URL")
    if scheme == "file":
        path = unquote(urlparse(url).path)
    elif scheme and len(scheme) > 1:  # "c:" on Windows is a drive, not a scheme
        raise ImageError(f"unsupported image URL scheme {scheme!r}: use a data: URL or a local file")
    else:
        path = url
    if not local_files:
        if allowed_local_media_path is None:
            raise ImageError("this server reads no local image files: send the image as a data:image/...;base64 URL")
        root = os.path.realpath(allowed_local_media_path)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise ImageError(f"image path {path!r} is outside the allowed media directory")
        path = real
    if not os.path.isfile(path):
        raise ImageError(f"image file not found: {path}")
    with open(path, "rb") as f:
        return _decode(io.BytesIO(f.read()), f"image file {path}", max_pixels)


def _decode(stream, what, max_pixels) -> PIL.Image.Image:
    try:
        # the pixel limit as every entry point applies it (image/loading.py); the server's own when it passes one,
        # and then without the hint to raise it, which is the server operator's flag, not its client's
        opened = open_image(stream, what, max_pixels, hint=max_pixels is None)
    except PIL.UnidentifiedImageError:  # its message names the stream by repr ("<_io.BytesIO object at 0x...>")
        data = stream.getvalue()
        if not data:
            raise ImageError(f"{what} is empty (0 bytes)") from None
        raise ImageError(f"{what} is not a readable image: Pillow identifies its {count(len(data), 'byte')} (starting "
                         f"{data[:16]!r}) as no image format it reads (PNG, JPEG, WebP, GIF, BMP, ...), or they are "
                         "truncated or corrupt") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{what} cannot be decoded: {err}") from None
    return load_image(opened)
