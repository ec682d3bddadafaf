"""The exceptions llava-fast raises for problems a user can fix. Each message names the problem."""


class LlavaFastError(Exception):
    """Base class of every error llava-fast raises on purpose."""


class CheckpointError(LlavaFastError, ValueError):
    """A checkpoint cannot be loaded: a missing file or shard, an unknown architecture, missing or
    unexpected weights, a shape that does not match the config."""


class InputError(LlavaFastError, ValueError):
    """Bad input to generate()/chat()/the CLI: a prompt too long for the context, image count not
    matching the `<image>` markers, an unknown template, bad sampling settings."""


class ImageError(InputError):
    """An image that cannot be used: missing or unreadable file, corrupt data, unsupported array."""


def count(n: int, noun: str) -> str:
    """'1 image', '2 images', '0 images': a count in an error message, with the noun's plural where it needs one."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
