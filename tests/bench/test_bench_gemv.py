"""`llava-fast bench gemv` end to end on small random shapes: the document validates, every format has its
figures, the kernels' outputs match the reference, and the table prints."""

import json

import pytest

from llava_fast.bench import cli, gemv_bench, real_model, schema
from llava_fast.cpu import gemv as G


@pytest.mark.skipif(not G.NATIVE, reason="llava_fast._C was not built (no C++ toolchain)")
def test_bench_gemv_writes_a_valid_document(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchao", reason="int8/int4 weights are quantized by torchao")
    monkeypatch.setattr(real_model, "cache_dir", lambda: str(tmp_path / "no-cache"))  # random weights
    monkeypatch.setattr(gemv_bench, "SMOLLM2_SHAPES", [(40, 64), (24, 96), (70, 64)])
    monkeypatch.setattr(gemv_bench, "READ_PROBE_BYTES", 4 * 2**20)
    out = tmp_path / "gemv.json"
    assert cli.main(["gemv", "--repeats", "2", "--formats", "float32,int8,int4-32", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["kind"] == "gemv"
    assert doc["settings"]["source"].startswith("random") and doc["settings"]["layers"] == 3
    for fmt in ("float32", "int8", "int4-32"):
        for impl in ("llava-fast", "torch"):
            f = [f for f in doc["figures"] if f["name"] == "kernel_time" and f["labels"]["dtype"] == fmt
                 and f["labels"]["impl"] == impl]
            assert len(f) == 1 and f[0]["stats"]["n"] == 2
        assert doc["checks"]["max_abs_error_vs_reference"][fmt] < 1e-4
    # u8 weights + f32 row scales
    assert doc["checks"]["weight_bytes"]["int8"] == (40 + 70) * 64 + 24 * 96 + 4 * (40 + 24 + 70)
    table = capsys.readouterr().out
    assert "| int4-32 |" in table and "% of read bw" in table
    # --isa: kernel tables side by side in the same rounds, one impl each
    assert cli.main(["gemv", "--repeats", "2", "--formats", "int4-32", "--isa", "scalar,best", "--json",
                     str(tmp_path / "isa.json")]) == 0
    doc = json.loads((tmp_path / "isa.json").read_text())
    assert schema.validate(doc) == [] and doc["settings"]["isa"] == ["scalar", "best"]
    impls = {f["labels"]["impl"] for f in doc["figures"] if f["name"] == "kernel_time"}
    assert impls == {"llava-fast[scalar]", "llava-fast[best]", "torch"}
    assert "| int4-32 | scalar |" in capsys.readouterr().out
