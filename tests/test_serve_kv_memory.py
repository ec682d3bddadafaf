"""The server's KV-cache memory (llava_fast/serve/kv_memory.py): resident only where K/V were written, pages given
back on release, and requests admitted under the `--kv-cache-memory` budget, waiting (never failing) while it is
full. Resident sizes are asked of the kernel (mincore over the cache's own pages), not read from our
accounting."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
if not sys.platform.startswith("linux"):
    pytest.skip("resident sizes are asked of the kernel with Linux's mincore()", allow_module_level=True)

from serve_helpers import LiveServer, png_data_url, random_image, user  # noqa: E402

from llava_fast.errors import InputError  # noqa: E402
from llava_fast.generate import positions_needed  # noqa: E402
from llava_fast.presets import preset_config, random_model  # noqa: E402
from llava_fast.serve.app import ServeConfig  # noqa: E402
from llava_fast.serve.kv_memory import KVMemory  # noqa: E402
from llava_fast.serve.scheduler import Scheduler  # noqa: E402


def resident_bytes(tensor) -> int:
    """Bytes of tensor's (page-aligned) memory that are resident, asked of the kernel page by page (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    length = tensor.numel() * tensor.element_size()
    pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    assert tensor.data_ptr() % mmap.PAGESIZE == 0
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def test_a_cache_past_the_address_space_is_refused_naming_the_options():
    """A --max-batch whose rows x positions no address space holds (10^9 rows of 1008 positions of the tiny
    preset's K/V: ~24 PB, where x86-64 maps 128 TiB) is refused naming the options, not as a bare errno."""
    cfg = preset_config("tiny").text
    with pytest.raises(InputError, match=r"1000000000 rows \(--max-batch\) x 1008 positions .*lower --max-batch"):
        KVMemory(cfg, rows=10**9, max_tokens=1000, dtype=torch.float32, budget_bytes=64 << 20)


def test_pages_follow_the_written_positions_and_go_back():
    cfg = preset_config("tiny").text  # 6 layers, 4 KV heads, D 64
    kv = KVMemory(cfg, rows=5, max_tokens=1000, dtype=torch.float32, budget_bytes=64 << 20)
    L, Hkv, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    assert kv.block_tokens == 16 and kv.capacity == 1008  # 4096-byte pages of 16 x 64 float32
    assert kv.cache.k.shape == (L, 5, Hkv, 1008, D)
    assert resident_bytes(kv.cache.k) == 0  # 5 x 1008 positions mapped (31 MiB), none resident
    values = torch.randn(L, Hkv, 103, D)
    kv.cache.k[:, 3, :, :103] = values
    per_block = L * Hkv * 4096  # one page per (layer, head) segment
    assert resident_bytes(kv.cache.k) == 7 * per_block  # 103 positions: 7 blocks of 16
    assert resident_bytes(kv.cache.v) == 0
    kv.reserve(3, 103)
    assert kv.held[3] == 7 and kv.reserved_bytes == 7 * kv.block_bytes
    kv.release(3, keep_tokens=40)
    assert resident_bytes(kv.cache.k) == 3 * per_block
    assert torch.equal(kv.cache.k[:, 3, :, :48], values[:, :, :48])  # kept blocks intact
    assert not kv.cache.k[:, 3, :, 48:].any()  # released ones read as zeros
    assert kv.held[3] == 3
    kv.release(3, 0)
    assert resident_bytes(kv.cache.k) == 0 and kv.held[3] == 0
    # The budget in blocks: 2 rows of 100 positions fit in 14 blocks, a third does not.
    small = KVMemory(cfg, rows=3, max_tokens=200, dtype=torch.float32, budget_bytes=14 * kv.block_bytes + 5)
    small.reserve(0, 100)
    small.reserve(1, 100)
    assert not small.fits(2, 1) and small.fits(1, 90)


def test_an_idle_server_holds_no_cache():
    model = random_model("tiny")
    scheduler = Scheduler(model, max_batch=16, max_model_len=2048)  # dense, this was 400 MiB of float32 zeros
    k = scheduler.decoder.cache.k
    assert k.shape[1] == 16 and k.shape[3] >= 2048
    assert resident_bytes(k) == resident_bytes(scheduler.decoder.cache.v) == 0
    assert "llava_fast_kv_cache_held_bytes 0.0" in scheduler.metrics.render().decode()


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.fixture(scope="module")
def tight(model):
    """A server whose budget holds one image request and one text request at a time, or three text ones."""
    bytes_per_block = 16 * 2 * 6 * 4 * 64 * 4
    config = ServeConfig(model_name="tiny", max_batch=4, max_model_len=1024, kv_cache_memory=28 * bytes_per_block)
    server = LiveServer(model, config).start()
    yield server
    server.stop()


def test_requests_wait_for_memory_and_all_answer_exactly(tight, model):
    kv = tight.scheduler.kv
    assert kv.budget_blocks == 28
    image = png_data_url(random_image(61, 80, 60))
    requests = [([user("Describe the photo. " * (1 + i), image)] if i % 3 == 0 else
                 [user("Tell me about rivers and lakes " * (1 + 2 * i))], 20 + 3 * i) for i in range(7)]
    needs = [kv.blocks(positions_needed(len(model.encode_prompt(
        [("user", ("<image>\n" if i % 3 == 0 else "") + m[0]["content"][-1]["text"] if isinstance(
            m[0]["content"], list) else m[0]["content"])], 1 if i % 3 == 0 else 0)), t))
             for i, (m, t) in enumerate(requests)]
    assert sum(needs) > 2 * kv.budget_blocks and max(needs) <= kv.budget_blocks  # they must take turns
    peak = []
    original = kv.reserve

    def reserve(row, tokens):
        original(row, tokens)
        peak.append(kv.reserved_blocks)

    kv.reserve = reserve
    try:
        def ask(request):
            messages, max_tokens = request
            r = httpx.post(tight.url + "/v1/chat/completions", timeout=300, json={
                "messages": messages, "max_tokens": max_tokens, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(7) as pool:
            got = list(pool.map(ask, requests))
    finally:
        kv.reserve = original
    for (messages, max_tokens), text in zip(requests, got):
        assert text == model.generate(messages, max_new_tokens=max_tokens)
    assert len(peak) == 7 and max(peak) <= kv.budget_blocks
    assert resident_bytes(kv.cache.k) <= kv.budget_blocks * kv.block_bytes // 2 + 4 * 6 * 4 * 4096  # + parked pages
    metrics = {line.split()[0]: float(line.split()[1]) for line in
               httpx.get(tight.url + "/metrics", timeout=30).text.splitlines() if line.startswith("llava_fast_kv")}
    assert metrics["llava_fast_kv_cache_budget_bytes"] == kv.budget_bytes
    assert metrics["llava_fast_kv_cache_live_tokens"] == 0
    assert 0 < metrics["llava_fast_kv_cache_held_bytes"] <= kv.budget_bytes  # the free rows' cached prefixes


def test_a_request_larger_than_the_whole_budget_is_a_400(tight, model):
    r = httpx.post(tight.url + "/v1/chat/completions", timeout=60, json={
        "messages": [user("Hello " * 200)], "max_tokens": 300, "temperature": 0})
    assert r.status_code == 400 and "kv-cache-memory" in r.json()["error"]["message"]


@pytest.mark.parametrize("value", ["lots", "0", "-1GiB", "2XB"])
def test_bad_kv_cache_memory_is_one_line_exit_2(value):
    done = subprocess.run([sys.executable, "-m", "llava_fast.cli", "serve", f"--kv-cache-memory={value}", "--port",
                           "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--kv-cache-memory" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
