"""`load()`: a checkpoint path -> a ready `LlavaModel` (weights on the device, tokenizer, image processor).

In: a local directory (llava-hf's layout or transformers' save_pretrained, the original LLaVA layout with its
tower beside it; LLaVA v1, 1.5 and NeXT / 1.6), a hub id when huggingface_hub is installed, or a GGUF file (+ its
mmproj). Out: a LlavaModel whose linear layers are prepared for inference (projections fused, optionally
quantized), with CLIP's image processor, or for LLaVA-NeXT the AnyRes one (image/anyres.py).
"""

from __future__ import annotations

import os
import re

import torch

from llava_fast.api import LlavaModel
from llava_fast.checkpoints.layouts import load_weights, read_config
from llava_fast.cpu import isa
from llava_fast.cpu.quantize import parse_scheme, prepare_for_inference
from llava_fast.errors import CheckpointError, InputError
from llava_fast.image import AnyResProcessor, ImageProcessor
from llava_fast.prompts.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device_dtype(device=None, dtype=None):
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or a torch.device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available")
    if device.type == "cpu":
        isa.check()  # a forced kernel table this CPU cannot run fails here, before any weights are read
    if dtype is None:
        # CPUs have no fast half-precision matmul; GPUs want bf16 (fp16 only where bf16 is missing).
        dtype = torch.float32 if device.type == "cpu" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    elif dtype not in _DTYPES.values():
        raise InputError(f"unsupported dtype {dtype!r}: expected torch.float32, float16 or bfloat16 (or its name)")
    return device, dtype


def _local_dir(path):
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:  # "org/name": a hub id, fetched only when the optional huggingface_hub is installed
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{path!r} is not a local directory; to download it as a hub id, "
                              "install huggingface_hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer.model"])
    except Exception as e:  # no network, no such repository, no access: huggingface_hub's own error types
        raise CheckpointError(f"{path!r} is not a local directory, and downloading it as a hub id failed: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e


def load(path, *, device=None, dtype=None, vision_tower=None, mmproj=None, compile=False, quantize=None
         ) -> LlavaModel:
    """Load a LLaVA checkpoint: llava-hf (hub or save_pretrained), the original LLaVA repo's layout, or
    llama.cpp's GGUF (a path ending in .gguf; see gguf.py).

    device: "cuda"/"cpu"/torch.device (default cuda when available); dtype: torch dtype or its name
    (default bfloat16 on GPU, float32 on CPU); vision_tower: the local CLIP directory of an original-layout
    checkpoint (default: its mm_vision_tower, when that is a local directory); mmproj: the GGUF holding the
    CLIP tower and projector of a GGUF text model (without it a GGUF loads text-only and takes no images);
    compile: run the decode step and unpadded prefills through torch.compile (llava_fast/compiled.py: faster
    tokens after a one-time compile of tens of seconds per batch size, reported in last_stats["compile_s"]);
    quantize: None, "int8wo" or "int4wo-<group>": the language model's linear layers weight-only quantized
    (llava_fast/cpu/quantize.py).
    """
    path = os.fspath(path)
    if quantize is not None:
        parse_scheme(quantize)  # a bad scheme fails before the weights are read
    if path.endswith(".gguf"):
        from llava_fast.checkpoints.gguf import read_gguf

        if vision_tower is not None:
            raise InputError("vision_tower= is for original-LLaVA checkpoints; a GGUF's CLIP tower comes in mmproj=")
        device, dtype = resolve_device_dtype(device, dtype)
        net, tokenizer, processor = read_gguf(path, mmproj, device=device, dtype=dtype)
        net = prepare_for_inference(net.fuse_projections(), quantize, compile=compile)
        return LlavaModel(net, tokenizer, processor, compile=compile)
    if mmproj is not None:
        raise InputError(f"mmproj= goes with a GGUF text model (a .gguf path), not {path}")
    path = _local_dir(path)
    device, dtype = resolve_device_dtype(device, dtype)
    cfg, sources = read_config(path, None if vision_tower is None else os.fspath(vision_tower))
    tokenizer = Tokenizer.from_dir(path)  # before the weights: a missing tokenizer fails fast
    net = prepare_for_inference(load_weights(cfg, sources, device, dtype).fuse_projections(), quantize,
                                compile=compile)
    processor_dir = path if os.path.isfile(os.path.join(path, "preprocessor_config.json")) else (
        os.path.dirname(sources[0][0]) if cfg.layout == "original" else None)
    return LlavaModel(net, tokenizer, checkpoint_image_processor(processor_dir, cfg), compile=compile)


def checkpoint_image_processor(processor_dir, cfg, image_aspect_ratio=None):
    """The image processor of a checkpoint: from processor_dir's preprocessor_config.json when there is one,
    else CLIP's defaults at the vision tower's size. LLaVA-NeXT (cfg.anyres): an AnyResProcessor on the model's
    pinpoints (the model arranges tiles by them). image_aspect_ratio "pad" or "square" overrides the
    checkpoint; None keeps its setting: the original config's "pad" wins, otherwise the preprocessor config's
    own (do_pad of a LlavaImageProcessor config, as the trainer writes it for LLaVA-1.5's padding)."""
    if cfg.anyres:
        has_config = processor_dir and os.path.isfile(os.path.join(processor_dir, "preprocessor_config.json"))
        processor = (AnyResProcessor.from_pretrained(processor_dir, cfg.image_grid_pinpoints) if has_config
                     else AnyResProcessor.clip(cfg.vision.image_size, cfg.image_grid_pinpoints))
        if processor.tile_size != cfg.vision.image_size:
            raise CheckpointError(f"{processor_dir}: preprocessor cuts {processor.tile_size}-px tiles but the "
                                  f"vision tower expects {cfg.vision.image_size} px")
        return processor
    pad = (cfg.image_aspect_ratio == "pad") if image_aspect_ratio is None else image_aspect_ratio == "pad"
    config_file = os.path.join(processor_dir, "preprocessor_config.json") if processor_dir else None
    if config_file and os.path.isfile(config_file):
        setting = "pad" if pad else ("from_config" if image_aspect_ratio is None else None)
        processor = ImageProcessor.from_pretrained(processor_dir, image_aspect_ratio=setting)
    else:
        processor = ImageProcessor.clip(image_size=cfg.vision.image_size, pad=pad)
    if processor.image_size != cfg.vision.image_size:
        raise CheckpointError(f"{config_file}: preprocessor crops to {processor.image_size} px but the vision "
                              f"tower expects {cfg.vision.image_size} px")
    return processor
