"""The compiled decode step and prefill (llava_fast/compiled.py) against the eager path, on the parity suite's
checkpoints (every layout, both variants; tests/test_parity.py holds eager == transformers on the same ones).

Greedy ids must be identical: batched rows of different lengths (eager padded prefill, compiled decode at
batch 3) and single rows (compiled prefill with a dynamic length, compiled decode at batch 1). Inductor on
2 CPU cores takes tens of seconds per graph (minutes on a loaded host: ~15 min for this file at load 15), so
this file is marked slow.
"""

import checkpoints as ck
import pytest
from test_parity import CASES, LAYOUTS, VARIANTS, _rows

import llava_fast
from llava_fast.compiled import CompiledSteps

NEW_TOKENS = 12

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_greedy_equals_eager_on_every_parity_checkpoint(tmp_path_factory, variant):
    hf = ck.make_hf_model(seed=hash(variant) % 1000, **VARIANTS[variant])
    compiled = CompiledSteps()
    for layout in LAYOUTS:
        assert (layout, variant) in CASES
        path = ck.write_checkpoint(hf, str(tmp_path_factory.mktemp(f"compile-{layout}-{variant}")), layout)
        model = llava_fast.load(path, device=ck.DEVICE, dtype="float32")
        rows, images_per_row = _rows(model)
        pixels = ck.random_pixels(sum(images_per_row), model.config.vision.image_size, seed=1)
        eager_batched = model.generate_ids(rows, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        eager_single = model.generate_ids(rows[1:2], None, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        model.compiled = compiled
        assert model.generate_ids(rows, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=None) == eager_batched
        assert model.generate_ids(rows[1:2], None, max_new_tokens=NEW_TOKENS, eos_token_id=None) == eager_single
        assert compiled.compile_s > 0
    # The graphs are cached in the process: a new call pays no compile time.
    model.generate_ids(rows[1:2], None, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert model.last_stats["compile_s"] == 0.0


def test_compile_is_not_paid_without_asking(tmp_path):
    hf = ck.make_hf_model(seed=3)
    model = llava_fast.load(ck.write_checkpoint(hf, str(tmp_path), "hub"), device=ck.DEVICE, dtype="float32")
    assert model.compiled is None
    model.generate_ids([[1, 5, 6, 7]], None, max_new_tokens=3, eos_token_id=None)
    assert model.last_stats["compile_s"] == 0.0
