"""Fixtures of the trainer tests: a tiny llava-hf checkpoint written by transformers (tests/checkpoints.py),
small images."""

import os
import sys

import numpy as np
import PIL.Image
import pytest

# tests/checkpoints.py (tiny transformers-built checkpoints) lives one directory up.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import checkpoints as ck  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf():
    return ck.make_hf_model(seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_hf, tmp_path_factory):
    return ck.write_checkpoint(tiny_hf, str(tmp_path_factory.mktemp("tiny-hub")), "hub")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Four small photos-like images (random colour fields of different sizes) and one corrupt file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (28, 28), (33, 50), (64, 20)]):
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return str(folder)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread mostly
    waits at barriers (a training step runs 2-3x faster with one thread under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
