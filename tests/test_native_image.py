"""The native preprocessing (llava_fast._C, csrc/) against transformers' PIL-backed CLIP processor and our
Python path.

A tolerance of 2/255 per pixel before normalisation would be common; the native resize reproduces Pillow's fixed-point
arithmetic, so these tests expect and check 0 levels: any difference means a real divergence from Pillow.
After normalisation the native values equal the Python path's bit for bit (same table, same casts).
"""

import threading
import time
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from llava_fast.errors import ImageError
from llava_fast.image import ImageProcessor
from llava_fast.image import native as image_module

native = pytest.importorskip("llava_fast._C", reason="native extension not built (no C++ compiler at install)")
transformers = pytest.importorskip("transformers")
CLIPPil = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def levels_processor(image_size, pad=False, backend="native"):
    """Our processor without rescale/normalise: outputs are the uint8 levels as floats."""
    return ImageProcessor.clip(image_size, pad=pad, do_rescale=False, do_normalize=False, backend=backend)


def oracle_levels(image, image_size) -> torch.Tensor:
    size, crop = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    oracle = CLIPPil(size=size, crop_size=crop, do_rescale=False, do_normalize=False)
    kwargs = {"input_data_format": "channels_last"} if isinstance(image, np.ndarray) else {}
    return torch.from_numpy(np.asarray(oracle(image, return_tensors=None, **kwargs)["pixel_values"][0]))


def expand2square(image: PIL.Image.Image, colour) -> PIL.Image.Image:
    width, height = image.size
    edge = max(width, height)
    canvas = PIL.Image.new("RGB", (edge, edge), colour)
    canvas.paste(image, ((edge - width) // 2, (edge - height) // 2))
    return canvas


def assert_levels_equal(ours, reference):
    assert ours.shape == reference.shape
    worst = (ours - reference.float()).abs().max().item()
    assert worst == 0, f"native differs from CLIPImageProcessor by up to {worst} levels"


@pytest.fixture(autouse=True)
def best_kernels():
    native.use_kernels("best")
    yield
    native.use_kernels("best")


def test_build_info_and_backend_choice():
    info = native.build_info()
    assert info["compiler"] and info["flags"] and info["cxx_standard"] >= 201703
    assert info["kernels"] in ("avx2", "scalar") and info["hardware_threads"] >= 1
    assert ImageProcessor.clip(336).active_backend == "native"
    assert ImageProcessor.clip(336, backend="python").active_backend == "python"
    assert ImageProcessor.clip(336, resample=2).active_backend == "python"  # native is bicubic only


@pytest.mark.parametrize("image_size", [336, 224])
@pytest.mark.parametrize("name", ["extreme_ironing.jpg", "waterview.jpg", "llama_cute.jpg"])
def test_reference_images_match_clip_processor(reference_dir, name, image_size):
    photo = PIL.Image.open(f"{reference_dir}/images/{name}")
    assert_levels_equal(levels_processor(image_size)(photo)[0], oracle_levels(photo, image_size))
    # and normalised: bit-identical to the Python path
    fast = ImageProcessor.clip(image_size)
    assert torch.equal(fast(photo), fast.with_backend("python")(photo))


# (height, width): 1x1, lines, tiny, exact fits, portrait, landscape, tall enough for Pillow 13's
# vertical-first order (846x277 at 224), and one 4000x3000 photo (kept to one size: PIL takes ~0.1 s).
SIZES_336 = [(1, 1), (1, 2), (2, 1), (1, 37), (53, 1), (3, 5), (336, 336), (336, 449), (337, 336), (480, 640),
             (640, 480), (1000, 667), (1200, 301), (3000, 4000)]
SIZES_224 = [(1, 1), (7, 3), (224, 225), (846, 277), (277, 846), (500, 333), (999, 120)]


@pytest.mark.parametrize("image_size,height,width",
                         [(336, h, w) for h, w in SIZES_336] + [(224, h, w) for h, w in SIZES_224])
def test_random_sizes_match_clip_processor(image_size, height, width):
    rng = np.random.default_rng(height * 7919 + width)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = levels_processor(image_size)
    reference = oracle_levels(array, image_size)
    assert_levels_equal(ours(array)[0], reference)
    assert_levels_equal(ours(PIL.Image.fromarray(array))[0], reference)  # Pillow's own memory, in place


@pytest.mark.parametrize("height,width", [(1, 1), (1, 40), (40, 1), (300, 300), (480, 640), (801, 450)])
def test_pad_to_square_matches_expand2square(height, width):
    rng = np.random.default_rng(height + 31 * width)
    photo = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ours = levels_processor(336, pad=True)
    assert_levels_equal(ours(photo)[0], oracle_levels(expand2square(photo, ours.pad_colour), 336))
    fast = ImageProcessor.clip(336, pad=True)
    assert torch.equal(fast(photo), fast.with_backend("python")(photo))


def test_greyscale_rgba_and_palette_are_converted_first():
    rng = np.random.default_rng(9)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (123, 77, 4), dtype=np.uint8), "RGBA")
    grey = rng.integers(0, 256, (90, 140), dtype=np.uint8)
    images = [rgba, rgba.convert("L"), rgba.convert("LA"), rgba.convert("RGB").convert("P"),
              grey, np.asarray(rgba), grey[:, :, None]]
    fast = ImageProcessor.clip(224)
    assert torch.equal(fast(images), fast.with_backend("python")(images))
    assert_levels_equal(levels_processor(224)(rgba)[0], oracle_levels(rgba, 224))


def test_scalar_and_avx2_kernels_agree():
    rng = np.random.default_rng(10)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(480, 640, 3), (999, 120, 3), (5, 3, 3)]]
    photos = [PIL.Image.fromarray(array) for array in arrays]
    fast = ImageProcessor.clip(336)
    best = fast(arrays + photos)
    native.use_kernels("scalar")
    assert native.build_info()["kernels"] == "scalar"
    assert torch.equal(fast(arrays + photos), best)


def test_dtypes_out_and_threads_give_identical_values():
    rng = np.random.default_rng(11)
    arrays = [rng.integers(0, 256, (rng.integers(50, 700), rng.integers(50, 700), 3), dtype=np.uint8)
              for _ in range(5)]
    fast, python = ImageProcessor.clip(336), ImageProcessor.clip(336, backend="python")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(fast(arrays, dtype=dtype), python(arrays, dtype=dtype)), dtype
    out = torch.full((5, 3, 336, 336), float("nan"), dtype=torch.bfloat16)
    assert fast(arrays, dtype=torch.bfloat16, out=out) is out
    assert torch.equal(out, python(arrays, dtype=torch.bfloat16))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = fast(arrays)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, fast(arrays))
    with pytest.raises(ValueError, match="shape"):
        fast(arrays, out=torch.empty(4, 3, 336, 336))


def test_large_pil_image_in_several_memory_blocks():
    # Pillow splits images over 16 MiB into blocks, which it cannot export in place: we copy instead.
    photo = PIL.Image.new("RGB", (2600, 1700), (10, 200, 30))
    photo.paste((250, 5, 90), (1000, 500, 1600, 1200))
    fast = ImageProcessor.clip(224)
    assert torch.equal(fast(photo), fast.with_backend("python")(photo))


def test_gil_is_released_during_the_native_call():
    rng = np.random.default_rng(12)
    arrays = [rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8) for _ in range(4)]
    lut = np.zeros((3, 256), np.float32)
    out = np.empty((4, 3, 336, 336), np.float32)
    ticks, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.01)
    try:
        start = ticks[0]
        native.preprocess_into(arrays, out, lut, 336, None, 1, 1)  # ~40 ms on one thread
        during = ticks[0] - start
    finally:
        stop.set()
        counter.join()
    assert during > 1000, f"the Python thread ran only {during} loops while native code worked"


@pytest.mark.parametrize(
    "bad,needle",
    [
        (np.zeros((0, 5, 3), np.uint8), "zero-size"),
        (np.zeros((5, 5, 3), np.float32), "uint8"),
        (np.zeros((5, 5, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((5, 5), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((5, 10, 3), np.uint8)[:, ::2], "contiguous"),
        ("not an image", "expected a uint8"),
    ],
)
def test_native_rejects_bad_buffers(bad, needle):
    out = np.empty((1, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match=needle):
        native.preprocess_into([bad], out, np.zeros((3, 256), np.float32), 8, None, 1, 1)


def test_native_rejects_bad_output_and_table():
    image = np.zeros((9, 9, 3), np.uint8)
    lut = np.zeros((3, 256), np.float32)
    with pytest.raises(ValueError, match="batch dimension"):
        native.preprocess_into([image, image], np.empty((1, 3, 8, 8), np.float32), lut, 8, None, 1, 1)
    with pytest.raises(ValueError, match="lut"):
        native.preprocess_into([image], np.empty((1, 3, 8, 8), np.float32), lut[:, :255].copy(), 8, None, 1, 1)
    with pytest.raises(ValueError, match="pass_order"):
        native.preprocess_into([image], np.empty((1, 3, 8, 8), np.float32), lut, 8, None, 7, 1)


def test_processor_raises_image_error_for_bad_images():
    fast = ImageProcessor.clip(224, backend="native")
    for bad in (np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.int16),
                PIL.Image.new("RGB", (0, 3))):
        with pytest.raises(ImageError):
            fast(bad)
    strided = np.random.default_rng(13).integers(0, 256, (60, 80, 3), dtype=np.uint8)[:, ::2]
    assert torch.equal(fast(strided), fast.with_backend("python")(strided))  # made contiguous, not refused


def test_pass_order_probe_finds_the_installed_pillow():
    image_module._native_module()
    assert image_module._native_state["pass_order"] in (0, 1)


def test_python_fallback_warns_once_when_native_is_missing(monkeypatch):
    monkeypatch.setattr(image_module, "_native_state",
                        {"module": None, "reason": "the native extension llava_fast._C is not built (test)"})
    monkeypatch.setattr(image_module, "_warned", set())
    array = np.zeros((30, 40, 3), np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageProcessor.clip(224)(array)
        ImageProcessor.clip(224)(array)
    assert len([w for w in caught if "not built" in str(w.message)]) == 1
    with pytest.raises(RuntimeError, match="native"):
        ImageProcessor.clip(224, backend="native")(array)
    monkeypatch.setenv("LLAVA_FAST_NATIVE", "0")
    monkeypatch.setattr(image_module, "_native_state", {})
    assert ImageProcessor.clip(224).active_backend == "python"


def test_benchmark_native_batch(benchmark):
    rng = np.random.default_rng(14)
    photos = [PIL.Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(8)]
    fast = ImageProcessor.clip(336)
    out = torch.empty(8, 3, 336, 336)
    benchmark.pedantic(lambda: fast(photos, out=out), rounds=5, iterations=1, warmup_rounds=1)
    assert torch.equal(out, fast.with_backend("python")(photos))


def test_env_var_forces_python(monkeypatch):
    monkeypatch.setenv("LLAVA_FAST_NATIVE", "0")
    assert ImageProcessor.clip(224).active_backend == "python"
    assert ImageProcessor.clip(224, backend="native").active_backend == "native"
