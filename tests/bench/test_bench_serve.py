"""`llava-fast bench serve` end to end through the CLI on the tiny preset: 3 requests, 1 and 3 clients (the
loader the CLI shares with it once broke this command before any request was sent)."""

import json

import pytest

from llava_fast.bench import cli, schema

pytestmark = pytest.mark.slow


def test_bench_serve_writes_a_valid_document(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="the server extra is not installed")
    out = tmp_path / "serve.json"
    assert cli.main(["serve", "--requests", "3", "--clients", "1,3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["kind"] == "serve"
    clients = {f["labels"]["clients"] for f in doc["figures"] if f["name"] == "serve_output_throughput"
               and f["labels"]["engine"] == "llava-fast/serve"}
    assert clients == {1, 3}
    speedup = [f for f in doc["figures"] if f["name"] == "serve_speedup"]
    assert len(speedup) == 2 and all(f["value"] > 0 for f in speedup)
    assert "| llava-fast/serve | 3 |" in capsys.readouterr().out
