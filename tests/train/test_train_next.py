"""Training a LLaVA-NeXT (AnyRes) checkpoint against transformers' LlavaNextForConditionalGeneration: the loss
and gradients of a batch with several images per record, the loss train() logs for its first step, and what a
full run and a merged LoRA run write (loaded by transformers and by llava-fast: equal logits).

The tiny checkpoint has 28-px tiles (2 x 2 patches) and LLaVA-1.6's pinpoints scaled to them, so the small test
images get 3- to 5-tile grids and every AnyRes step (grid choice, unpadding, newlines) runs in milliseconds.
"""

import glob
import os

import checkpoints as ck
import PIL.Image
import pytest
import torch
import transformers
from safetensors.torch import load_file
from trainutil import write_data

import llava_fast
from llava_fast.cli import main as cli_main
from llava_fast.prompts.templates import get_template
from llava_fast.train import TrainArgs, train
from llava_fast.train import checkpoint as ckpt
from llava_fast.train.data import IGNORE_INDEX, Collate, EncodingSpec, LlavaDataset, check_records
from llava_fast.train.trainer import ImageFeatureCache, TrainingLoss, _image_token_count, trainable_parameters

TILE = 28
PINPOINTS = [[p * TILE // 336 for p in pair] for pair in ck.NEXT_PINPOINTS]  # (height, width), 28-px multiples
IMAGE_ID = 32000
NextPil = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor


@pytest.fixture(scope="module")
def next_hf():
    return ck.make_hf_next_model(seed=3, image_size=TILE, pinpoints=PINPOINTS)


@pytest.fixture(scope="module")
def next_ckpt(next_hf, tmp_path_factory):
    return ck.write_checkpoint(next_hf, str(tmp_path_factory.mktemp("tiny-next")), "hub")


@pytest.fixture(scope="module")
def mistral_next(tmp_path_factory):
    """(transformers model, checkpoint) of a Mistral-backbone NeXT (LLaVA-1.6-Mistral's mistral_instruct)."""
    hf = ck.make_hf_next_model(seed=4, image_size=TILE, pinpoints=PINPOINTS, text_model="mistral")
    return hf, ck.write_checkpoint(hf, str(tmp_path_factory.mktemp("tiny-next-mistral")), "hub")


def records():
    """Four records: one image, two images in one turn, an image in the second turn, one image; the test
    images (conftest) are 40x30, 28x28, 33x50 and 64x20 (w x h): 3- to 4-tile grids of different shapes."""
    def conv(*turns):
        return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    return [
        {"id": "a", "image": "img0.png", "conversations": conv("<image>\nWhat is this?", "A red bus.")},
        {"id": "b", "image": ["img2.png", "img3.png"],
         "conversations": conv("Compare <image> with <image>.", "The first is taller than the second one.")},
        {"id": "c", "image": "img1.png",
         "conversations": conv("Hello.", "Hi there.", "<image>\nAnd this one?", "A green tree by a river.")},
        {"id": "d", "image": "img3.png", "conversations": conv("<image>\nDescribe it.", "Wide and short.")},
    ]


def hf_pixels(image_folder, batch):
    """transformers' own preprocessing of the batch's images, in row order: (N, max tiles, 3, S, S), (N, 2)."""
    paths = [os.path.join(image_folder, f"img{i}.png") for i in range(4)]
    by_size = {}
    for p in paths:
        with PIL.Image.open(p) as im:
            by_size.setdefault((im.height, im.width), []).append(p)
    images = [PIL.Image.open(by_size[tuple(s)][0]).convert("RGB") for s in batch.image_sizes.tolist()]
    processor = NextPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                        image_grid_pinpoints=PINPOINTS)
    out = processor(images, return_tensors="pt")
    assert out["image_sizes"].tolist() == batch.image_sizes.tolist()
    return out["pixel_values"], out["image_sizes"]


def next_spec(base, image_folder):
    """The trainer's encoding of the base's records; the template is its default for the checkpoint: llava_v1
    (Vicuna), mistral_instruct (Mistral)."""
    cfg = base.net.cfg
    return EncodingSpec(base.tokenizer, get_template(cfg.template), cfg.image_token_id, cfg.num_image_tokens, 512,
                        image_folder, image_token_count=_image_token_count(cfg))


def one_batch(next_ckpt, image_folder):
    base = ckpt.load_base(next_ckpt)
    spec = next_spec(base, image_folder)
    recs = records()
    examples, skipped = check_records(recs, spec)
    assert not skipped and len(examples) == 4
    dataset = LlavaDataset(recs, examples, spec, base.processor)
    return base, Collate(base.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


def test_unreadable_and_missing_images_are_counted_when_records_are_checked(next_ckpt, image_folder):
    """A NeXT record's positions depend on its images' sizes, so their headers are read when the records are
    checked: a corrupt or missing file skips the record there, with its reason."""
    spec = next_spec(ckpt.load_base(next_ckpt), image_folder)
    bad = [dict(records()[0], image="corrupt.jpg"), dict(records()[0], image="absent.png"), records()[3]]
    examples, skipped = check_records(bad, spec)
    assert [e.index for e in examples] == [2]
    assert skipped == {"unreadable image": 1, "missing image file": 1}


def hf_name(name):  # ours -> transformers' in-memory names
    if name.startswith(("language_model.", "multi_modal_projector.")) or name == "image_newline":
        return "model." + name
    return name


@pytest.mark.parametrize("cached", [False, True], ids=["pixels", "cached-features"])
def test_loss_and_gradients_match_transformers(next_hf, next_ckpt, image_folder, cached):
    base, batch = one_batch(next_ckpt, image_folder)
    net = base.net
    trainable_parameters(net, stage=2, lora=False)
    net.train()
    assert batch.image_sizes.shape == (5, 2) and batch.pixel_values.shape[0] > 5  # several tiles per image
    # Image positions carry no label, and each image fills the count its size gives.
    image = batch.input_ids == IMAGE_ID
    assert (batch.labels[image] == IGNORE_INDEX).all() and (batch.labels[~image] != IGNORE_INDEX).any()

    pixels, features = batch.pixel_values, None
    if cached:  # the cache's features of whole images stand in for the pixels
        features, pixels = ImageFeatureCache(net).features(batch.pixel_values, batch.image_keys,
                                                           batch.image_sizes), None
    loss = TrainingLoss(net)(batch.input_ids, batch.labels, pixels, 1.0, features, batch.image_sizes)
    loss.backward()

    hf_pixel_values, hf_sizes = hf_pixels(image_folder, batch)
    mask = torch.arange(batch.input_ids.shape[1])[None] < torch.tensor(batch.lengths)[:, None]
    next_hf.zero_grad(set_to_none=True)
    ref = next_hf(input_ids=batch.input_ids, pixel_values=hf_pixel_values, image_sizes=hf_sizes,
                  attention_mask=mask.long(), labels=batch.labels).loss
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    hf_params = dict(next_hf.named_parameters())
    checked = set()
    for name, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and name.startswith("vision_tower."), name
            continue
        want = hf_params[hf_name(name)].grad
        assert want.norm() > 0, name
        assert (p.grad - want).norm() <= 1e-5 * want.norm(), name
        checked.add(name)
    assert "image_newline" in checked
    assert len(checked) == len([n for n in hf_params if not n.startswith("model.vision_tower.")])
    next_hf.zero_grad(set_to_none=True)


def test_feature_cache_keys_whole_images(next_ckpt, image_folder):
    base, batch = one_batch(next_ckpt, image_folder)
    cache = ImageFeatureCache(base.net)
    calls = []
    tower = base.net.image_features
    base.net.image_features = lambda pixels: calls.append(pixels.shape[0]) or tower(pixels)
    first = cache.features(batch.pixel_values, batch.image_keys, batch.image_sizes)
    assert calls == [batch.pixel_values.shape[0]]  # every tile of every image, in one tower batch
    assert set(cache.store) == set(batch.image_keys) and len(cache.store) == 5
    tiles = [cache.store[k].shape[0] for k in batch.image_keys]
    assert sum(tiles) == batch.pixel_values.shape[0] and min(tiles) >= 3
    again = cache.features(batch.pixel_values, batch.image_keys, batch.image_sizes)
    assert calls == [batch.pixel_values.shape[0]]  # a repeat skips the tower
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(first, tower(batch.pixel_values), atol=1e-6, rtol=0)


def run(next_ckpt, image_folder, tmp_path, name, **kw):
    settings = dict(stage=2, model=next_ckpt, data=write_data(tmp_path / "data.json", records()),
                    image_folder=image_folder, output=str(tmp_path / name), batch_size=4, max_steps=2, lr=1e-2,
                    gradient_checkpointing=False, log_every=1000)
    return train(TrainArgs(**{**settings, **kw}))


@pytest.mark.parametrize("backbone", ["vicuna", "mistral"])
def test_first_step_loss_equals_transformers(next_hf, next_ckpt, mistral_next, image_folder, tmp_path, backbone):
    """train()'s logged loss of step 1 (before any update) is transformers' loss on the same batch; with the
    feature cache over two epochs the run is the same run."""
    if backbone == "mistral":
        next_hf, next_ckpt = mistral_next
    base, batch = one_batch(next_ckpt, image_folder)
    assert base.cfg.template == {"vicuna": "llava_v1", "mistral": "mistral_instruct"}[backbone]
    hf_pixel_values, hf_sizes = hf_pixels(image_folder, batch)
    with torch.no_grad():
        ref = next_hf(input_ids=batch.input_ids, pixel_values=hf_pixel_values, image_sizes=hf_sizes,
                      labels=batch.labels).loss.item()
    plain = run(next_ckpt, image_folder, tmp_path, "plain")
    cached = run(next_ckpt, image_folder, tmp_path, "cached", cache_image_features=True)
    assert abs(plain.losses[0][1] - ref) <= 1e-5 * ref
    assert len(plain.losses) == len(cached.losses) == 2 and plain.losses[1][1] < plain.losses[0][1]
    for (_, a), (_, b) in zip(plain.losses, cached.losses):
        assert abs(a - b) <= 1e-5 * a


def tensors(directory):
    out = {}
    for f in glob.glob(os.path.join(directory, "model*.safetensors")):
        out.update(load_file(f))
    return out


def assert_loads_with_equal_logits(out, image_folder):
    """transformers and llava-fast load `out` and give equal logits on a two-image prompt."""
    ours = llava_fast.load(out, device="cpu", dtype="float32")
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    images = [PIL.Image.open(os.path.join(image_folder, n)).convert("RGB") for n in ("img2.png", "img0.png")]
    processor = NextPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                        image_grid_pinpoints=PINPOINTS)
    batch = processor(images, return_tensors="pt")
    counts = ours.image_token_counts(batch["image_sizes"].tolist())
    g = torch.Generator().manual_seed(1)
    row = [1] + torch.randint(3, 32000, (4,), generator=g).tolist()
    for n in counts:
        row += [IMAGE_ID] * n + torch.randint(3, 32000, (3,), generator=g).tolist()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([row]), pixel_values=batch["pixel_values"],
                 image_sizes=batch["image_sizes"]).logits
    torch.testing.assert_close(ours.logits([row], batch["pixel_values"], batch["image_sizes"]), ref, atol=1e-4,
                               rtol=0)
    return ours


def test_full_and_merged_lora_checkpoints_load_in_transformers_and_llava_fast(next_ckpt, image_folder, tmp_path):
    result = run(next_ckpt, image_folder, tmp_path, "full")
    before, after = tensors(next_ckpt), tensors(str(tmp_path / "full"))
    assert set(before) == set(after) and "image_newline" in after
    for k in before:  # the tower is copied; the LLM, projector and image_newline trained
        assert torch.equal(before[k], after[k]) == k.startswith("vision_tower."), k
    ours = assert_loads_with_equal_logits(str(tmp_path / "full"), image_folder)
    loaded = ours.net.state_dict()
    trained = result.net.state_dict()  # split names, as written, where training fused the tower's q/k/v
    assert set(loaded) == set(trained)
    for name, p in trained.items():  # the file holds exactly what training produced
        assert torch.equal(loaded[name], p), name

    run(next_ckpt, image_folder, tmp_path, "lora", lora_r=2, lora_alpha=4.0, lr=5e-2)
    merged = str(tmp_path / "merged")
    assert cli_main(["merge-lora", "--adapter", str(tmp_path / "lora"), "--output", merged]) == 0
    after = tensors(merged)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".self_attn." in k for k in changed) and any(k.startswith("multi_modal_projector.") for k in changed)
    assert not any(k.startswith("vision_tower.") or k == "image_newline" for k in changed)  # LoRA leaves it
    assert_loads_with_equal_logits(merged, image_folder)


def original_tensors(directory):
    out = {}
    for f in glob.glob(os.path.join(directory, "pytorch_model*.bin")):
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out or tensors(directory)


def test_original_layout_next_trains_and_is_written_back_in_its_own_layout(next_hf, image_folder, tmp_path):
    """Its llava-hf form would unpad by rounding where the original truncates (another model on some image
    sizes), so the run writes the original layout back: the input's names, config and tokenizer, the CLIP tower
    left where the config points. llava-fast loads it with the trained model's logits, on an image size (294x49)
    where the two unpaddings differ with these 28-px tiles; a merged LoRA run is written the same way."""
    from llava_fast.api import LlavaModel
    from llava_fast.image import anyres

    source = ck.write_checkpoint(next_hf, str(tmp_path / "original"), "original")
    result = run(source, image_folder, tmp_path, "full")
    out = str(tmp_path / "full")
    assert ckpt.read_json(os.path.join(out, "config.json")) == ckpt.read_json(os.path.join(source, "config.json"))
    before, after = original_tensors(source), tensors(out)
    assert set(before) == set(after) and "model.image_newline" in after and "model.mm_projector.0.weight" in after
    assert not os.path.exists(os.path.join(out, "preprocessor_config.json"))
    for k in ("model.image_newline", "model.mm_projector.2.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(before[k], after[k]), k
    ours = llava_fast.load(out, device="cpu", dtype="float32")
    loaded = ours.net.state_dict()
    trained = result.net.state_dict()  # split names, as written, where training fused the tower's q/k/v
    assert set(loaded) == set(trained)
    for name, p in trained.items():  # the file holds exactly what training produced
        assert torch.equal(loaded[name], p), name

    grid = anyres.grid_shape(49, 294, ours.config.image_grid_pinpoints, TILE)
    windows = [anyres.unpadded_window(49, 294, grid[0] * 2, grid[1] * 2, exact=e) for e in (True, False)]
    assert windows[0] != windows[1] and not ours.config.exact_unpad
    images = [PIL.Image.fromarray(torch.randint(0, 256, (49, 294, 3), dtype=torch.uint8).numpy()),
              PIL.Image.open(os.path.join(image_folder, "img2.png")).convert("RGB")]
    pixel_values, sizes = ours.processor(images)
    row = [1, 5, 6]
    for n in ours.image_token_counts(sizes.tolist()):
        row += [ours.image_token_id] * n + [7, 8]
    trained = LlavaModel(result.net.eval(), ours.tokenizer, ours.processor)
    # equal weights (above); the loaded model may sum in another order (its CPU kernels), hence float32's noise
    torch.testing.assert_close(ours.logits([row], pixel_values, sizes), trained.logits([row], pixel_values, sizes),
                               atol=1e-5, rtol=0)

    run(source, image_folder, tmp_path, "lora", lora_r=2, lora_alpha=4.0, lr=5e-2)
    merged = str(tmp_path / "merged")
    assert cli_main(["merge-lora", "--adapter", str(tmp_path / "lora"), "--output", merged]) == 0
    assert ckpt.read_json(os.path.join(merged, "config.json")) == ckpt.read_json(os.path.join(source, "config.json"))
    after = tensors(merged)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".self_attn." in k for k in changed) and any(k.startswith("model.mm_projector.") for k in changed)
    assert "model.image_newline" not in changed  # LoRA leaves it
    assert llava_fast.load(merged, device="cpu", dtype="float32").config.anyres
