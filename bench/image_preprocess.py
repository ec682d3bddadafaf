"""Image preprocessing throughput: native (llava_fast._C) vs transformers' CLIPImageProcessor vs our Python path.

    python -m llava_fast.bench.image_preprocess [--batch 32] [--size 640x480] [--image-size 336] [--repeats 7]
    python -m llava_fast.bench.image_preprocess --anyres [--batch 1] [--size 672x672] [--repeats 15]

--anyres: LLaVA-NeXT's AnyRes tiles (the base tile plus the grid, LLaVA-1.6's pinpoints) instead of CLIP's one
crop: our native path, our Python path and transformers' LlavaNextImageProcessor, timed in interleaved rounds
(each round runs every path once, in turn, so load changes hit all of them alike); the table shows each path's
median and the median over rounds of its per-round ratio to the processor's time.

Input: `batch` decoded photos of random content as PIL RGB images (what a server holds after decoding),
the same objects for every path. Each path runs the whole batch `repeats` times after one warm-up run;
the table shows the median, images/s and the speed-up over CLIPImageProcessor. The native path also runs
writing into a reused output (no fresh 43 MB to page in), on numpy arrays, and on one thread. Outputs are
checked against our Python path before timing. Decoding (JPEG -> pixels) is not timed: every path pays
the same Pillow decode. On a shared machine compare rows of one run only (the load average is printed).

Measured on the 2-core Xeon VM, quiet (load ~1.7): CLIPImageProcessor (PIL backend) 145 images/s; native
1200-1300 images/s (8-9x), 1650 images/s into a reused out= (11x), 700 images/s on one thread (5x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
import PIL.Image
import torch

from llava_fast.image import ImageProcessor


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-use probes, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def clip_processors(image_size: int):
    """transformers' CLIPImageProcessor as a user gets it by default, and the PIL one if that differs."""
    try:
        import transformers
    except ImportError:
        return []
    size, crop = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    with warnings.catch_warnings():  # 5.x without torchvision warns that it falls back to the PIL backend
        warnings.simplefilter("ignore")
        default = transformers.CLIPImageProcessor(size=size, crop_size=crop)
    found = [(f"CLIPImageProcessor ({getattr(default, 'backend', 'pil')})", default)]
    pil_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil_class is not None and not isinstance(default, pil_class):
        found.append(("CLIPImageProcessorPil", pil_class(size=size, crop_size=crop)))
    return found


def next_processors(image_size: int, pinpoints):
    """transformers' LlavaNextImageProcessor as a user gets it by default, and the PIL one if that differs."""
    try:
        import transformers
    except ImportError:
        return []
    settings = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                    image_grid_pinpoints=[list(p) for p in pinpoints])
    found = []
    try:  # 5.x's default is the torchvision backend, which needs torchvision installed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = transformers.LlavaNextImageProcessor(**settings)
        found.append((f"LlavaNextImageProcessor ({getattr(default, 'backend', 'pil')})", default))
    except ImportError:
        default = None
    pil_class = getattr(transformers, "LlavaNextImageProcessorPil", None)
    if pil_class is not None and not isinstance(default, pil_class):
        found.append(("LlavaNextImageProcessorPil", pil_class(**settings)))
    return found


def anyres_main(args, width: int, height: int) -> None:
    from llava_fast.image import AnyResProcessor

    rng = np.random.default_rng(0)
    photos = [PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(args.batch)]
    python = AnyResProcessor.clip(args.image_size, backend="python")
    native = AnyResProcessor.clip(args.image_size)
    reference, _ = python(photos)
    paths = []  # (name, fn)
    for name, processor in next_processors(args.image_size, python.grid_pinpoints):
        got = processor(photos, return_tensors="pt")["pixel_values"].flatten(0, 1)[: len(reference)]
        agree = (got - reference).abs().max().item() if got.shape == reference.shape else float("inf")
        paths.append((f"{name}  [max diff vs ours {agree:.1e}]",
                      lambda processor=processor: processor(photos, return_tensors="pt")))
    paths.append(("llava-fast Python path", lambda: python(photos)))
    if native.active_backend == "native":
        assert torch.equal(native(photos)[0], reference), "native output differs from the Python path"
        paths.append((f"llava-fast native, {torch.get_num_threads()} threads", lambda: native(photos)))
    for _, fn in paths:
        fn()  # warm-up: first-use probes, allocator, caches
    samples = [[] for _ in paths]
    for _ in range(args.repeats):
        for i, (_, fn) in enumerate(paths):
            start = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - start)
    print(f"AnyRes: {args.batch} image(s) {width}x{height} -> {len(reference)} tiles of {args.image_size} px, "
          f"{args.repeats} interleaved rounds; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'path':<72} {'ms/batch':>9} {'vs first':>9}")
    for (name, _), times in zip(paths, samples):
        ratio = statistics.median(first / t for first, t in zip(samples[0], times))
        print(f"{name:<72} {statistics.median(times) * 1e3:9.1f} {ratio:8.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the input photos")
    parser.add_argument("--image-size", type=int, default=336, help="CLIP input resolution (336 or 224)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--anyres", action="store_true", help="LLaVA-NeXT AnyRes tiles, paths in interleaved rounds")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.anyres:
        return anyres_main(args, width, height)

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.batch)]
    photos = [PIL.Image.fromarray(array) for array in arrays]
    python = ImageProcessor.clip(args.image_size, backend="python")
    native = ImageProcessor.clip(args.image_size, backend="auto")
    reference = python(photos)

    rows = []  # (name, seconds per batch)
    baseline = None
    for name, processor in clip_processors(args.image_size):
        got = torch.from_numpy(np.stack(processor(photos, return_tensors=None)["pixel_values"]))
        agree = (got - reference).abs().max().item()
        seconds = median_seconds(lambda processor=processor: processor(photos, return_tensors="pt"), args.repeats)
        rows.append((f"{name}  [max diff vs ours {agree:.1e}]", seconds))
        baseline = baseline or seconds
    rows.append(("llava-fast Python path", median_seconds(lambda: python(photos), args.repeats)))
    if native.active_backend == "native":
        from llava_fast import _C

        assert torch.equal(native(photos), reference), "native output differs from the Python path"
        threads = torch.get_num_threads()
        out = torch.empty_like(reference)
        rows.append((f"llava-fast native, {threads} threads", median_seconds(lambda: native(photos), args.repeats)))
        rows.append((f"llava-fast native, {threads} threads, into a reused out=", median_seconds(
            lambda: native(photos, out=out), args.repeats)))
        rows.append((f"llava-fast native, {threads} threads, numpy input", median_seconds(
            lambda: native(arrays), args.repeats)))
        torch.set_num_threads(1)
        rows.append(("llava-fast native, 1 thread", median_seconds(lambda: native(photos), args.repeats)))
        torch.set_num_threads(threads)
        info = _C.build_info()
        build = f"{info['compiler']}, {info['flags']}, {info['kernels']} kernels"
    else:
        build = "not built: native rows skipped"

    print(f"{args.batch} photos {width}x{height} -> {args.image_size}x{args.image_size}, median of {args.repeats}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; native: {build}")
    print(f"{'path':<72} {'ms/batch':>9} {'images/s':>9} {'vs CLIP':>8}")
    for name, seconds in rows:
        ratio = f"{baseline / seconds:7.1f}x" if baseline else "      -"
        print(f"{name:<72} {seconds * 1e3:9.1f} {args.batch / seconds:9.0f} {ratio}")


if __name__ == "__main__":
    main()
