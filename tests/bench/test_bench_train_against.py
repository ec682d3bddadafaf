"""`llava-fast bench train --against transformers` (CPU, a 1-layer tiny preset): the comparison itself.
Both engines start from the same weights, so their losses agree at step 1 (and, having taken the same AdamW
step, at step 2); the table has every row (stage 1, stage 2 full, stage 2 LoRA x float32, bfloat16) with
every column."""

import json

import pytest

from llava_fast.bench import schema
from llava_fast.cli import main

SEQ_LEN = 264  # BOS + 256 image tokens + 7 text tokens
BATCH = 1  # one row: the comparison's check is the losses, and two rows cost twice the time


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("peft")
    path = str(tmp_path_factory.mktemp("against") / "against.json")
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--layers", "1", "--batch-sizes",
                 str(BATCH), "--seq-len", str(SEQ_LEN), "--repeats", "1", "--warmup", "0", "--lora-r", "4",
                 "--json", path]) == 0
    with open(path) as f:
        return json.load(f)


def test_losses_match(result):
    losses = result["checks"]["first_step_loss"]
    assert sorted(losses) == sorted(f"{m}/{p}" for m in ("1", "2", "2-lora") for p in ("float32", "bfloat16"))
    for row, pair in losses.items():
        ours, theirs = pair["llava-fast"], pair["transformers"]
        assert ours[0] > 5  # log(32064) ~ 10.4: random weights, a real loss
        rel = 1e-4 if row.endswith("float32") else 2e-2  # bf16 weights vs autocast: a rounding apart
        assert ours[0] == pytest.approx(theirs[0], rel=rel), row
        assert ours[1] == pytest.approx(theirs[1], rel=10 * rel), row
        assert ours[1] != ours[0]  # the step changed the trained weights


def test_table_has_every_row(result, capsys):
    assert schema.validate(result) == []
    figs = result["figures"]
    for mode in ("1", "2", "2-lora"):
        for precision in ("float32", "bfloat16"):
            lab = dict(stage=mode, precision=precision, batch=BATCH, seq_len=SEQ_LEN)
            for engine in ("llava-fast", "transformers"):
                got = {f["name"]: f for f in figs if f["labels"] == dict(lab, engine=engine)
                       or f["labels"] == dict(lab, engine=engine, peak="measured")}
                assert set(got) == {"train_step_time", "train_throughput", "train_mfu", "train_peak_memory"}
                step_s = got["train_step_time"]["value"] / 1e3
                assert got["train_throughput"]["value"] == pytest.approx(BATCH * SEQ_LEN / step_s, rel=1e-6)
                assert got["train_peak_memory"]["value"] > 0 and got["train_mfu"]["value"] > 0
            speedup = [f for f in figs if f["name"] == "train_speedup" and f["labels"]["stage"] == mode
                       and f["labels"]["precision"] == precision]
            assert len(speedup) == 1


def test_bad_against_arguments_are_input_errors():
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--dtype", "float16"]) == 2
    assert main(["bench", "train", "--device", "cpu", "--precisions", "float32"]) == 2
    assert main(["bench", "train", "--device", "cpu", "--rows", "2"]) == 2  # --against only
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--rows", "3"]) == 2
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--batch-sizes", "1,2"]) == 2
    assert main(["bench", "train", "--device", "cpu", "--max-grad-norm", "0"]) == 2  # --against only
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--max-grad-norm", "-1"]) == 2
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--max-grad-norm", "nan"]) == 2



def test_without_clipping_llava_fast_steps_in_backward_with_the_same_losses(tmp_path, capsys):
    """--max-grad-norm 0: neither engine clips and llava-fast steps inside backward; the step-1 and step-2 losses
    (the second after one AdamW step each) still agree, and the table says so. --rows picks stage 2's two rows;
    the last (LoRA) frees the source weights once both engines are built, before their first steps."""
    pytest.importorskip("peft")
    path = str(tmp_path / "noclip.json")
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--layers", "1", "--batch-sizes",
                 str(BATCH), "--seq-len", str(SEQ_LEN), "--repeats", "1", "--warmup", "0", "--lora-r", "4",
                 "--rows", "2-lora,2", "--precisions", "float32", "--max-grad-norm", "0", "--json", path]) == 0
    with open(path) as f:
        losses = json.load(f)["checks"]["first_step_loss"]
    assert sorted(losses) == ["2-lora/float32", "2/float32"]
    for pair in losses.values():
        ours, theirs = pair["llava-fast"], pair["transformers"]
        assert ours[0] > 5 and ours[0] == pytest.approx(theirs[0], rel=1e-4)
        assert ours[1] != ours[0] and ours[1] == pytest.approx(theirs[1], rel=1e-3)
    assert "no clipping (llava-fast steps in backward)" in capsys.readouterr().out


def test_two_pass_clipping_row_keeps_the_losses(tmp_path, capsys):
    """--two-pass-clipping: llava-fast clips with the norm of a first, norm-only backward and steps inside a
    second; its step-1 and step-2 losses agree with transformers' (which clips after one backward), and the table
    says which llava-fast ran. Without --against or without clipping it is an input error."""
    pytest.importorskip("peft")
    path = str(tmp_path / "two-pass.json")
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--layers", "1", "--batch-sizes",
                 str(BATCH), "--seq-len", str(SEQ_LEN), "--repeats", "1", "--warmup", "0", "--rows", "2",
                 "--two-pass-clipping", "--json", path]) == 0
    with open(path) as f:
        losses = json.load(f)["checks"]["first_step_loss"]
    assert sorted(losses) == ["2/bfloat16", "2/float32"]
    for row, pair in losses.items():
        ours, theirs = pair["llava-fast"], pair["transformers"]
        rel = 1e-4 if row.endswith("float32") else 2e-2
        assert ours[0] > 5 and ours[0] == pytest.approx(theirs[0], rel=rel)
        assert ours[1] != ours[0] and ours[1] == pytest.approx(theirs[1], rel=10 * rel)
    assert "(llava-fast: --two-pass-clipping)" in capsys.readouterr().out
    assert main(["bench", "train", "--device", "cpu", "--two-pass-clipping"]) == 2
    assert main(["bench", "train", "--device", "cpu", "--against", "transformers", "--two-pass-clipping",
                 "--max-grad-norm", "0"]) == 2
