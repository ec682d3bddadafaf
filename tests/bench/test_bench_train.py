"""`llava-fast bench train` on the tiny preset (CPU): the trainer's step, timed; MFU from the trainer's count."""

import json

import pytest

from llava_fast.bench import schema, train_bench
from llava_fast.cli import main
from llava_fast.presets import preset_config

SEQ_LEN = 264  # BOS + 256 image tokens + 7 text tokens


def test_stage_two_adds_the_llm_weight_gradients():
    """Stage 2 differs from stage 1 by the LLM's weight gradients: 2 FLOPs per matmul parameter per token."""
    cfg = preset_config("tiny")
    t = cfg.text
    n_llm = t.num_layers * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1376) + 512 * t.vocab_size
    tokens = 3 * SEQ_LEN
    assert train_bench.step_flops(cfg, 3, SEQ_LEN, 2) - train_bench.step_flops(cfg, 3, SEQ_LEN, 1) == 2 * tokens * n_llm


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("train") / "train.json")
    assert main(["bench", "train", "--device", "cpu", "--seq-len", str(SEQ_LEN), "--repeats", "2", "--warmup", "0",
                 "--layers", "2", "--json", path]) == 0
    with open(path) as f:
        return json.load(f)


def test_train_result(result):
    assert schema.validate(result) == []
    s = result["settings"]
    assert s["stages"] == [1, 2] and s["seq_len"] == SEQ_LEN and s["backends"] == ["torch"]
    assert s["decoder_layers"] == 2 and s["model_name"] == "tiny-2-layers" and s["gradient_checkpointing"] is False
    peak = result["ceilings"]["matmul"]["measured"]
    cfg = preset_config("tiny")
    cfg.text.num_layers = 2
    for stage in (1, 2):
        figs = {f["name"]: f for f in result["figures"] if f["labels"].get("stage") == stage}
        step, tput, mfu = figs["train_step_time"], figs["train_throughput"], figs["train_mfu"]
        for ms, rate in zip(step["samples"], tput["samples"]):
            assert rate * ms / 1e3 == pytest.approx(SEQ_LEN)
        flops = train_bench.step_flops(cfg, 1, SEQ_LEN, stage)
        assert mfu["value"] == pytest.approx(100 * flops / (step["value"] / 1e3) / 1e12 / peak)
        assert mfu["labels"]["peak"] == "measured"


def test_bad_sequence_length_is_an_input_error():
    assert main(["bench", "train", "--device", "cpu", "--seq-len", "100"]) == 2  # no room for text after the image
    assert main(["bench", "train", "--device", "cpu", "--model", "/nonexistent", "--layers", "2"]) == 2


def test_lora_stage_two(tmp_path, capsys):
    """Stage 2 with LoRA (the old train/benchmark.py's --lora-r, folded in): adapters + projector train, the LLM's
    weights get no gradients, so its FLOP count is stage 1's; the table projects the paper's 8-GPU hours."""
    path = str(tmp_path / "lora.json")
    assert main(["bench", "train", "--device", "cpu", "--stages", "2", "--lora-r", "4", "--seq-len", str(SEQ_LEN),
                 "--repeats", "1", "--warmup", "0", "--layers", "1", "--json", path]) == 0
    with open(path) as f:
        doc = json.load(f)
    assert schema.validate(doc) == []
    assert doc["settings"]["lora_r"] == 4 and doc["settings"]["lora_alpha"] == 8.0
    cfg = preset_config("tiny")
    cfg.text.num_layers = 1
    flops = train_bench.step_flops(cfg, 1, SEQ_LEN, 2, lora=True)
    assert flops == train_bench.step_flops(cfg, 1, SEQ_LEN, 1) < train_bench.step_flops(cfg, 1, SEQ_LEN, 2)
    figs = {f["name"]: f for f in doc["figures"]}
    step_s = figs["train_step_time"]["value"] / 1e3
    peak = doc["ceilings"]["matmul"]["measured"]
    assert figs["train_mfu"]["value"] == pytest.approx(100 * flops / step_s / 1e12 / peak)
    hours = train_bench.projected_hours(2, 1, figs["train_step_time"]["value"])
    assert hours == pytest.approx(665_000 * step_s / 8 / 3600)
    assert f"{hours:.3g} (10)" in capsys.readouterr().out
