"""The reference preprocessing path (llava_fast/image/, backend="python") against transformers.

Oracle: transformers' PIL-backed CLIP processor. In transformers 5.x the class named `CLIPImageProcessor` is
the torchvision backend (torchvision's antialiased bicubic, which differs from PIL's by a few levels), and
only falls back to PIL when torchvision is missing; the PIL one is `CLIPImageProcessorPil`, so we name it
explicitly. In 4.x `CLIPImageProcessor` itself is the PIL one. Pad mode's oracle is LLaVA-1.5's
expand2square written here with PIL's paste, followed by the same processor.
"""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from llava_fast.errors import CheckpointError, ImageError
from llava_fast.image import ImageProcessor, load_image

transformers = pytest.importorskip("transformers")
CLIPPil = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

ATOL = 1e-5


def llava_hf_config(reference_dir):
    return f"{reference_dir}/configs/llava-1.5-7b-hf"


def oracle_pixels(oracle, image, **kwargs) -> torch.Tensor:
    out = oracle(image, return_tensors=None, **kwargs)["pixel_values"][0]
    return torch.from_numpy(np.asarray(out))


def expand2square(image: PIL.Image.Image, colour) -> PIL.Image.Image:
    width, height = image.size
    if width == height:
        return image
    edge = max(width, height)
    canvas = PIL.Image.new(image.mode, (edge, edge), colour)
    canvas.paste(image, ((edge - width) // 2, (edge - height) // 2))
    return canvas


def random_rgb(rng, height, width) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_close(ours, reference):
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Matching CLIPImageProcessor
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["extreme_ironing.jpg", "waterview.jpg", "llama_cute.jpg"])
def test_reference_images_match_llava_hf_processor(reference_dir, name):
    path = f"{reference_dir}/images/{name}"
    oracle = CLIPPil.from_pretrained(llava_hf_config(reference_dir))
    ours = ImageProcessor.from_pretrained(llava_hf_config(reference_dir), backend="python")
    assert_close(ours(path)[0], oracle_pixels(oracle, PIL.Image.open(path)))


# (height, width): lines (1xN resizes to 336 x 336N, so N stays small), tiny, exact fits, one off, portrait,
# landscape, large.
SIZES = [(1, 61), (97, 1), (1, 1), (2, 3), (7, 5), (336, 336), (337, 336), (224, 225), (501, 333), (341, 799),
         (1537, 2049)]


@pytest.mark.parametrize("image_size", [336, 224])
@pytest.mark.parametrize("height,width", SIZES)
def test_random_sizes_match_clip_processor(image_size, height, width):
    rng = np.random.default_rng(height * 7919 + width)
    array = random_rgb(rng, height, width)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    oracle = CLIPPil(size=size, crop_size=crop)
    ours = ImageProcessor.clip(image_size, backend="python")
    reference = oracle_pixels(oracle, array, input_data_format="channels_last")
    assert_close(ours(array)[0], reference)


@pytest.mark.parametrize("height,width", [(1, 517), (613, 1), (2, 3), (3, 2), (300, 300), (480, 640), (799, 341)])
def test_pad_to_square_matches_expand2square(reference_dir, height, width):
    rng = np.random.default_rng(height * 31 + width)
    image = PIL.Image.fromarray(random_rgb(rng, height, width))
    oracle = CLIPPil.from_pretrained(llava_hf_config(reference_dir))
    colour = tuple(int(m * 255) for m in oracle.image_mean)
    ours = ImageProcessor.clip(336, pad=True, backend="python")
    assert ours.pad_colour == colour == (122, 116, 104)
    assert_close(ours(image)[0], oracle_pixels(oracle, expand2square(image, colour)))


def test_without_center_crop_matches(reference_dir):
    # Pad + resize without crop gives a square too; without pad the output keeps the aspect ratio.
    rng = np.random.default_rng(3)
    image = PIL.Image.fromarray(random_rgb(rng, 123, 77))
    oracle = CLIPPil(size={"shortest_edge": 96}, do_center_crop=False)
    ours = ImageProcessor.clip(96, pad=True, do_center_crop=False, backend="python")
    assert ours.image_size == 96
    assert_close(ours(image)[0], oracle_pixels(oracle, expand2square(image, ours.pad_colour)))
    plain = ImageProcessor.clip(96, do_center_crop=False, backend="python")
    assert_close(plain(image)[0], oracle_pixels(oracle, image))


def test_crop_larger_than_resized_image_is_zero_padded_like_transformers():
    rng = np.random.default_rng(4)
    array = random_rgb(rng, 50, 71)
    oracle = CLIPPil(size={"shortest_edge": 40}, crop_size={"height": 45, "width": 63})
    ours = ImageProcessor(shortest_edge=40, crop_size=(45, 63), backend="python")
    assert_close(ours(array)[0], oracle_pixels(oracle, array, input_data_format="channels_last"))


def _palette_with_transparency(rng):
    image = PIL.Image.fromarray(rng.integers(0, 16, (29, 41), dtype=np.uint8), "L").convert("P")
    image.info["transparency"] = 3
    return image


def _rgba(rng):
    return PIL.Image.fromarray(rng.integers(0, 256, (29, 41, 4), dtype=np.uint8), "RGBA")


PIL_MODES = {
    "L": lambda rng: _rgba(rng).convert("L"),
    "LA": lambda rng: _rgba(rng).convert("LA"),
    "1": lambda rng: _rgba(rng).convert("1"),
    "RGBA": _rgba,
    "P": lambda rng: _rgba(rng).convert("RGB").convert("P"),
    "P+transparency": _palette_with_transparency,
    "PA": lambda rng: _rgba(rng).convert("PA"),
    "CMYK": lambda rng: _rgba(rng).convert("CMYK"),
    "YCbCr": lambda rng: _rgba(rng).convert("RGB").convert("YCbCr"),
    "I;16": lambda rng: PIL.Image.fromarray(rng.integers(0, 700, (29, 41)).astype(np.uint16)),
    "I": lambda rng: PIL.Image.fromarray(rng.integers(-50, 400, (29, 41)).astype(np.int32)),
    "F": lambda rng: PIL.Image.fromarray(rng.uniform(-10, 300, (29, 41)).astype(np.float32)),
}


@pytest.mark.parametrize("mode", sorted(PIL_MODES))
def test_pil_modes_match_clip_processor(mode):
    image = PIL_MODES[mode](np.random.default_rng(5))
    oracle = CLIPPil()
    ours = ImageProcessor(backend="python")
    assert load_image(image).mode == "RGB"
    assert_close(ours(image)[0], oracle_pixels(oracle, image))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_numpy_channels_last_match_clip_processor(channels):
    rng = np.random.default_rng(channels)
    array = rng.integers(0, 256, (45, 67, channels), dtype=np.uint8)
    oracle = CLIPPil()
    ours = ImageProcessor(backend="python")
    assert_close(ours(array)[0], oracle_pixels(oracle, array, input_data_format="channels_last"))


def test_numpy_greyscale_and_non_contiguous_arrays():
    rng = np.random.default_rng(6)
    grey = rng.integers(0, 256, (45, 67), dtype=np.uint8)
    ours = ImageProcessor(backend="python")
    assert_close(ours(grey)[0], oracle_pixels(CLIPPil(), PIL.Image.fromarray(grey, "L")))
    wide = random_rgb(rng, 90, 134)
    strided = wide[::2, 1::2]  # (45, 67, 3), not contiguous
    assert not strided.flags.c_contiguous
    assert_close(ours(strided)[0], ours(np.ascontiguousarray(strided))[0])


def test_batch_dtype_device_and_path_inputs(reference_dir, tmp_path):
    rng = np.random.default_rng(7)
    png = tmp_path / "random.png"
    PIL.Image.fromarray(random_rgb(rng, 40, 90)).save(png)
    images = [png, str(png), random_rgb(rng, 60, 30), PIL.Image.open(png)]
    ours = ImageProcessor.clip(224, backend="python")
    batch = ours(images)
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == torch.float32
    assert torch.equal(batch[0], batch[1]) and torch.equal(batch[0], batch[3])
    assert_close(batch[2], ours(images[2])[0])
    half = ours(images, dtype=torch.bfloat16, device="cpu")
    assert half.dtype == torch.bfloat16 and torch.equal(half, batch.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------


def test_from_pretrained_reads_llava_hf_config(reference_dir):
    processor = ImageProcessor.from_pretrained(llava_hf_config(reference_dir))
    assert processor == ImageProcessor.clip(336)
    assert processor.image_size == 336 and processor.image_aspect_ratio is None
    assert ImageProcessor().image_size == 224  # CLIPImageProcessor's own defaults


def test_from_pretrained_old_style_and_pad_from_model_config(tmp_path):
    # openai/clip-vit-large-patch14-336 style: int sizes; original LLaVA's config.json says "pad".
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 336, "crop_size": 336}))
    (tmp_path / "config.json").write_text(json.dumps({"image_aspect_ratio": "pad"}))
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor == ImageProcessor.clip(336, pad=True)
    assert ImageProcessor.from_pretrained(tmp_path, image_aspect_ratio=None).image_aspect_ratio is None


@pytest.mark.parametrize(
    "text,needle",
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"size": {"shortest_edge": "big"}}), "size"),
        (json.dumps({"size": {"height": 336, "width": 336}}), "shortest_edge"),
        (json.dumps({"crop_size": {"height": 336}}), "width"),
        (json.dumps({"image_mean": [0.5, 0.5]}), "image_mean"),
        (json.dumps({"image_std": [0.5, 0.0, 0.5]}), "std"),
        (json.dumps({"do_resize": "yes"}), "do_resize"),
        (json.dumps({"image_processor_type": "LlavaNextImageProcessor"}), "LlavaNextImageProcessor"),
    ],
)
def test_malformed_config_raises_checkpoint_error(tmp_path, text, needle):
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=needle) as info:
        ImageProcessor.from_pretrained(tmp_path)
    assert "preprocessor_config.json" in str(info.value)


def test_missing_config_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no preprocessor config"):
        ImageProcessor.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------------
# Bad images
# ------------------------------------------------------------------------------------------------------


def test_bad_files_raise_image_error_naming_the_path(reference_dir, tmp_path):
    with pytest.raises(ImageError, match="not found.*missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="^the image path is empty$"):
        load_image("")
    with pytest.raises(ImageError, match="^image HTTPS://example.com/a.jpg is a URL: llava-fast reads image files"):
        load_image("HTTPS://example.com/a.jpg")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(8).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="garbage.jpg"):
        load_image(garbage)
    truncated = tmp_path / "truncated.jpg"
    data = open(f"{reference_dir}/images/waterview.jpg", "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated.jpg"):
        ImageProcessor(backend="python")([truncated])
    shutil.copy(f"{reference_dir}/images/waterview.jpg", tmp_path / "ok.jpg")
    assert load_image(tmp_path / "ok.jpg").size == (1000, 667)


@pytest.fixture
def pixel_limit(monkeypatch):
    """set_max_image_pixels changes process-wide state (ours and Pillow's): put both back after the test."""
    from llava_fast.image import loading

    monkeypatch.setattr(loading, "_max_image_pixels", loading._max_image_pixels)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", PIL.Image.MAX_IMAGE_PIXELS)
    return loading


def _blank_png(path, width, height):
    PIL.Image.new("1", (width, height)).save(path)  # 1 bit per pixel: 12000 x 12000 is an 18 MB array, 18 kB file
    return path


def test_one_pixel_limit_one_message_and_no_pillow_warning(tmp_path, pixel_limit):
    """A 144 M-pixel PNG: refused from its header by load_image and the image processor (the paths generate,
    chat, the pipelines and the trainer's data take) with the same message, and Pillow's
    DecompressionBombWarning never shows."""
    import warnings

    big = _blank_png(tmp_path / "big.png", 12000, 12000)
    message = (f"image file {big} has 12000x12000 = 144,000,000 pixels, more than the limit of 67,108,864 pixels "
               "(raise it with --max-image-pixels N")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for read in (load_image, lambda path: ImageProcessor(backend="python")([path]),
                     lambda path: ImageProcessor()([path])):
            with pytest.raises(ImageError) as err:
                read(big)
            assert str(err.value).startswith(message), str(err.value)
        # The override: 90 M pixels is over Pillow's warning threshold (89.5 M) and under the raised limit.
        pixel_limit.set_max_image_pixels(100_000_000)
        assert pixel_limit.max_image_pixels() == 100_000_000
        image = pixel_limit.open_image(_blank_png(tmp_path / "ninety.png", 10000, 9000), "ninety.png")
        assert image.size == (10000, 9000)
        with pytest.raises(ImageError, match="12000x12000 = 144,000,000 pixels, more than the limit of 100,000,000"):
            load_image(big)
    pixel_limit.set_max_image_pixels(4 * 6 - 1)
    with pytest.raises(ImageError, match=r"6x4 = 24 pixels, more than the limit of 23 pixels"):
        load_image(_blank_png(tmp_path / "small.png", 6, 4))
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ImageError, match="positive integer"):
            pixel_limit.set_max_image_pixels(bad)


@pytest.mark.parametrize(
    "bad,needle",
    [
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (np.zeros((5, 0), np.uint8), "zero size"),
        (np.zeros((5, 5, 3), np.float32), "uint8"),
        (np.zeros((5, 5, 3), np.uint16), "uint8"),
        (np.zeros((5, 5, 2), np.uint8), "shape"),
        (np.zeros((3, 5, 5, 3), np.uint8), "shape"),
        (np.zeros((5,), np.uint8), "shape"),
        (PIL.Image.new("RGB", (0, 4)), "zero size"),
        (torch.zeros(5, 5, 3, dtype=torch.uint8), "unsupported image type Tensor"),
        (42, "unsupported image type int"),
    ],
)
def test_bad_inputs_raise_image_error(bad, needle):
    with pytest.raises(ImageError, match=needle):
        ImageProcessor(backend="python")(bad)
    assert issubclass(ImageError, ValueError)


def test_empty_batch_raises():
    with pytest.raises(ImageError, match="no images"):
        ImageProcessor(backend="python")([])
