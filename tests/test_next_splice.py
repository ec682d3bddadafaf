"""LLaVA-NeXT's image splice (model.splice_anyres_images: anyres.feature_order's gather) and the torch backend's
patch embedding (a reshape and one GEMM) against independent references: the grid arranged, unpadded, given its
newlines and concatenated as transformers' pack_image_features does, then masked_scatter into the token
embeddings; CLIP's convolution.

A tiny NeXT (28-px tiles of 2 x 2 patches, LLaVA-1.6's pinpoints scaled to them) so odd image sizes give 1 x 2 to
3 x 1 grids with unpadded windows cut along rows and along columns, in milliseconds.
"""

import pytest
import torch
import torch.nn.functional as F

from llava_fast import ops
from llava_fast.checkpoints.config import LlavaConfig, TextConfig, VisionConfig
from llava_fast.image import anyres
from llava_fast.model import LlavaForCausalLM
from llava_fast.presets import random_init_

TILE, PATCH = 28, 14
PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))
IMAGE_ID = 500
# (height, width) on 2 x 2 grids cut in rows and in columns, a 1 x 3 grid, 49 x 294 (also 1 x 3) whose window is
# all 2 rows when rounding and none when truncating (the original's unpad), a 3 x 1 grid and a small image.
SIZES = [(30, 45), (45, 30), (55, 176), (49, 294), (300, 97), (13, 20)]


def tiny_next(layout="llava_hf"):
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=24, intermediate_size=40, num_layers=2, num_heads=2,
                                          image_size=TILE, patch_size=PATCH),
                      text=TextConfig(vocab_size=IMAGE_ID + 1, hidden_size=40, intermediate_size=56, num_layers=1,
                                      num_heads=4, num_kv_heads=2, max_position_embeddings=512),
                      vision_feature_layer=-1, image_token_id=IMAGE_ID, image_grid_pinpoints=PINPOINTS,
                      layout=layout)
    net = LlavaForCausalLM(cfg)
    random_init_(net, seed=3)
    return net.float().eval()


def counts(net, sizes):
    return [anyres.num_image_tokens(h, w, PINPOINTS, TILE, TILE // PATCH, (TILE // PATCH) ** 2,
                                    net.cfg.exact_unpad) for h, w in sizes]


def tiles(sizes, seed=0):
    n = sum(anyres.num_tiles(h, w, PINPOINTS, TILE) for h, w in sizes)
    return torch.randn(n, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))


def prompt_ids(rows):
    """rows: per batch row, a list of image token counts -> (B, T) ids with 3 to 5 random text ids around each
    image's run, rows right-padded with id 0."""
    g = torch.Generator().manual_seed(11)
    built = []
    for runs in rows:
        ids = torch.randint(1, IMAGE_ID, (3,), generator=g).tolist()
        for n in runs:
            ids += [IMAGE_ID] * n + torch.randint(1, IMAGE_ID, (5,), generator=g).tolist()
        built.append(ids)
    T = max(map(len, built))
    return torch.tensor([ids + [0] * (T - len(ids)) for ids in built])


def reference_embed(net, ids, pixel_values, image_sizes):
    """The splice as transformers' LlavaNext packs and scatters it, written out step by step."""
    cfg, P = net.cfg, TILE // PATCH
    features = ops.project_image_features(net.image_features(pixel_values), *net.multi_modal_projector.weights())
    out, first = [], 0
    for h, w in image_sizes.tolist():
        k = anyres.num_tiles(h, w, PINPOINTS, TILE)
        t, first = features[first:first + k], first + k
        rows, cols = anyres.grid_shape(h, w, PINPOINTS, TILE)
        C = t.shape[-1]
        grid = t[1:].view(rows, cols, P, P, C).permute(4, 0, 2, 1, 3).reshape(C, rows * P, cols * P)
        top, bottom, left, right = anyres.unpadded_window(h, w, rows * P, cols * P, exact=cfg.exact_unpad)
        grid = grid[:, top:bottom, left:right]  # (C, H', W')
        newline = net.image_newline[:, None, None].expand(C, grid.shape[1], 1)
        grid = torch.cat([grid, newline], dim=2).flatten(1).transpose(0, 1)  # (H' * (W' + 1), C)
        out.append(torch.cat([t[0], grid]))
    x = F.embedding(ids.masked_fill(ids == IMAGE_ID, 0), net.language_model.embed_tokens.weight)
    return x.masked_scatter((ids == IMAGE_ID).unsqueeze(-1), torch.cat(out))


@pytest.mark.parametrize("layout", ["llava_hf", "original"])  # rounding vs truncating unpad
def test_splice_equals_pack_and_masked_scatter(layout):
    net = tiny_next(layout)
    sizes = torch.tensor(SIZES)
    n = counts(net, SIZES)
    ids = prompt_ids([[n[0], n[1]], [n[2], n[3]], [n[4], n[5]]])  # two images a row, in image order
    pixels = tiles(SIZES)
    with torch.no_grad():
        got = net.embed(ids, pixels, image_sizes=sizes)
        want = reference_embed(net, ids, pixels, sizes)
    assert got.shape == (3, ids.shape[1], 40)
    assert torch.equal(got, want)  # float32: the same values moved, bit for bit
    # every image position got an image row (no leftover token-0 embedding rows)
    zero_row = net.language_model.embed_tokens.weight[0]
    assert not (got[ids == IMAGE_ID] == zero_row).all(-1).any()


def test_splice_gradients_equal_reference():
    net = tiny_next()
    net.train()
    sizes = torch.tensor(SIZES[:2])
    n = counts(net, SIZES[:2])
    ids = prompt_ids([[n[0]], [n[1]]])
    pixels = tiles(SIZES[:2], seed=1)
    upstream = torch.randn(*ids.shape, 40, generator=torch.Generator().manual_seed(5))
    params = [net.image_newline, net.multi_modal_projector.linear_1.weight, net.multi_modal_projector.linear_2.bias,
              net.language_model.embed_tokens.weight]
    grads = []
    for f in (lambda: net.embed(ids, pixels, image_sizes=sizes), lambda: reference_embed(net, ids, pixels, sizes)):
        out = f()
        grads.append(torch.autograd.grad((out * upstream).sum(), params))
    for got, want in zip(*grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_splice_refuses_mismatched_image_positions():
    net = tiny_next()
    sizes = torch.tensor(SIZES[:1])
    n = counts(net, SIZES[:1])[0]
    pixels = tiles(SIZES[:1])
    with torch.no_grad(), pytest.raises(ValueError, match=f"{n - 1} image positions where the images' sizes need {n}"):
        net.embed(prompt_ids([[n - 1]]), pixels, image_sizes=sizes)
    ids = prompt_ids([[n // 2, n - n // 2]])  # the right count, split by text
    with torch.no_grad(), pytest.raises(ValueError, match="not consecutive"):
        net.embed(ids, pixels, image_sizes=sizes)


def test_feature_order_rows():
    """30 x 45 on a 2 x 2 grid of 2 x 2 patches: the unpadded window keeps grid rows 1 and 2 of 0..3."""
    index, rows, cols = anyres.feature_order(30, 45, PINPOINTS, TILE, 2)
    assert (rows, cols) == (2, 4)
    # base tile rows 0..3; grid row 1 = patch row 1 of tiles 1 and 2 (feature rows 6, 7 and 10, 11), grid row 2 =
    # patch row 0 of tiles 3 and 4 (12, 13 and 16, 17); each grid row ends in a newline slot (0)
    assert index.tolist() == [0, 1, 2, 3, 6, 7, 10, 11, 0, 12, 13, 16, 17, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embed_gemm_equals_conv(dtype):
    g = torch.Generator().manual_seed(2)
    C, P, S = 37, 7, 30  # 4 x 4 patches; conv2d drops the last 2 pixels of each side
    args = (torch.randn(3, 3, S, S, generator=g), torch.randn(C, 3, P, P, generator=g).to(dtype),
            torch.randn(C, generator=g).to(dtype), torch.randn(17, C, generator=g).to(dtype),
            torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype), 1e-5)
    with torch.no_grad():
        got = ops._patch_embed_gemm(*args)
        want = ops.patch_embed_reference(*args)
        served = ops.TORCH_OPS["patch_embed"](*args)
    assert got.shape == (3, 17, C) and got.dtype == dtype
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1])
    # float32 towers run conv2d itself (transformers' op: float32 parity holds to 1e-4 on a LLaVA's logits)
    assert torch.equal(served, want if dtype == torch.float32 else got)
