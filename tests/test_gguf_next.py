"""GGUF LLaVA-1.6 (NeXT): a tiny random LlavaNextForConditionalGeneration converted by llama.cpp's own scripts
(tests/llama_cpp.py convert_next: llava_surgery_v2.py, convert_image_encoder_to_gguf.py with the AnyRes vision
config, convert_hf_to_gguf.py for the LLaMA half) loads through `--model X.gguf --mmproj Y.gguf` and gives the
logits of the same checkpoint in the original layout, the layout those converters start from (its pinpoints read
as (width, height), its truncating unpad), within 1e-4 in float32. The weights are rounded to float16 values
first, so the mmproj's F16 patch conv loses nothing. An mmproj missing one of the three LLaVA-1.6 parts is a
CheckpointError naming it.

The tiles are 28 px (2 x 2 patches) with LLaVA-1.6's pinpoints scaled to them: every AnyRes step runs in
milliseconds.
"""

import checkpoints as ck
import llama_cpp
import numpy as np
import PIL.Image
import pytest
from test_gguf import _rewrite

import llava_fast
from llava_fast.cli import main as cli_main
from llava_fast.errors import CheckpointError

TILE = 28
PINPOINTS = [[p * TILE // 336 for p in pair] for pair in ck.NEXT_PINPOINTS]
SIZES = [(30, 100), (90, 30), (5, 6), (56, 56), (33, 51)]  # (height, width): wide, tall, small, square, odd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gguf-next"))
    hf = llama_cpp.round_to_fp16(ck.make_hf_next_model(seed=11, image_size=TILE, pinpoints=PINPOINTS))
    text, mmproj, original_dir = llama_cpp.convert_next(hf, root)
    return text, mmproj, original_dir


@pytest.fixture(scope="module")
def models(converted):
    text, mmproj, original_dir = converted
    return (llava_fast.load(text, mmproj=mmproj, device="cpu", dtype="float32"),
            llava_fast.load(original_dir, device="cpu", dtype="float32"))


def random_image(height, width, seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_mmproj_metadata_is_llama_cpps(converted):
    """The keys and the tensor name llama.cpp's clip.cpp reads, as its converter wrote them."""
    from llava_fast.checkpoints.gguf import GGUFFile

    f = GGUFFile(converted[1])
    assert f.get("clip.vision.image_grid_pinpoints") == [v for pair in PINPOINTS for v in pair]
    assert f.get("clip.vision.mm_patch_merge_type") == "spatial_unpad"
    assert "model.image_newline" in f.tensors


@pytest.mark.parametrize("index", range(len(SIZES)))
def test_logits_equal_the_original_layout(models, index):
    gguf, original = models
    assert gguf.config.image_grid_pinpoints == original.config.image_grid_pinpoints
    assert not gguf.config.exact_unpad
    image = random_image(*SIZES[index], seed=index)
    images = [image, random_image(*SIZES[(index + 2) % len(SIZES)], seed=index + 9)]  # two images in one row
    g = np.random.default_rng(index)
    outs = []
    for model in (gguf, original):
        pixels, sizes = model.processor(images)
        counts = model.image_token_counts(sizes.tolist())
        row = [1] + g.integers(3, 32000, 4).tolist()
        for n in counts:
            row += [model.config.image_token_id] * n + g.integers(3, 32000, 3).tolist()
        g = np.random.default_rng(index)  # the same text ids for both
        outs.append((row, model.logits([row], pixels, sizes)))
    (row_a, a), (row_b, b) = outs
    assert row_a == row_b
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-4


def test_generate_with_model_and_mmproj(converted, models, tmp_path, capsys):
    text, mmproj, _ = converted
    path = str(tmp_path / "wide.png")
    random_image(30, 100, seed=5).save(path)
    prompt = "Describe the image."
    code = cli_main(["generate", "--model", text, "--mmproj", mmproj, "--image", path, "--prompt", prompt,
                     "--max-new-tokens", "8", "--template", "vicuna_v1", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    expected = models[1].generate(prompt, path, max_new_tokens=8, template="vicuna_v1")
    assert out == expected + "\n" and len(expected) > 0


@pytest.mark.parametrize("damage, needle", [
    ("pinpoints", "metadata key 'clip.vision.image_grid_pinpoints' is missing"),
    ("merge", "metadata key 'clip.vision.mm_patch_merge_type' is missing"),
    ("newline", "tensor 'model.image_newline' is missing"),
    ("flat", "'clip.vision.mm_patch_merge_type' is 'flat'"),
    ("odd", "must be a flat list of width, height integers"),
])
def test_mmproj_missing_a_part_is_an_error_naming_it(converted, tmp_path, damage, needle):
    text, mmproj, _ = converted
    path = str(tmp_path / f"mmproj-{damage}.gguf")
    if damage == "pinpoints":
        _rewrite(mmproj, path, drop_keys={"clip.vision.image_grid_pinpoints"})
    elif damage == "merge":
        _rewrite(mmproj, path, drop_keys={"clip.vision.mm_patch_merge_type"})
    elif damage == "newline":
        _rewrite(mmproj, path, tensors={"model.image_newline": None})
    elif damage == "flat":
        _rewrite(mmproj, path, drop_keys={"clip.vision.mm_patch_merge_type"},
                 set_keys={"clip.vision.mm_patch_merge_type": "flat"})
    else:
        _with_int_array(mmproj, path, "clip.vision.image_grid_pinpoints", [28, 56, 56])
    with pytest.raises(CheckpointError, match=rf"mmproj-{damage}.*\.gguf: .*{needle}"):
        llava_fast.load(text, mmproj=path, device="cpu")


def _with_int_array(src, dst, key, values):
    """A copy of the GGUF `src` with metadata `key` replaced by the integer array `values`."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", key):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    writer.add_array(key, values)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
