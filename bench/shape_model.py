"""Random weights at a real model's language-model shapes, one set of weights for every engine.

In: a shape name (SHAPES: LLaVA-1.5-7B's Vicuna-7B decoder: 4096 wide, 11,008 FFN, 32 heads, vocabulary 32,000)
and how many of its decoder layers to keep. A subset of layers keeps a run short while every decode step still
streams its weights from memory, as the full model's do: 8 of the 32 layers are 1.6 G parameters (3.2 GB at
16 bits), far past any last-level cache.
Out: `gguf(shape, layers, fmt)`, a llama.cpp GGUF (architecture "llama", LLaMA's tokenizer from the bundled
tokenizer.json) cached in ~/.cache/llava-fast/shapes (or $LLAVA_FAST_CACHE/shapes):
- F16: written here with the `gguf` package. Weights are N(0, 0.02) rounded to bfloat16 (values below 2^-17,
  0.03% of them, set to 0), so they are exact in float16 as well: llava-fast loading the file as bfloat16 or
  float32 and llama.cpp reading it as F16 hold the same numbers. Norms are 1.
- F32 / Q8_0 / Q4_0: llama.cpp's own quantizer (llama_cpp.llama_model_quantize, default parameters, so the output
  matrix is Q6_K in the Q4_0 file as llama.cpp ships it) run on the F16 file, in a child process.
llava-fast reads the F16 file (llava_fast.load(path.gguf), quantized by its own quantizer for int8wo/int4wo),
transformers reads it with `gguf_file=`: every engine starts from the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from llava_fast.errors import InputError

SHAPES = {
    "llava-1.5-7b": dict(hidden=4096, ffn=11008, heads=32, kv_heads=32, layers=32, vocab=32000, eps=1e-5,
                         context=4096),
}
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 2, 3, 6  # llama.cpp's token types
_SMALLEST_EXACT = 2.0 ** -17  # bfloat16's 8 significant bits stay exact in float16 down to here (subnormals)


def cache_dir() -> str:
    root = os.environ.get("LLAVA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava-fast")
    path = os.path.join(root, "shapes")
    os.makedirs(path, exist_ok=True)
    return path


def shape_of(name: str) -> dict:
    if name not in SHAPES:
        raise InputError(f"unknown shape {name!r}: expected one of {', '.join(SHAPES)}")
    return SHAPES[name]


def _vocabulary(n):
    """LLaMA's 32,000 tokens (the bundled tokenizer.json), their scores (the BPE rank: lower merges first) and
    llama.cpp token types."""
    from llava_fast.presets import BUNDLED_TOKENIZER

    with open(os.path.join(BUNDLED_TOKENIZER, "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:n]
    if len(tokens) != n:
        raise InputError(f"the bundled tokenizer has {len(tokens)} tokens, fewer than the shape's {n}")
    types = [_TOKEN_UNKNOWN if i == 0 else _TOKEN_CONTROL if i in (1, 2) else
             _TOKEN_BYTE if t.startswith("<0x") and len(t) == 6 else _TOKEN_NORMAL for i, t in enumerate(tokens)]
    return tokens, [-float(i) for i in range(n)], types


def random_weight(generator, rows, cols) -> np.ndarray:
    """(rows, cols) float16 holding N(0, 0.02) values that bfloat16 holds exactly too."""
    w = torch.empty(rows, cols).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16).float()
    w[w.abs() < _SMALLEST_EXACT] = 0.0
    return w.to(torch.float16).numpy()


def write_f16(path, shape: dict, layers: int, seed: int = 0):
    """The F16 GGUF of `layers` decoder layers at `shape`, written to path."""
    import gguf as gg

    h, ffn, heads, kv_heads = shape["hidden"], shape["ffn"], shape["heads"], shape["kv_heads"]
    head_dim = h // heads
    w = gg.GGUFWriter(path, "llama")
    w.add_name(f"random weights at {os.path.basename(path)}'s shapes")
    w.add_context_length(shape["context"])
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(shape["eps"])
    w.add_file_type(gg.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = _vocabulary(shape["vocab"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    g = torch.Generator().manual_seed(seed)
    ones = np.ones(h, dtype=np.float32)
    w.add_tensor("token_embd.weight", random_weight(g, shape["vocab"], h))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name, rows, cols in (("attn_q", h, h), ("attn_k", kv_heads * head_dim, h),
                                 ("attn_v", kv_heads * head_dim, h), ("attn_output", h, h), ("ffn_gate", ffn, h),
                                 ("ffn_up", ffn, h), ("ffn_down", h, ffn)):
            w.add_tensor(f"blk.{i}.{name}.weight", random_weight(g, rows, cols))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", random_weight(g, shape["vocab"], h))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_QUANTIZE = """
import sys
sys.path[:0] = sys.argv[4:]
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, ("LLAMA_FTYPE_ALL_" if sys.argv[3] == "F32" else "LLAMA_FTYPE_MOSTLY_") + sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def llama_cpp_quantize(src: str, dst: str, fmt: str, import_path: str | None = None):
    """llama.cpp's quantizer (default parameters) from src to dst at `fmt` (F32, Q8_0, Q4_0), in a child process:
    llama.cpp's library stays out of the benchmark's own process (see real_bench.py). import_path: a directory
    holding the llama_cpp package when it is not importable here."""
    done = subprocess.run([sys.executable, "-c", _QUANTIZE, src, dst, fmt, *([import_path] if import_path else [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"llama.cpp's quantizer failed to write {fmt} (exit {done.returncode}): "
                         f"{done.stderr.strip()[-300:]}")


def gguf(name: str, layers: int, fmt: str, import_path: str | None = None) -> str:
    """The GGUF of `layers` layers at shape `name` in llama.cpp's format `fmt` (F16, F32, Q8_0 or Q4_0), cached.
    import_path: where llama_cpp is, for the quantizer (see llama_cpp_quantize)."""
    shape = shape_of(name)
    if not 1 <= layers <= shape["layers"]:
        raise InputError(f"{name} has {shape['layers']} decoder layers; asked for {layers}")
    path = os.path.join(cache_dir(), f"{name}-{layers}-of-{shape['layers']}-layers.{fmt}.gguf")
    if os.path.isfile(path):
        return path
    if fmt == "F16":
        write_f16(path + ".part", shape, layers)
    elif fmt in ("F32", "Q8_0", "Q4_0"):  # F32: the F16 numbers widened, exactly
        llama_cpp_quantize(gguf(name, layers, "F16"), path + ".part", fmt, import_path)
    else:
        raise InputError(f"unknown GGUF format {fmt!r} at a shape: expected F16, F32, Q8_0 or Q4_0")
    os.replace(path + ".part", path)
    return path
