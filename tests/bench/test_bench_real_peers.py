"""`bench real`'s peers in child processes and its 7B-shape weights: a peer that segfaults is reported with
its signal and the parent goes on; the shape GGUF holds one set of weights, exact in bfloat16 and float16,
that llava-fast and transformers read alike."""

import os
import textwrap

import pytest
import torch

from llava_fast.bench import shape_model
from llava_fast.bench.peer_process import ChildEngine, PeerCrashed, PeerFailed

# Peers for the test, in a module of their own (the child imports it, not this file and its torch).
ECHO_PEERS = textwrap.dedent("""
    import os, signal

    def echo_engine(crash_when):
        # Echoes the prompt reversed; dies of SIGSEGV while loading or on a prompt starting with 0.
        if crash_when == "load":
            os.kill(os.getpid(), signal.SIGSEGV)

        def run(ids):
            if ids[0] == 0:
                os.kill(os.getpid(), signal.SIGSEGV)
            if ids[0] == 1:
                os._exit(3)
            print("a library printing on stdout")
            return 0.25, 0.5, list(reversed(ids))
        return run, 1234

    def raising_engine():
        raise FileNotFoundError("no such model: x.gguf")
""")


def test_a_peer_that_segfaults_is_reported_and_the_parent_goes_on(tmp_path):
    (tmp_path / "echo_peers.py").write_text(ECHO_PEERS)
    where = str(tmp_path)
    peer = ChildEngine("echo_peers:echo_engine", ["run"], threads=1, import_path=where)
    assert peer.weight_bytes == 1234
    assert peer([5, 6, 7]) == (0.25, 0.5, [7, 6, 5])
    with pytest.raises(PeerCrashed, match=r"^crashed \(signal 11\)$"):
        peer([0, 1])
    peer.close()
    other = ChildEngine("echo_peers:echo_engine", ["run"], threads=1, import_path=where)
    with pytest.raises(PeerCrashed, match="^exited with status 3$"):
        other([1])
    other.close()
    with pytest.raises(PeerCrashed, match=r"^crashed \(signal 11\)$"):
        ChildEngine("echo_peers:echo_engine", ["load"], threads=1, import_path=where)
    with pytest.raises(PeerFailed, match="FileNotFoundError: no such model: x.gguf"):
        ChildEngine("echo_peers:raising_engine", [], threads=1, import_path=where)
    with pytest.raises(PeerFailed, match="ModuleNotFoundError"):
        ChildEngine("no_such_module:engine", [], threads=1)


def test_shape_weights_are_exact_in_bfloat16_and_float16():
    g = torch.Generator().manual_seed(1)
    w = torch.from_numpy(shape_model.random_weight(g, 257, 300)).float()
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(w.to(torch.bfloat16).float(), w)  # the F16 file's values survive a bfloat16 load
    assert 0 < (w == 0).float().mean().item() < 0.002  # only the values float16 cannot hold are zeroed


@pytest.fixture
def small_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_FAST_CACHE", str(tmp_path))
    monkeypatch.setitem(shape_model.SHAPES, "small", dict(hidden=64, ffn=96, heads=4, kv_heads=4, layers=3,
                                                          vocab=32000, eps=1e-5, context=256))
    return "small"


def test_llava_fast_and_transformers_read_the_same_shape_weights(small_shape):
    import llava_fast

    transformers = pytest.importorskip("transformers")
    from llava_fast.bench.real_bench import _transformers_from_gguf

    path = shape_model.gguf(small_shape, 2, "F16")
    assert shape_model.gguf(small_shape, 2, "F16") == path  # cached
    model = llava_fast.load(path, device="cpu", dtype="float32")
    lm = _transformers_from_gguf(transformers, path, torch.float32)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204]])
    with torch.inference_mode():
        ours = model.logits(ids)[0]
        theirs = lm(ids).logits[0]
    assert ours.shape == (8, 32000)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    with pytest.raises(llava_fast.errors.InputError, match="small has 3 decoder layers; asked for 4"):
        shape_model.gguf(small_shape, 4, "F16")
    with pytest.raises(llava_fast.errors.InputError, match="unknown shape 'big'"):
        shape_model.gguf("big", 2, "F16")


def test_the_cpu_last_level_cache_is_read_from_sysfs():
    """sysfs lists a file ("uevent") beside index0..N on some kernels; it made the size None, and with it every
    share of the read roofline."""
    from llava_fast.bench.device import last_level_cache_bytes

    root = "/sys/devices/system/cpu/cpu0/cache"
    if not os.path.isdir(os.path.join(root, "index0")):
        pytest.skip("no sysfs cache description on this system")
    sizes = []
    for entry in sorted(e for e in os.listdir(root) if e.startswith("index")):
        with open(os.path.join(root, entry, "level")) as f:
            level = int(f.read())
        with open(os.path.join(root, entry, "size")) as f:
            sizes.append((level, f.read().strip()))
    level, text = max(sizes)
    assert last_level_cache_bytes(torch.device("cpu")) == int(text[:-1]) * {"K": 1024, "M": 1 << 20}[text[-1]]
