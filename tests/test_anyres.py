"""AnyRes preprocessing (llava_fast/image/anyres.py) against transformers' LlavaNextImageProcessor (PIL backend)
and LlavaNextProcessor's image-token count, and against the original's process_anyres_image,
get_anyres_image_grid_shape and unpad_image (llava-torch 1.2.2.post1), on random images of odd sizes. The pixel
tests run both paths, Python (Pillow + numpy) and native (llava_fast._C), against the oracles, with 0 tolerance;
the native path is also checked bit for bit against the Python one across dtypes, inputs, kernels and threads."""

import importlib.util

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from checkpoints import TOKENIZER_DIR
from original_llava import original_llava

from llava_fast.image import BICUBIC, ImageProcessor, anyres
from llava_fast.image.anyres import LLAVA_NEXT_PINPOINTS, AnyResProcessor

NextPil = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
CLIPPil = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
PINPOINTS = [list(p) for p in LLAVA_NEXT_PINPOINTS]
# (height, width): wide, tall, small, square, odd; 55x176 and 88x99 are where transformers' rounded unpadding and
# the original's truncated one differ; 100x100 where the pinpoints' order breaks a tie.
SIZES = [(300, 1000), (900, 300), (40, 50), (500, 500), (337, 673), (55, 176), (88, 99), (100, 100), (1, 1),
         (1500, 1100)]
NATIVE_BUILT = importlib.util.find_spec("llava_fast._C") is not None
needs_native = pytest.mark.skipif(not NATIVE_BUILT, reason="llava_fast._C not built")
BACKENDS = ["python", pytest.param("native", marks=needs_native)]


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed + height * 7919 + width)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def oracle_processor():
    return NextPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                   image_grid_pinpoints=PINPOINTS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("height,width", SIZES)
def test_tiles_and_sizes_match_llava_next_processor(height, width, backend):
    image = random_image(height, width)
    ours, sizes = AnyResProcessor.clip(336, backend=backend)(image)
    ref = oracle_processor()(image, return_tensors="pt")
    n = anyres.num_tiles(height, width, LLAVA_NEXT_PINPOINTS, 336)
    assert ours.shape == (n, 3, 336, 336)
    assert ref["pixel_values"].shape == (1, n, 3, 336, 336)
    torch.testing.assert_close(ours, ref["pixel_values"][0], atol=0, rtol=0)
    assert sizes.tolist() == ref["image_sizes"].tolist() == [[height, width]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_images_concatenate_their_tiles(backend):
    images = [random_image(300, 1000), random_image(40, 50), random_image(500, 500)]
    ours, sizes = AnyResProcessor.clip(336, backend=backend)(images)
    ref = oracle_processor()(images, return_tensors="pt")  # (3, max tiles, ...) zero-padded
    counts = [anyres.num_tiles(h, w, LLAVA_NEXT_PINPOINTS, 336) for h, w in sizes.tolist()]
    assert counts == [4, 3, 5]  # 1 x 3, 1 x 2 and 2 x 2 grids plus the base tile
    torch.testing.assert_close(ours, torch.cat([pv[:k] for pv, k in zip(ref["pixel_values"], counts)]), atol=0, rtol=0)
    assert sizes.tolist() == ref["image_sizes"].tolist()


def _next_processor(num_additional_image_tokens):
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return transformers.LlavaNextProcessor(image_processor=oracle_processor(), tokenizer=tokenizer, patch_size=14,
                                           vision_feature_select_strategy="default",
                                           num_additional_image_tokens=num_additional_image_tokens)


@pytest.mark.parametrize("height,width", SIZES)
def test_image_token_count_matches_llava_next_processor(height, width):
    image = random_image(height, width)
    ours = anyres.num_image_tokens(height, width, LLAVA_NEXT_PINPOINTS, 336, 24, base_tokens=576)
    image_id = 32000
    ids = _next_processor(1)(images=image, text="<image>\nWhat is this?", return_tensors="pt")["input_ids"][0]
    assert int((ids == image_id).sum()) == ours
    # A processor saved without num_additional_image_tokens (the CLS position the "default" strategy drops)
    # counts one position fewer than the model fills.
    ids = _next_processor(0)(images=image, text="<image>", return_tensors="pt")["input_ids"][0]
    assert int((ids == image_id).sum()) == ours - 1


def test_image_token_count_of_a_672_square_image():
    assert anyres.num_image_tokens(672, 672, LLAVA_NEXT_PINPOINTS, 336, 24, base_tokens=576) == 576 + 48 * 49


def _original_pinpoints():
    """The original's config lists (width, height) pairs: the same list, each pair read the other way round."""
    return [[w, h] for h, w in LLAVA_NEXT_PINPOINTS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("height,width", SIZES)
def test_tiles_and_grid_shape_match_the_original(height, width, backend):
    o = original_llava()
    image = random_image(height, width, seed=3)
    pinpoints = _original_pinpoints()
    ref = o.process_anyres_image(image, CLIPPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                                 pinpoints)
    ours_pinpoints = [(h, w) for w, h in pinpoints]  # as checkpoints/config.py reads them
    ours, _ = AnyResProcessor.clip(336, ours_pinpoints, backend=backend)(image)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    cols, rows = o.get_anyres_image_grid_shape((width, height), pinpoints, 336)
    assert anyres.grid_shape(height, width, ours_pinpoints, 336) == (rows, cols)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("exact", [True, False], ids=["transformers", "original"])
def test_unpadded_window_matches_unpad_image(height, width, exact):
    """The window cuts what transformers' unpad_image (exact) and the original's (truncating) cut."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image

    rows, cols = anyres.grid_shape(height, width, LLAVA_NEXT_PINPOINTS, 336)
    grid = torch.randn(5, rows * 24, cols * 24)
    top, bottom, left, right = anyres.unpadded_window(height, width, rows * 24, cols * 24, exact=exact)
    ref = hf_unpad_image(grid, (height, width)) if exact else original_llava().unpad_image(grid, (width, height))
    torch.testing.assert_close(grid[:, top:bottom, left:right], ref, atol=0, rtol=0)


def test_the_two_unpaddings_differ_where_the_float_product_falls_short():
    rows, cols = anyres.grid_shape(55, 176, LLAVA_NEXT_PINPOINTS, 336)
    exact = anyres.unpadded_window(55, 176, rows * 24, cols * 24, exact=True)
    truncated = anyres.unpadded_window(55, 176, rows * 24, cols * 24, exact=False)
    assert exact == (4, 20, 0, 48) and truncated == (5, 19, 0, 48)


def test_bad_pinpoints_and_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiples of the 336-px tile"):
        AnyResProcessor.clip(336, [(300, 600)])
    (tmp_path / "preprocessor_config.json").write_text('{"image_processor_type": "LlavaNextImageProcessor", '
                                                       '"size": {"shortest_edge": 336}, '
                                                       '"crop_size": {"height": 336, "width": 336}}')
    from llava_fast.errors import CheckpointError

    with pytest.raises(CheckpointError, match="image_grid_pinpoints"):
        AnyResProcessor.from_pretrained(tmp_path)


# --- the native path against the Python one ------------------------------------------------------------------


@pytest.fixture
def best_kernels():
    from llava_fast import _C

    yield _C
    _C.use_kernels("best")


@needs_native
def test_native_is_the_default_and_equals_python_on_a_mixed_batch(best_kernels):
    """Extreme strips, sizes on both sides of every pinpoint, numpy, greyscale and RGBA inputs, in one batch."""
    rng = np.random.default_rng(7)
    shapes = [(1, 2000), (2000, 1), (335, 337), (672, 672), (673, 1345), (1009, 335), (2, 3), (700, 1500)]
    images = [random_image(h, w, seed=5) for h, w in shapes]
    images.append(rng.integers(0, 256, (123, 457, 3), dtype=np.uint8))
    images.append(PIL.Image.fromarray(rng.integers(0, 256, (411, 97), dtype=np.uint8), mode="L"))
    images.append(PIL.Image.fromarray(rng.integers(0, 256, (64, 300, 4), dtype=np.uint8), mode="RGBA"))
    native_processor = AnyResProcessor.clip(336)
    assert native_processor.active_backend == "native"
    python_pixels, python_sizes = native_processor.with_backend("python")(images)
    pixels, sizes = native_processor(images)
    assert pixels.shape == python_pixels.shape
    assert torch.equal(pixels, python_pixels)
    assert torch.equal(sizes, python_sizes)
    best_kernels.use_kernels("scalar")
    assert torch.equal(native_processor(images)[0], python_pixels)


@needs_native
def test_native_dtypes_and_threads_equal_python():
    images = [random_image(h, w, seed=9) for h, w in [(480, 640), (999, 120), (5, 3)]]
    native_processor, python = AnyResProcessor.clip(336, backend="native"), AnyResProcessor.clip(336, backend="python")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        ours = native_processor(images, dtype=dtype)[0]
        assert ours.dtype == dtype
        assert torch.equal(ours, python(images, dtype=dtype)[0]), dtype
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = native_processor(images)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, python(images)[0])


@needs_native
@pytest.mark.parametrize("image_size,pinpoints", [(224, [(224, 448), (672, 224), (672, 672)]),
                                                  (336, [(1008, 1008), (336, 1344)])])
def test_native_other_tile_sizes_and_grids_equal_python(image_size, pinpoints):
    """3 x 3 and 1 x 4 grids, and 224-px tiles (ViT-L/14 at 224): tiles cut where the Python path cuts them."""
    images = [random_image(h, w, seed=11) for h, w in [(900, 901), (100, 700), (700, 100), (13, 17)]]
    processor = AnyResProcessor.clip(image_size, pinpoints)
    assert torch.equal(processor(images)[0], processor.with_backend("python")(images)[0])


@needs_native
def test_native_falls_back_where_the_tile_steps_are_not_no_ops(monkeypatch):
    image = random_image(200, 300)
    bilinear = AnyResProcessor(ImageProcessor.clip(336, resample=PIL.Image.BILINEAR), LLAVA_NEXT_PINPOINTS)
    bigger_edge = AnyResProcessor(ImageProcessor.clip(336, shortest_edge=400), LLAVA_NEXT_PINPOINTS)
    for processor in (bilinear, bigger_edge):
        assert processor.active_backend == "python"
        assert torch.equal(processor(image)[0], processor.with_backend("python")(image)[0])
        with pytest.raises(RuntimeError, match="backend='native' asked for"):
            processor.with_backend("native")(image)
    assert bilinear.tile.resample != BICUBIC
    monkeypatch.setenv("LLAVA_FAST_NATIVE", "0")
    assert AnyResProcessor.clip(336).active_backend == "python"
    with pytest.raises(ValueError, match="backend must be one of"):
        AnyResProcessor.clip(336, backend="gpu")


@needs_native
@pytest.mark.parametrize("placement,needle", [
    ((1, 8, 8, 0, 0, 8, 8, 8, 8, 0), "image index"),
    ((0, 8, 8, 0, 0, 8, 12, 8, 8, 0), "whole number of tiles"),
    ((0, 8, 8, 0, 0, 16, 8, 8, 8, 0), "does not fit"),
    ((0, 8, 8, 0, 0, 8, 8, 8, 8, 3 * 64 + 1), "does not fit"),
    ((0, 0, 8, 0, 0, 8, 8, 8, 8, 0), "resized size"),
    ((0, 8, 8), "10 integers"),
])
def test_native_rejects_placements_outside_the_output(placement, needle):
    from llava_fast import _C

    out = np.empty((1, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match=needle):
        _C.preprocess_tiles_into([np.zeros((9, 9, 3), np.uint8)], [placement], out, np.zeros((3, 256), np.float32),
                                 1, 1)
