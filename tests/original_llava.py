"""The original LLaVA code (haotian-liu/LLaVA, on PyPI as llava-torch 1.2.2.post1) as a test oracle.

`original_llava()` installs the wheel with `pip install --no-deps --target` into a cache directory the first
time (CI reaches PyPI; without a registry the calling test is skipped, saying so) and returns a namespace with
the functions the tests compare against, taken from the package's source files without importing the
`llava` package itself (its __init__ imports the model zoo, which needs deepspeed-era transformers):

    conversation_lib    llava/conversation.py (Conversation, conv_templates, SeparatorStyle)
    preprocess, preprocess_plain, preprocess_v1, preprocess_llama_2, preprocess_multimodal, tokenizer_image_token
                        from llava/train/train.py and llava/mm_utils.py, executed with the torch and transformers
                        installed here
    select_best_resolution, resize_and_pad_image, divide_to_patches, get_anyres_image_grid_shape,
    process_anyres_image, unpad_image
                        AnyRes (LLaVA-1.6) from llava/mm_utils.py and llava/model/llava_arch.py; sizes and
                        pinpoints there are (width, height)
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import subprocess
import sys
import types

import pytest

VERSION = "1.2.2.post1"
CACHE = os.path.join(os.environ.get("LLAVA_FAST_TEST_CACHE", os.path.expanduser("~/.cache/llava-fast-tests")),
                     f"llava-torch-{VERSION}")
_ANYRES_FUNCTIONS = ("select_best_resolution", "resize_and_pad_image", "divide_to_patches",
                     "get_anyres_image_grid_shape", "process_anyres_image")
_TRAIN_FUNCTIONS = ("_tokenize_fn", "_mask_targets", "_add_speaker_and_signal", "preprocess_multimodal",
                    "preprocess_llama_2", "preprocess_v1", "preprocess_plain", "preprocess")


def _install():
    package = os.path.join(CACHE, "llava")
    if os.path.isfile(os.path.join(package, "train", "train.py")):
        return package
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", CACHE,
                             f"llava-torch=={VERSION}"], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not os.path.isfile(os.path.join(package, "train", "train.py")):
        pytest.skip(f"the original LLaVA code (llava-torch=={VERSION}) could not be installed from the package "
                    f"registry: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return package


def _functions(path, names):
    """The source of the named top-level functions of a file (only those: the file's imports are not run)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    found = {n.name: ast.get_source_segment(source, n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = [n for n in names if n not in found]
    assert not missing, f"{path} no longer defines {missing}"
    return "\n\n".join(found[n] for n in names)


@functools.cache
def original_llava():
    import ast
    import copy
    import math

    import PIL.Image
    import tokenizers
    import torch
    import transformers
    from packaging import version

    package = _install()
    spec = importlib.util.spec_from_file_location("original_llava_conversation",
                                                  os.path.join(package, "conversation.py"))
    conversation_lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conversation_lib)
    ns = {"torch": torch, "transformers": transformers, "tokenizers": tokenizers, "copy": copy,
          "conversation_lib": conversation_lib, "Dict": dict, "Sequence": list, "version": version,
          "IS_TOKENIZER_GREATER_THAN_0_14": version.parse(tokenizers.__version__) >= version.parse("0.14"),
          "ast": ast, "math": math, "Image": PIL.Image}
    exec(open(os.path.join(package, "constants.py"), encoding="utf-8").read(), ns)
    exec(_functions(os.path.join(package, "mm_utils.py"), ["tokenizer_image_token", *_ANYRES_FUNCTIONS]), ns)
    exec(_functions(os.path.join(package, "model", "llava_arch.py"), ["unpad_image"]), ns)
    exec(_functions(os.path.join(package, "train", "train.py"), _TRAIN_FUNCTIONS), ns)
    return types.SimpleNamespace(conversation_lib=conversation_lib, **{k: ns[k] for k in (
        *_TRAIN_FUNCTIONS, *_ANYRES_FUNCTIONS, "unpad_image", "tokenizer_image_token", "IMAGE_TOKEN_INDEX",
        "IGNORE_INDEX")})
