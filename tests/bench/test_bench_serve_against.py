"""`llava-fast bench serve --against URL`: a second llava-fast server, started here on 127.0.0.1, is the "other"
OpenAI-compatible server; the same seeded workload goes to both, one engine at a time, with ignore_eos, so both
produce exactly the workload's max_tokens. A server that fails requests is a row that says so."""

import json

import pytest

from llava_fast.bench import cli, schema, serve_bench

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi", reason="the server extra is not installed")


@pytest.fixture(scope="module")
def other():
    from serve_helpers import LiveServer

    from llava_fast.presets import random_model
    from llava_fast.serve.app import ServeConfig

    server = LiveServer(random_model("tiny"), ServeConfig(model_name="the-other", max_batch=4)).start()
    yield server
    server.stop()


def test_against_another_server_one_table(tmp_path, capsys, other):
    out = tmp_path / "against.json"
    assert cli.main(["serve", "--requests", "4", "--clients", "1,3", "--max-tokens", "12", "--against",
                     other.url + "/v1/", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["kind"] == "serve"
    assert doc["settings"]["against_model"] == "the-other"  # read from its /v1/models
    expected_tokens = sum(max_tokens for _, max_tokens, _ in serve_bench.workload(4, 0, max_tokens=12))
    for engine in ("llava-fast/serve", other.url):
        for clients in (1, 3):
            assert doc["checks"]["completion_tokens"][f"{engine} x{clients}"] == expected_tokens
            throughput = [f for f in doc["figures"] if f["name"] == "serve_output_throughput"
                          and f["labels"] == {"engine": engine, "clients": clients}]
            assert len(throughput) == 1 and throughput[0]["value"] > 0
    assert not doc["checks"]["failures"]
    ratios = {(f["name"], f["labels"]["clients"]): f["value"] for f in doc["figures"]
              if f["name"].startswith("serve_ratio_")}
    assert len(ratios) == 10 and all(v > 0 for v in ratios.values())
    ours = {f["labels"]["clients"]: f["value"] for f in doc["figures"] if f["name"] == "serve_output_throughput"
            and f["labels"]["engine"] == "llava-fast/serve"}
    theirs = {f["labels"]["clients"]: f["value"] for f in doc["figures"] if f["name"] == "serve_output_throughput"
              and f["labels"]["engine"] == other.url}
    assert ratios["serve_ratio_output_throughput", 3] == pytest.approx(ours[3] / theirs[3])
    printed = capsys.readouterr().out
    assert f"| 3 | {other.url} |" in printed and "| 3 | llava-fast / other |" in printed and "FAILED" not in printed


def test_a_server_that_fails_requests_is_a_row_that_says_so(tmp_path, capsys, other):
    other.config.api_key = "secret"  # every request to it is now a 401
    try:
        out = tmp_path / "failing.json"
        assert cli.main(["serve", "--requests", "3", "--clients", "2", "--max-tokens", "12", "--against", other.url,
                         "--against-model", "the-other", "--json", str(out)]) == 0
    finally:
        other.config.api_key = None
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == []
    assert doc["checks"]["failed_requests"] == {"llava-fast/serve x2": 0, f"{other.url} x2": 3}
    assert not [f for f in doc["figures"] if f["labels"].get("engine") == other.url]  # no figures from nothing
    assert "401" in doc["checks"]["failures"][f"{other.url} x2"]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| 2 | {other.url} |"))
    assert "FAILED: 3 of 3 failed" in row and "401" in row


def test_against_needs_a_url():
    from llava_fast.errors import InputError

    with pytest.raises(InputError, match="--against must be an http"):
        cli.main(["serve", "--against", "localhost:8000"])
    with pytest.raises(InputError, match="--against-model needs --against"):
        cli.main(["serve", "--against-model", "x"])
    with pytest.raises(InputError, match="--against-start needs --against"):
        cli.main(["serve", "--against-start", "true"])


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_against_start_runs_the_other_server_after_ours_and_stops_it(tmp_path):
    """The started server (a second llava-fast process on the tiny preset) runs after llava-fast's client counts,
    with this process's model released, and its process group is gone when the benchmark returns."""
    import sys

    import httpx

    port, out = _free_port(), tmp_path / "started.json"
    url = f"http://127.0.0.1:{port}"
    command = f"{sys.executable} -m llava_fast serve --port {port} --max-batch 2 --served-model-name the-started"
    assert cli.main(["serve", "--requests", "3", "--clients", "1,2", "--max-tokens", "6", "--against", url,
                     "--against-start", command, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["settings"]["against_model"] == "the-started"
    expected_tokens = sum(max_tokens for _, max_tokens, _ in serve_bench.workload(3, 0, max_tokens=6))
    assert doc["checks"]["completion_tokens"] == {f"{e} x{c}": expected_tokens for c in (1, 2)
                                                  for e in ("llava-fast/serve", url)}
    assert not doc["checks"]["failures"]
    assert len([f for f in doc["figures"] if f["name"].startswith("serve_ratio_")]) == 10
    assert any("model released before --against-start" in note for note in doc["notes"])
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/models", timeout=5)


def test_against_start_that_exits_is_one_clear_error():
    from llava_fast.errors import InputError

    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(InputError, match=r"exited with status 3; its last lines: no such model"):
        cli.main(["serve", "--requests", "1", "--clients", "1", "--max-tokens", "2", "--against", url,
                  "--against-start", "echo no such model; exit 3"])
