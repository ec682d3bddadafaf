"""The compiled decode step and prefill (llava_fast/compiled.py) against the eager path, on the parity suite's
checkpoints (every layout, both variants; tests/test_parity.py holds eager == transformers on the same ones).

Greedy ids must be identical: batched rows of different lengths (eager padded prefill, compiled decode at
batch 3) and single rows (compiled prefill with a dynamic length, compiled decode at batch 1). Inductor on
2 CPU cores takes tens of seconds per graph, so the graphs are compiled once per variant and reused across
the layouts (same shapes), and the variants share the single-row graphs' cost only where they must.
"""

import pytest

import checkpoints as ck
import llava_fast
from llava_fast.compiled import CompiledSteps
from test_parity import CASES, LAYOUTS, VARIANTS, _rows

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
        if layout == LAYOUTS[0]:
            first_compile_s = compiled.compile_s
            assert first_compile_s > 0
    # Later layouts (same shapes) reused the graphs: compile time was paid once, and a new call pays none.
    assert compiled.compile_s == first_compile_s
    model.generate_ids(rows[1:2], None, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert model.last_stats["compile_s"] == 0.0


def test_compile_is_not_paid_without_asking(tmp_path):
    hf = ck.make_hf_model(seed=3)
    model = llava_fast.load(ck.write_checkpoint(hf, str(tmp_path), "hub"), device=ck.DEVICE, dtype="float32")
    assert model.compiled is None
    model.generate_ids([[1, 5, 6, 7]], None, max_new_tokens=3, eos_token_id=None)
    assert model.last_stats["compile_s"] == 0.0
