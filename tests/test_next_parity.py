"""LLaVA-NeXT parity with transformers' LlavaNextForConditionalGeneration and its processor, on tiny random
checkpoints with the real 336-px tiles and LLaVA-1.6's pinpoints.

Logits within 1e-4 in float32 for wide, tall, small, square and odd-sized images, two images in one prompt and a
text-only prompt, taking pixel_values and image_sizes exactly as the processor returns them; the checkpoint in
transformers' save_pretrained layout and in the llava-hf hub names; greedy text from generate() (one prompt, and
a batch whose rows have different tile counts) equal to transformers' generate on the same ids.
"""

import checkpoints as ck
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from checkpoints import DEVICE

import llava_fast
from llava_fast.errors import InputError

pytestmark = pytest.mark.slow  # thousands of image positions per prompt: about 5 minutes on the 2-core CPU

NextPil = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
IMAGE_ID = 32000
# (height, width): wide (1 x 3 grid), tall (3 x 1), small (upscaled onto 1 x 2), square (2 x 2: 2,928
# positions), odd (an unpadded window cut on both sides).
SIZES = {"wide": (300, 1000), "tall": (900, 300), "small": (40, 50), "square": (672, 672), "odd": (337, 511)}
NEW_TOKENS = 12


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed * 1000 + height + 7 * width)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_processor():
    return NextPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                   image_grid_pinpoints=ck.NEXT_PINPOINTS)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def hf_model(request):
    return ck.make_hf_next_model(seed=7 if request.param == "llama" else 8, text_model=request.param)


@pytest.fixture(scope="module")
def checkpoint_dirs(hf_model, tmp_path_factory):
    return {layout: ck.write_checkpoint(hf_model, str(tmp_path_factory.mktemp(f"next-{layout}")), layout)
            for layout in ("save_pretrained", "hub")}


@pytest.fixture(scope="module")
def model(checkpoint_dirs):
    return llava_fast.load(checkpoint_dirs["save_pretrained"], device=DEVICE, dtype="float32")


def _text(k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (k,), generator=g).tolist()


def _compare_logits(hf_model, model, images, seed=0):
    """One row: BOS, text, each image's expanded positions with text between -> ours vs transformers'."""
    batch = hf_processor()(images, return_tensors="pt") if images else {"pixel_values": None, "image_sizes": None}
    counts = model.image_token_counts(batch["image_sizes"].tolist()) if images else []
    row = [1] + _text(4, seed)
    for i, n in enumerate(counts):
        row += [IMAGE_ID] * n + _text(3 + i, seed + i + 1)
    ours = model.logits([row], batch["pixel_values"], batch["image_sizes"]).cpu()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([row]), pixel_values=batch["pixel_values"],
                       image_sizes=batch["image_sizes"]).logits
    assert ours.shape == ref.shape == (1, len(row), ck.VOCAB)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    return row


@pytest.mark.parametrize("name", list(SIZES))
def test_logits_match_transformers(hf_model, model, name):
    row = _compare_logits(hf_model, model, [random_image(*SIZES[name])])
    if name == "square":
        assert row.count(IMAGE_ID) == 576 + 48 * 49


def test_two_images_in_one_prompt_and_text_only(hf_model, model):
    _compare_logits(hf_model, model, [random_image(*SIZES["wide"], seed=1), random_image(*SIZES["small"], seed=2)])
    _compare_logits(hf_model, model, [])


def test_every_layout_loads_the_same_model(hf_model, checkpoint_dirs):
    image = random_image(*SIZES["odd"], seed=3)
    for _layout, path in checkpoint_dirs.items():
        _compare_logits(hf_model, llava_fast.load(path, device=DEVICE, dtype="float32"), [image], seed=5)


def test_concatenated_tiles_equal_the_padded_batch(model):
    images = [random_image(*SIZES["small"], seed=4), random_image(*SIZES["tall"], seed=4)]
    batch = hf_processor()(images, return_tensors="pt")  # (2, 4, 3, 336, 336): the small image's 3 tiles padded
    assert batch["pixel_values"].shape[:2] == (2, 4)
    ours_tiles, ours_sizes = model.processor(images)
    counts = model.image_token_counts(ours_sizes.tolist())
    row = [1] + [IMAGE_ID] * counts[0] + [5] + [IMAGE_ID] * counts[1] + [6]
    padded = model.logits([row], batch["pixel_values"], batch["image_sizes"])
    torch.testing.assert_close(model.logits([row], ours_tiles, ours_sizes), padded, atol=0, rtol=0)


def test_bad_image_inputs_are_refused(model):
    batch = hf_processor()(random_image(40, 50), return_tensors="pt")
    n = model.image_token_counts(batch["image_sizes"].tolist())[0]
    row = [1] + [IMAGE_ID] * n
    with pytest.raises(InputError, match="image_sizes"):
        model.logits([row], batch["pixel_values"])
    with pytest.raises(InputError, match="tiles"):
        model.logits([row], batch["pixel_values"][0, :2], batch["image_sizes"])
    with pytest.raises(InputError, match="image-token positions"):
        model.logits([row[:-1]], batch["pixel_values"], batch["image_sizes"])
    with pytest.raises(InputError, match="image_token_counts"):
        model.num_image_tokens  # noqa: B018 (a property)
    # A 0 side divided by zero in the tile geometry and a negative one raised a TypeError from deep inside it.
    for sizes in ([[0, 50]], [[40, -50]], [[float("nan"), 50]], [["40", "fifty"]]):
        with pytest.raises(InputError, match=r"image_sizes must be one positive \(height, width\) per image"):
            model.image_token_counts(sizes)
        with pytest.raises(InputError, match=r"image_sizes must be one positive \(height, width\) per image"):
            model.encode_prompt("<image> What is it?", 1, image_sizes=sizes)
    with pytest.raises(InputError, match="needs their sizes"):  # len() of an int was a TypeError
        model.encode_prompt("<image> What is it?", 1, image_sizes=40)


def _hf_greedy(hf_model, ids, images):
    return _hf_greedy_with(hf_model, hf_processor(), ids, images)


def test_greedy_text_matches_transformers(hf_model, model):
    """generate() on prompts with images of different tile counts, alone and as one batch, against
    transformers' greedy ids for the same prompt ids (each row alone); the prompt ids are those
    LlavaNextProcessor makes of the same text."""
    prompts = ["<image>\nWhat is unusual about this image?", "Compare <image> with <image>, briefly."]
    images = [[random_image(*SIZES["wide"], seed=6)], [random_image(*SIZES["tall"], seed=7),
                                                       random_image(*SIZES["small"], seed=8)]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(ck.TOKENIZER_DIR)
    processor = transformers.LlavaNextProcessor(image_processor=hf_processor(), tokenizer=tokenizer, patch_size=14,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1)
    expected = []
    for prompt, ims in zip(prompts, images):
        sizes = [(im.height, im.width) for im in ims]
        ids = model.encode_prompt(prompt, len(ims), image_sizes=sizes)
        one_per_image = [t for i, t in enumerate(ids) if t != IMAGE_ID or ids[i - 1] != IMAGE_ID]
        text = model.tokenizer.decode(one_per_image, skip_special_tokens=False)
        assert ids.count(IMAGE_ID) == sum(model.image_token_counts(sizes))
        hf_ids = processor(images=ims, text=text.removeprefix("<s>"), return_tensors="pt")["input_ids"][0]
        assert hf_ids.tolist() == ids
        expected.append(_hf_greedy(hf_model, ids, ims))
        got = model.generate(prompt, images=ims, max_new_tokens=NEW_TOKENS, stop=[])
        assert got == model.tokenizer.decode(expected[-1])
    got = model.generate(prompts, images=images, max_new_tokens=NEW_TOKENS)
    assert got == [model.tokenizer.decode(e) for e in expected]


# 100x100: a tie the pinpoints' order breaks (the original's (width, height) reading tiles it 2 x 1, llava-hf's
# 1 x 2); 55x176: where the original's truncating unpad keeps 14 rows and transformers' rounding one 16.
ORIGINAL_SIZES = [(100, 100), (55, 176), (300, 1000), (337, 511)]


def test_original_layout_matches_the_original_arrangement(hf_model, tmp_path_factory, monkeypatch):
    """The original layout (LlavaLlamaForCausalLM / LlavaMistralForCausalLM, image_aspect_ratio anyres, the tower
    beside it) against an oracle that arranges tiles as the original does: transformers' model with the pinpoints
    read as the original reads them (each literal pair as (width, height), same order) and the original's
    unpad_image (llava-torch 1.2.2.post1) in place of transformers' rounding one. Logits within 1e-4, then
    greedy text."""
    import transformers.models.llava_next.modeling_llava_next as hf_next
    from original_llava import original_llava

    from llava_fast.image import anyres

    path = ck.write_checkpoint(hf_model, str(tmp_path_factory.mktemp("next-original")), "original")
    model = llava_fast.load(path, device=DEVICE, dtype="float32")
    as_original = [[w, h] for h, w in ck.NEXT_PINPOINTS]  # (height, width) pairs that order the original's way
    assert model.config.image_grid_pinpoints == tuple(map(tuple, as_original))
    assert model.config.layout == "original" and model.image_token_id == ck.VOCAB
    assert anyres.grid_shape(100, 100, model.config.image_grid_pinpoints, 336) == (2, 1)
    original_unpad = original_llava().unpad_image
    monkeypatch.setattr(hf_next, "unpad_image", lambda t, size: original_unpad(t, (int(size[1]), int(size[0]))))
    monkeypatch.setattr(hf_model.config, "image_grid_pinpoints", as_original)
    processor = NextPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                        image_grid_pinpoints=as_original)

    def hf_ids(row):
        return [IMAGE_ID if t == model.image_token_id else t for t in row]

    for i, (h, w) in enumerate(ORIGINAL_SIZES):
        image = random_image(h, w, seed=10 + i)
        tiles, sizes = model.processor(image)
        batch = processor(image, return_tensors="pt")
        torch.testing.assert_close(tiles, batch["pixel_values"][0], atol=0, rtol=0)
        n = model.image_token_counts(sizes.tolist())[0]
        row = [1] + _text(3, i) + [model.image_token_id] * n + _text(4, i + 1)
        ours = model.logits([row], tiles, sizes).cpu()
        with torch.no_grad():
            ref = hf_model(input_ids=torch.tensor([hf_ids(row)]), pixel_values=batch["pixel_values"],
                           image_sizes=batch["image_sizes"]).logits
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)

    image = random_image(*ORIGINAL_SIZES[1], seed=20)
    ids = model.encode_prompt("What is this?", 1, image_sizes=[(image.height, image.width)])
    expected = _hf_greedy_with(hf_model, processor, hf_ids(ids), [image])
    assert model.generate("What is this?", images=image, max_new_tokens=NEW_TOKENS) == model.tokenizer.decode(expected)


def _hf_greedy_with(hf_model, processor, ids, images):
    batch = processor(images, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), pixel_values=batch["pixel_values"],
                                image_sizes=batch["image_sizes"], max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=32001)
    return out[0, len(ids):].tolist()


def test_stream_and_chat_with_several_images_equal_generate(model):
    """Two images of different tile counts in one prompt: stream()'s deltas concatenate to generate()'s text, and
    a chat's turns equal generate() on the whole conversation (the second turn reuses the cached image tokens)."""
    images = [random_image(*SIZES["small"], seed=30), random_image(*SIZES["wide"], seed=31)]
    prompt = "Compare <image> and <image>."
    expected = model.generate(prompt, images=images, max_new_tokens=NEW_TOKENS)
    assert "".join(model.stream(prompt, images, max_new_tokens=NEW_TOKENS)) == expected
    chat = model.chat(images, max_new_tokens=NEW_TOKENS)
    first = chat.ask(prompt)
    assert first == expected
    second = chat.ask("And the colours?")
    messages = [("user", prompt), ("assistant", first), ("user", "And the colours?")]
    assert second == model.generate(messages, images=images, max_new_tokens=NEW_TOKENS)
