"""`llava-fast bench serve`'s resident-memory columns: the sampler sums a server's processes (the one listening
on the port and its children), and llava-fast's peak is split into weights + the live tokens' K/V + overhead.
Also the `--images new` workload (a new image in every request)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from llava_fast.bench import cli, schema, serve_bench

pytestmark = pytest.mark.slow
psutil = pytest.importorskip("psutil")

CHILD_MIB = 150


def test_a_local_server_is_its_listening_process_plus_children():
    """A server process that starts a child holding 150 MiB, then listens: both are found from the URL, and the
    sampled resident size counts the child's 150 MiB."""
    script = textwrap.dedent(f"""
        import socket, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import time; b = bytearray({CHILD_MIB} << 20); b[::4096] = b'x' * len(b[::4096]); print('ok', "
            "flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
        child.stdout.readline()
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
        print(s.getsockname()[1], child.pid, flush=True)
        time.sleep(600)
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        port, child_pid = map(int, server.stdout.readline().split())
        processes = serve_bench.listening_processes(f"http://127.0.0.1:{port}/v1")
        assert processes is not None
        assert {p.pid for p in processes()} == {server.pid, child_pid}
        sampler = serve_bench.MemorySampler(processes)
        sampler.idle()
        with sampler:
            time.sleep(0.3)
        got = sampler.result()
        child_rss = psutil.Process(child_pid).memory_info().rss
        assert child_rss >= CHILD_MIB << 20
        assert got["idle"] >= child_rss and got["peak"] >= got["idle"] - (16 << 20) and got["samples"] >= 2
        assert got["kv_live_at_peak"] is None  # no /metrics to read
        assert serve_bench.listening_processes("http://example.com:80") is None  # not this machine
    finally:
        for p in psutil.Process(server.pid).children(recursive=True) + [psutil.Process(server.pid)]:
            p.kill()
        server.wait()


def test_the_peaks_live_kv_is_the_most_live_up_to_the_peak_sample():
    """Resident memory stays at its peak once the rows end (their K/V pages stay touched), so the peak sample
    is often the last, with no live token: its K/V share is the most that was live up to it."""
    sampler = serve_bench.MemorySampler(lambda: [])
    sampler.samples = [(100, 0), (180, 40), (260, 90), (300, 30), (300, 0), (290, 0)]
    got = sampler.result()
    assert (got["peak"], got["kv_live_at_peak"], got["kv_live_max"]) == (300, 90, 90)
    sampler.samples = [(100, 70), (300, 10), (310, 0)]  # the most live after the peak does not count
    sampler.samples.append((200, 120))
    assert sampler.result()["kv_live_at_peak"] == 70
    sampler.samples = [(100, None), (120, None)]
    assert sampler.result()["kv_live_at_peak"] is None


def _get(doc, name, **labels):
    hits = [f["value"] for f in doc["figures"] if f["name"] == name
            and all(f["labels"].get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_memory_columns_are_present_and_add_up(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="the server extra is not installed")
    from llava_fast.presets import random_model

    out = tmp_path / "serve.json"
    assert cli.main(["serve", "--requests", "4", "--clients", "1,3", "--images", "new", "--max-tokens", "12",
                     "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["settings"]["kinds"] == {"new": 4, "repeated": 0, "none": 0}
    net = random_model("tiny").net  # the preset's shapes, counted apart from the benchmark's helper
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    t = net.cfg.text
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 4  # float32
    longest = doc["settings"]["max_model_len"]
    for clients in (1, 3):
        labels = dict(engine="llava-fast/serve", clients=clients)
        idle, peak = _get(doc, "serve_rss_idle", **labels), _get(doc, "serve_rss_peak", **labels)
        kv, overhead = _get(doc, "serve_kv_live_at_peak", **labels), _get(doc, "serve_rss_overhead", **labels)
        assert _get(doc, "serve_weights", **labels) == weights
        assert weights < idle < 8 << 30 and peak >= weights
        assert 0 <= kv <= clients * longest * per_token and kv % per_token == 0
        assert peak == pytest.approx(weights + kv + overhead)
        assert _get(doc, "serve_rss_idle_overhead", **labels) == pytest.approx(idle - weights)
    printed = capsys.readouterr().out
    assert "RSS peak MiB" in printed and "| clients | peak RSS | weights | live K/V | overhead |" in printed


def test_the_new_image_workload():
    requests = serve_bench.workload(12, 5, "new")
    urls = [m[0]["content"][0]["image_url"]["url"] for m, _, _ in requests]
    assert [kind for _, _, kind in requests] == ["new"] * 12 and len(set(urls)) == 12
    mixed = serve_bench.workload(40, 5)
    assert {kind for _, _, kind in mixed} == {"new", "repeated", "none"}
    none = serve_bench.workload(40, 5, "none")
    assert {k for _, _, k in none} == {"none"} and all(isinstance(m[0]["content"], str) for m, _, _ in none)
    with pytest.raises(Exception, match="images: expected one of"):
        serve_bench.workload(3, 0, "some")
    # --max-tokens N: replies of 16..N tokens, or 1..N below 16; the prompts and images are the same workload.
    default, short, tiny = (serve_bench.workload(40, 5, "mixed", n) for n in (96, 24, 3))
    assert {t for _, t, _ in default} <= set(range(16, 97)) and max(t for _, t, _ in default) > 24
    assert {t for _, t, _ in short} <= set(range(16, 25)) and {t for _, t, _ in tiny} <= {1, 2, 3}
    assert [m for m, _, _ in short] == [m for m, _, _ in default] == [m for m, _, _ in tiny]
    with pytest.raises(Exception, match="--text-only sends no images"):
        cli.main(["serve", "--text-only", "--images", "new"])
