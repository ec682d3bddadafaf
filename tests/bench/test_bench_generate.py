"""`llava-fast bench generate` end to end on the tiny preset (CPU): the CI smoke test.

One real run (2 scenarios, 2 engines, 2 repeats, 6 new tokens) through the `llava-fast` entry point; its
JSON must validate, and its figures must agree with each other and with the definitions in
bench/SCHEMA.md (prefill rate x TTFT = tokens, paired speed-ups = ratios of the samples, the transformers
baseline computing the same logits on the same weights).
"""

import json

import pytest
import torch

from llava_fast import ops
from llava_fast.bench import generate_bench, report, schema
from llava_fast.cli import main
from llava_fast.errors import InputError

pytest.importorskip("transformers")

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "generate.json")
    backend = ops.BACKEND
    rc = main(["bench", "--device", "cpu", "--batch-sizes", "1,2", "--contexts", "prompt,300",
               "--new-tokens", str(NEW_TOKENS), "--repeats", "2", "--vision-batch", "1", "--json", path,
               "--plot", path.replace(".json", ".png")])
    assert rc == 0
    assert ops.BACKEND == backend  # the harness restores the kernel backend it found
    with open(path) as f:
        return json.load(f)


def test_json_matches_schema_and_records_what_ran(result):
    assert schema.validate(result) == []
    s = result["settings"]
    assert s["preset"] == "tiny" and s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["backends"] == ["torch"]  # the interpreted Triton path never runs by default on a CPU
    assert s["engines"] == ["llava-fast/torch", "transformers"] and s["baseline"] == "transformers"
    natural = s["contexts"][0]
    assert s["contexts"] == [natural, 300] and natural > 256  # 256 image tokens + the templated question
    assert s["scenarios"] == [{"batch": 1, "context": natural}, {"batch": 2, "context": natural},
                              {"batch": 1, "context": 300}]
    assert result["device"]["host"]["cores"] >= 1 and result["software"]["torch"] == torch.__version__
    assert result["telemetry"]["available"] is False and result["telemetry"]["reason"]
    assert result["ceilings"]["bandwidth"]["measured"] > 0 and result["ceilings"]["matmul"]["dtype"] == "float32"
    # matplotlib is optional: without it the plot is a note ("no plot written ..."), not an error
    assert any("plot" in n for n in result["notes"])


def test_every_scenario_has_every_figure_per_engine(result, tiny):
    figs = result["figures"]
    for sc in result["settings"]["scenarios"]:
        for engine in result["settings"]["engines"]:
            for name in ("time_to_first_token", "prefill_throughput", "decode_throughput", "decode_bandwidth"):
                f = report.find_one(figs, name, engine=engine, **sc)
                assert f is not None, (name, engine, sc)
                assert f["value"] > 0
            # The share of the read roofline only where a step's bytes stream from memory; else a note says why.
            step_bytes = generate_bench.decode_bytes_per_step(tiny.net, sc["batch"], sc["context"], NEW_TOKENS)
            why_not = generate_bench.roofline_applies(step_bytes, result["device"]["last_level_cache_bytes"])
            assert (report.find_one(figs, "decode_bandwidth_pct", engine=engine, **sc) is None) == bool(why_not)
            if why_not:
                assert f"decode_bandwidth_pct left out at batch {sc['batch']}, context {sc['context']}: " + \
                    why_not in result["notes"]
            assert report.find_one(figs, "decode_speedup", engine="llava-fast/torch", baseline="transformers", **sc)
            assert report.find_one(figs, "ttft_speedup", engine="llava-fast/torch", baseline="transformers", **sc)
    for engine in result["settings"]["engines"]:
        assert report.find_one(figs, "vision_throughput", engine=engine, batch=1)["value"] > 0
    assert report.find_one(figs, "host_peak_rss", scope="process")["value"] > 2**20
    assert not report.find(figs, "peak_memory")  # CUDA only


def test_figures_agree_with_their_definitions(result):
    figs = result["figures"]
    for f in report.find(figs, "prefill_throughput"):
        ttft = report.find_one(figs, "time_to_first_token", **f["labels"])
        b, c = f["labels"]["batch"], f["labels"]["context"]
        for rate, ms in zip(f["samples"], ttft["samples"]):
            assert rate * ms / 1e3 == pytest.approx(b * c)  # tokens = rate x time, sample by sample
    for sp in report.find(figs, "decode_speedup"):
        labels = {k: v for k, v in sp["labels"].items() if k != "baseline"}
        ours = report.find_one(figs, "decode_throughput", **labels)["samples"]
        theirs = report.find_one(figs, "decode_throughput", **{**labels, "engine": sp["labels"]["baseline"]})["samples"]
        assert sp["samples"] == pytest.approx([x / y for x, y in zip(ours, theirs)])
    for sp in report.find(figs, "ttft_speedup"):
        labels = {k: v for k, v in sp["labels"].items() if k != "baseline"}
        ours = report.find_one(figs, "time_to_first_token", **labels)["samples"]
        theirs = report.find_one(figs, "time_to_first_token", **{**labels, "engine": "transformers"})["samples"]
        assert sp["samples"] == pytest.approx([y / x for x, y in zip(ours, theirs)])
    measured = result["ceilings"]["read_bandwidth"]["measured"]
    for f in report.find(figs, "decode_bandwidth_pct"):
        assert f["labels"]["peak"] == "measured"
        bw = report.find_one(figs, "decode_bandwidth", **{k: v for k, v in f["labels"].items() if k != "peak"})
        assert f["value"] == pytest.approx(100 * bw["value"] / measured)


def test_first_token_of_an_image_request_in_three_parts(result):
    """Preprocessing, tower + projector and prefill: each measured (2 rounds), positive, and round by round their
    sum at most the whole first-token time they split; the markdown shows them."""
    figs, natural = result["figures"], result["settings"]["contexts"][0]
    parts = [report.find_one(figs, name, engine="llava-fast/torch", batch=1, context=natural)
             for name in generate_bench.TTFT_SPLIT]
    assert all(p is not None and len(p["samples"]) == 2 and p["value"] > 0 for p in parts)
    *split, total = parts
    for i in range(2):
        assert sum(p["samples"][i] for p in split) <= total["samples"][i]
    assert not report.find(figs, "ttft_vision", engine="transformers")
    text = generate_bench.markdown(result)
    assert "| engine | preprocess | tower + projector | prefill | total |" in text
    assert f"| llava-fast/torch | {report.fmt(split[0]['value'])} |" in text


def test_transformers_baseline_computes_the_same_model(result):
    parity = result["checks"]["transformers_parity"]
    assert parity["same_argmax"] and parity["max_abs_logit_diff"] < 1e-4
    agreement = result["checks"]["greedy_agreement"]
    assert len(agreement) == 3 and all(a["agreement"] == 1.0 for a in agreement)


def test_markdown_table_shows_both_engines_and_ratio(result):
    text = generate_bench.markdown(result)
    assert "| llava-fast/torch | transformers | llava-fast/torch / transformers |" in text
    decode = report.find_one(result["figures"], "decode_speedup", engine="llava-fast/torch", batch=1,
                             context=result["settings"]["contexts"][0])
    assert report.fmt(decode["value"], "x") in text


@pytest.fixture(scope="module")
def tiny():
    from llava_fast.presets import random_model

    return random_model("tiny", device="cpu")


def test_transformers_model_holds_llava_fast_tensors(tiny):
    """Same weights by construction, and no second copy of them (a 13B would not fit twice)."""
    hf = generate_bench.build_transformers_model(tiny)
    theirs = dict(hf.named_parameters())
    shared = sum(p.data_ptr() in {t.data_ptr() for t in theirs.values()} for p in tiny.net.parameters())
    assert shared == len(list(tiny.net.parameters()))
    assert hf.lm_head.weight.data_ptr() == tiny.net.lm_head.weight.data_ptr()


def test_prompt_ids_reach_the_requested_context(tiny):
    model = tiny
    natural = model.encode_prompt(generate_bench.PROMPT, 1)
    longer = generate_bench.prompt_ids(model, len(natural) + 37)
    assert len(longer) == len(natural) + 37
    assert longer.count(model.image_token_id) == model.num_image_tokens
    assert longer[-10:] == natural[-10:]  # the question stays last
    with pytest.raises(InputError, match="shorter than the prompt"):
        generate_bench.prompt_ids(model, len(natural) - 1)
    contexts, notes = generate_bench.resolve_contexts(["prompt", 4096], len(natural), 2048, 32, explicit=False)
    assert contexts == [len(natural)] and notes
    with pytest.raises(InputError, match="exceeds"):
        generate_bench.resolve_contexts([4096], len(natural), 2048, 32, explicit=True)


def test_decode_bytes_per_step_counts_weights_and_cache(tiny):
    net = tiny.net
    t = net.cfg.text
    weights = 4 * (t.num_layers * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1376 + 2 * 512) + 512 + 32064 * 512)
    kv = 4 * 3 * t.num_layers * 2 * t.num_kv_heads * t.head_dim * (100 + 8 / 2)
    assert generate_bench.decode_bytes_per_step(net, 3, 100, 8) == int(weights + kv)


def test_roofline_share_only_where_the_step_streams_from_memory(tiny):
    """A step whose bytes fit in the last-level cache is read from it, faster than memory: its share of the read
    roofline was reported anyway ("104.3%" for the tiny preset on a CPU with a 480 MiB L3); now it is left out
    with a note, and elsewhere it is over the read ceiling (not the copy's read + write rate)."""
    step_bytes = generate_bench.decode_bytes_per_step(tiny.net, 1, 300, 5)
    runs = [generate_bench.Run(0.05, 0.02 * (1 + i / 7), [[1] * 5]) for i in range(3)]  # 4 steps in 20-23 ms
    ceilings = {"bandwidth": {"measured": 40.0, "datasheet": None}, "read_bandwidth": {"measured": 25.0,
                                                                                       "datasheet": None}}
    notes = []
    fits = generate_bench.scenario_figures({"e": {"runs": runs, "peak_memory": None}}, tiny.net, 1, 300, 5, ceilings,
                                           step_bytes, notes)
    assert report.find_one(fits, "decode_bandwidth", engine="e") and not report.find(fits, "decode_bandwidth_pct")
    assert notes == [f"decode_bandwidth_pct left out at batch 1, context 300: its {step_bytes / 1e6:.1f} MB per "
                     f"decode step fit in the {step_bytes / 2**20:.0f} MiB last-level cache, so the memory read "
                     "rate is not its ceiling"]
    notes = []
    streams = generate_bench.scenario_figures({"e": {"runs": runs, "peak_memory": None}}, tiny.net, 1, 300, 5,
                                              ceilings, step_bytes - 1, notes)
    pct = report.find_one(streams, "decode_bandwidth_pct", engine="e")
    gbps = report.find_one(streams, "decode_bandwidth", engine="e")["value"]
    assert notes == [] and pct["value"] == pytest.approx(100 * gbps / 25.0) and pct["labels"]["peak"] == "measured"
    assert "unknown" in generate_bench.roofline_applies(step_bytes, None)


def test_read_ceiling_streams_past_the_cache():
    from llava_fast.bench.device import last_level_cache_bytes, measure_read_bandwidth

    cache = last_level_cache_bytes(torch.device("cpu"))
    assert cache is None or cache >= 1 << 20  # every x86 CPU has a last-level cache of a MiB or more
    ceiling = measure_read_bandwidth(torch.device("cpu"), 64 << 20, repeats=2)  # a 64 MiB cache: a 128 MiB buffer
    assert ceiling["method"] == "best of 2: sum() over 256 MiB float32, bytes = read" and ceiling["measured"] > 0
    ceiling = measure_read_bandwidth(torch.device("cpu"), 200 << 20, repeats=2)
    assert ceiling["method"].endswith("sum() over 400 MiB float32, bytes = read")


def test_token_agreement_counts_up_to_first_difference():
    assert generate_bench.token_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert generate_bench.token_agreement([[1, 2, 9, 4]], [[1, 2, 3, 4]]) == 0.5  # 4 after the 9 not counted
    assert generate_bench.token_agreement([[1, 2], [5, 6]], [[1, 2], [0, 6]]) == 0.5


def test_unusable_context_is_an_input_error():
    assert main(["bench", "--device", "cpu", "--contexts", "10", "--no-transformers", "--repeats", "1"]) == 2


def test_next_presets_and_their_defaults():
    """llava-v1.6-mistral-7b: Mistral-7B-Instruct-v0.2's decoder, CLIP ViT-L/14-336 and LLaVA-1.6's pinpoints, so the
    bench's 672x672 image is 5 tiles and 2,928 positions (as transformers' LlavaNextProcessor counts them, see
    test_anyres.py); tiny-next has the same tiles. Their bench defaults: the prompt as is, batch 1 on a CPU."""
    from llava_fast.image import anyres
    from llava_fast.presets import preset_config

    for name in ("llava-v1.6-mistral-7b", "tiny-next"):
        cfg = preset_config(name)
        assert cfg.anyres and cfg.vision.image_size == 336 and cfg.template == "mistral_instruct"
        P = cfg.vision.image_size // cfg.vision.patch_size
        assert anyres.num_tiles(672, 672, cfg.image_grid_pinpoints, 336) == 5
        assert anyres.num_image_tokens(672, 672, cfg.image_grid_pinpoints, 336, P, cfg.num_image_tokens) == 2928
        assert generate_bench.defaults_for("cpu", name)["batch_sizes"] == [1]
        assert generate_bench.defaults_for("cpu", name)["contexts"] == ["prompt"]
    t = preset_config("llava-v1.6-mistral-7b").text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size) == (4096, 32, 32, 8, 14336)
    assert (t.rope_theta, t.max_position_embeddings, t.sliding_window) == (1e6, 32768, None)
    assert generate_bench.defaults_for("cpu", "tiny") == generate_bench.DEFAULTS["cpu"]


def test_next_bench_runs_beside_transformers_next(tmp_path, monkeypatch):
    """The LLaVA-NeXT path of the bench end to end, on a preset small enough for a test (28-px tiles, the
    pinpoints scaled to them): transformers' LlavaNextForConditionalGeneration on the same tensors computes the
    same logits, both engines get the tiles and image_sizes and generate the same tokens, the image is 5 tiles."""
    from llava_fast import presets
    from llava_fast.checkpoints.config import LlavaConfig, TextConfig, VisionConfig

    micro = LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28),
        text=TextConfig(vocab_size=32064, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5),
        vision_feature_layer=-1, image_grid_pinpoints=((28, 56), (56, 28), (56, 56), (84, 28), (28, 84)),
        template="mistral_instruct")
    monkeypatch.setitem(presets.PRESETS, "micro-next", micro)
    path = str(tmp_path / "next.json")
    assert main(["bench", "generate", "--preset", "micro-next", "--device", "cpu", "--new-tokens", "3",
                 "--repeats", "2", "--json", path]) == 0
    with open(path) as f:
        doc = json.load(f)
    s = doc["settings"]
    model = presets.random_model("micro-next")
    pixels, sizes = generate_bench.bench_image(model)
    assert pixels.shape == (5, 3, 28, 28) and sizes.tolist() == [[672, 672]]
    prompt = model.encode_prompt(generate_bench.PROMPT, 1, image_sizes=sizes.tolist())
    assert sum(t == model.image_token_id for t in prompt) == model.image_token_counts([[672, 672]])[0]
    assert s["batch_sizes"] == [1] and s["contexts"] == [len(prompt)]
    assert s["engines"] == ["llava-fast/torch", "transformers"]
    parity = doc["checks"]["transformers_parity"]
    assert parity["same_argmax"] and parity["max_abs_logit_diff"] < 1e-4
    assert [a["agreement"] for a in doc["checks"]["greedy_agreement"]] == [1.0]
    for name in ("time_to_first_token", "decode_throughput"):
        for engine in s["engines"]:
            assert len(report.find_one(doc["figures"], name, engine=engine)["samples"]) == 2
    assert report.find_one(doc["figures"], "ttft_speedup", engine="llava-fast/torch", baseline="transformers")
    # The first token of the 672x672 request split in three, the tower on its 5 tiles: measured, and within the whole.
    *split, total = [report.find_one(doc["figures"], name, engine="llava-fast/torch", batch=1, context=len(prompt))
                     for name in generate_bench.TTFT_SPLIT]
    assert all(p is not None and len(p["samples"]) == 2 and p["value"] > 0 for p in split + [total])
    assert all(sum(p["samples"][i] for p in split) <= total["samples"][i] for i in range(2))
    assert "| engine | preprocess | tower + projector | prefill | total |" in generate_bench.markdown(doc)
