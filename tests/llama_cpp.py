"""llama.cpp's own GGUF converters, fetched once from PyPI (the llama-cpp-python sdist vendors the llama.cpp
sources) and run on checkpoints the tests write, so the GGUF loader is checked against files llama.cpp makes,
not against a writer of ours.

- text model: convert_hf_to_gguf.py on a llava-hf save_pretrained directory (it registers
  LlavaForConditionalGeneration and converts the LLaMA half), --outtype f32 / f16 / q8_0;
- image encoder: the LLaVA-1.5 recipe of docs/multimodal/llava.md: tools/mtmd/legacy-models/llava_surgery.py
  on the original-layout checkpoint (-> llava.projector), then convert_image_encoder_to_gguf.py on a CLIPModel
  directory plus that projector (-> mmproj-model-f16.gguf).

The converters run in subprocesses with the sdist's own gguf-py first on the path (its writer, not the `gguf`
the loader reads with). Cache: $LLAVA_FAST_TEST_CACHE or ~/.cache/llava-fast-tests (76 MB sdist, ~20 MB
unpacked).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import pytest
import torch
from test_pypi_models import TEST_CACHE, _registry_reachable

VERSION = "0.3.36"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "tools/mtmd/legacy-models/")


def sources() -> str:
    """The vendored llama.cpp directory (converters + gguf-py), fetched and unpacked once."""
    root = os.path.join(TEST_CACHE, f"llama.cpp-{VERSION}")
    if os.path.isfile(os.path.join(root, ".complete")):
        return root
    os.makedirs(TEST_CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TEST_CACHE) as tmp:
        # --no-binary names the one package whose sdist we want: ":all:" would also build pip's metadata step's
        # build requirements from source (CMake itself: over 40 minutes on 2 cores, against ~20 s this way).
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                   "--disable-pip-version-check", "--quiet", "--dest", tmp, f"llama-cpp-python=={VERSION}"]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
        if not archives:  # pip may fail preparing metadata after the download; the archive is what we need
            if not _registry_reachable():
                pytest.skip("the package registry is unreachable: cannot fetch llama.cpp's converters")
            raise RuntimeError(f"pip download llama-cpp-python=={VERSION} failed: {done.stderr[-2000:]}")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        unpacked = os.path.join(tmp, "llama.cpp")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(_MEMBERS) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(unpacked, members=members, filter="data")
        open(os.path.join(unpacked, ".complete"), "w").close()
        if not os.path.exists(root):  # another process may have won the race; its copy is as good
            os.replace(unpacked, root)
    return root


def _run(script, *args):
    root = sources()
    env = {**os.environ, "PYTHONPATH": os.path.join(root, "gguf-py")}
    env.pop("NO_LOCAL_GGUF", None)
    done = subprocess.run([sys.executable, os.path.join(root, script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def convert_text(hf_dir, outtype, out_path):
    """convert_hf_to_gguf.py on a llava-hf / LLaMA directory -> out_path."""
    _run("convert_hf_to_gguf.py", hf_dir, "--outtype", outtype, "--outfile", out_path)
    return out_path


def convert_mmproj(model, original_dir, out_dir):
    """The LLaVA-1.5 image-encoder recipe: llava_surgery.py on the original-layout checkpoint (single .bin),
    a CLIPModel directory holding `model`'s tower (transformers LlavaForConditionalGeneration), then
    convert_image_encoder_to_gguf.py. Returns the mmproj path (f16, as llama.cpp releases them)."""
    _run("tools/mtmd/legacy-models/llava_surgery.py", "-m", original_dir)
    clip_dir = os.path.join(out_dir, "clip-full")
    write_clip_model(model, clip_dir)
    _run("tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py", "-m", clip_dir, "--llava-projector",
         os.path.join(original_dir, "llava.projector"), "--output-dir", out_dir)
    return os.path.join(out_dir, "mmproj-model-f16.gguf")


def write_clip_model(model, dst):
    """A full CLIPModel checkpoint (what the converter reads without --clip-model-is-vision, whose
    CLIPVisionModel path needs transformers 4.x) with `model`'s vision tower, a one-layer random text tower,
    and a CLIPProcessor with an 8-token vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vc = model.config.vision_config
    cfg = CLIPConfig(vision_config=vc.to_dict(), projection_dim=16, text_config=dict(
        hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4, vocab_size=8,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    clip = CLIPModel(cfg)
    tower = {k.split("vision_tower.", 1)[1].removeprefix("vision_model."): v
             for k, v in model.state_dict().items() if "vision_tower." in k}
    clip.vision_model.load_state_dict(tower, strict=True)
    os.makedirs(dst, exist_ok=True)
    clip.save_pretrained(dst)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5, "ab</w>": 6, "c</w>": 7}
    with open(os.path.join(dst, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(dst, "merges.txt"), "w") as f:
        f.write("#version: 0.2\na b</w>\n")
    size = vc.image_size
    CLIPProcessor(image_processor=CLIPImageProcessor(crop_size={"height": size, "width": size},
                                                     size={"shortest_edge": size}),
                  tokenizer=CLIPTokenizer(os.path.join(dst, "vocab.json"), os.path.join(dst, "merges.txt"))
                  ).save_pretrained(dst)


def round_to_fp16(model):
    """Make every weight exactly representable in float16, so the F16 tensors llama.cpp's converters write
    (all of an F16 file; the mmproj's patch conv and projector always) lose nothing."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def convert_next(model, root):
    """LLaVA-1.6's recipe (docs/multimodal/llava.md) on a transformers LlavaNextForConditionalGeneration ->
    (text GGUF, mmproj GGUF), both F32 but the mmproj's patch conv (always F16):

    - llava_surgery_v2.py on the original-layout checkpoint -> llava.projector (model.mm_projector.* and
      model.image_newline);
    - convert_image_encoder_to_gguf.py on a CLIP directory whose vision config carries the original's AnyRes
      settings (image_grid_pinpoints as the original config lists them, mm_patch_merge_type spatial_unpad,
      image_aspect_ratio anyres: the recipe's config_vit.json), plus that projector;
    - the language model converted as the LLaMA it is: convert_hf_to_gguf.py on its LlamaForCausalLM
      save_pretrained directory (the recipe's legacy converter writes the same LLaMA GGUF from the original
      checkpoint; this converter has no LlavaNext entry).
    Returns (text path, mmproj path, original-layout directory)."""
    import checkpoints as ck
    from transformers import LlamaForCausalLM

    original_dir = ck.write_checkpoint(model, os.path.join(root, "original"), "original", shards=1)
    _run("tools/mtmd/legacy-models/llava_surgery_v2.py", "-m", original_dir)
    clip_dir = os.path.join(root, "clip-full")
    write_clip_model(model, clip_dir)
    with open(os.path.join(clip_dir, "config.json")) as f:
        config = json.load(f)
    config["vision_config"].update(image_grid_pinpoints=model.config.image_grid_pinpoints,
                                   mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres")
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
        json.dump(config, f)
    mmproj_dir = os.path.join(root, "mmproj")
    _run("tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py", "-m", clip_dir, "--llava-projector",
         os.path.join(original_dir, "llava.projector"), "--output-dir", mmproj_dir, "--use-f32")

    llama = LlamaForCausalLM(model.config.text_config)
    state = {k.split("language_model.", 1)[1]: v for k, v in model.state_dict().items() if "language_model." in k}
    llama.model.load_state_dict(state, strict=True)
    with torch.no_grad():
        llama.lm_head.weight.copy_(model.lm_head.weight)
    llama_dir = os.path.join(root, "llama")
    llama.save_pretrained(llama_dir)
    ck.copy_tokenizer(llama_dir)
    text = convert_text(llama_dir, "f32", os.path.join(root, "text-f32.gguf"))
    return text, os.path.join(mmproj_dir, "mmproj-model-f32.gguf"), original_dir
