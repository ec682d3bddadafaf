"""`llava-fast bench generate`: end-to-end generation, side by side with the torch path and transformers.

Engines, all on the same weights in one process: `llava-fast/triton` and `llava-fast/torch` (the same
model with `llava_fast.ops` switched between backends), with `--compile` also `llava-fast/<backend>+compile`
(the same model with its decode step and prefill torch.compile'd: llava_fast/compiled.py; the compile
happens in the warm-up runs and is reported as compile_time), and `transformers` (LlavaForConditionalGeneration
built with the model's exact shapes; its parameters are llava-fast's own tensors, assigned, not copied;
LlavaNextForConditionalGeneration for a LLaVA-NeXT model). Every engine gets the same expanded ids (chat
template, bundled example image's 576/256 image tokens; LLaVA-NeXT: the image resized to 672x672, 5 tiles of
336 px, 2,928 image tokens, all tiles through the tower as one batch), greedy, the same number of new tokens
with EOS disabled.

One run of an engine (what is timed):
    ids (as the engine takes them) + pixel_values on the device, synchronised  -> t0
    setup, KV cache, vision tower, projector, prefill, first greedy token of every row on the host -> t_first
    new_tokens - 1 decode steps, tokens read back to the host as the engine does -> t_end
    time_to_first_token = t_first - t0;  prefill_throughput = B * T / time_to_first_token
    decode_throughput = B * (new_tokens - 1) / (t_end - t_first)
llava-fast runs `LlavaModel.generate_ids` (its generate() minus text detokenization: CUDA graphs and
chunked read-back where the engine uses them); its `last_stats` give t_end - t_first, the rest of the call
is the first token's. transformers runs generate() with a streamer that stamps each token (put() receives
it on the host; its loop syncs every step anyway to test its stopping criteria). Image preprocessing
(JPEG -> pixel_values) is excluded for every engine.

Scenarios: every batch size at the first context, and every other context at the smallest batch size (a
cross, not a product: a 64 x 3072-token KV cache is not what anyone serves). Each scenario: on CUDA one run
per engine alone for its peak memory, then `warmup` untimed runs per engine, then `repeats` rounds in which
every engine runs once, the order rotating each round so that background load and thermal drift fall on all
engines alike; figures are medians.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from llava_fast import ops
from llava_fast.bench.device import Telemetry, device_info, measure_ceilings, measure_read_bandwidth, peak
from llava_fast.bench.report import figure, find_one, fmt, header_lines, md_table, new_document
from llava_fast.bench.timing import Clock, summarize, time_repeats
from llava_fast.errors import InputError
from llava_fast.generate import positions_needed

PROMPT = "What is unusual about this image?"
TRANSFORMERS = "transformers"

DEFAULTS = {
    "cpu": dict(preset="tiny", backends=["torch"], batch_sizes=[1, 8], contexts=["prompt", 1024], new_tokens=32,
                repeats=5, warmup=1, vision_batch=8),
    "cuda": dict(preset="llava-1.5-7b", backends=["triton", "torch"], batch_sizes=[1, 8, 32, 64],
                 contexts=["prompt", 1024, 2048, 3072], new_tokens=128, repeats=10, warmup=1, vision_batch=32),
}
# LLaVA-NeXT presets: one 672x672 image is already ~2,900 positions, so the prompt as is, fewer rows.
ANYRES_DEFAULTS = {"cpu": dict(batch_sizes=[1], contexts=["prompt"]),
                   "cuda": dict(batch_sizes=[1, 8], contexts=["prompt"])}
ANYRES_IMAGE_SIZE = (672, 672)  # (height, width): LLaVA-1.6's largest square pinpoint, 2 x 2 tiles + the base


def defaults_for(device_type: str, preset: str | None) -> dict:
    """DEFAULTS for the device, with ANYRES_DEFAULTS over them for a LLaVA-NeXT preset."""
    from llava_fast.presets import PRESETS

    defaults = DEFAULTS[device_type]
    if preset in PRESETS and PRESETS[preset].anyres:
        defaults = {**defaults, **ANYRES_DEFAULTS[device_type], "preset": preset}
    return defaults


TTFT_SPLIT = ("ttft_image_preprocess", "ttft_vision", "ttft_prefill", "ttft_image_request")


class BaselineUnavailable(Exception):
    """transformers cannot run this model here (not installed, no linear projector, ...)."""


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------


def load_model(preset, model_dir, device, dtype, vision_tower=None):
    """(LlavaModel, name): the preset with random weights (seed 0), or a checkpoint directory."""
    import llava_fast
    from llava_fast.presets import random_model

    if model_dir:
        return llava_fast.load(model_dir, device=device, dtype=dtype, vision_tower=vision_tower), \
            os.path.basename(os.path.normpath(model_dir))
    return random_model(preset, device=device, dtype=dtype, seed=0), preset


def bench_image_file(model):
    """The image as a request sends it: the bundled JPEG, or for a LLaVA-NeXT model that image resized to
    ANYRES_IMAGE_SIZE (so its 5 tiles and 2,928 positions)."""
    from llava_fast.presets import BUNDLED_IMAGE

    if not model.config.anyres:
        return BUNDLED_IMAGE
    import PIL.Image

    with PIL.Image.open(BUNDLED_IMAGE) as im:
        return im.convert("RGB").resize(ANYRES_IMAGE_SIZE[::-1], PIL.Image.BICUBIC)


def bench_image(model):
    """(pixel_values of one image, image_sizes or None): bench_image_file's image through the model's
    preprocessing; a LLaVA-NeXT model's 5 tiles, (5, 3, S, S), and sizes (1, 2). Preprocessing is not timed."""
    image = bench_image_file(model)
    if not model.config.anyres:
        return model.pixel_values([image]), None
    return model.image_inputs([image])


def prompt_ids(model, context: int, seed: int = 0, image_sizes=None) -> list[int]:
    """The chat-templated question about one image, image tokens expanded, lengthened to `context` tokens
    by random text tokens placed after the image (a document pasted before the question)."""
    ids = model.encode_prompt(PROMPT, 1, image_sizes=None if image_sizes is None else image_sizes.tolist())
    extra = context - len(ids)
    if extra < 0:
        images = sum(t == model.image_token_id for t in ids)
        raise InputError(f"context {context} is shorter than the prompt itself ({len(ids)} tokens: "
                         f"{images} image tokens + text)")
    if extra:
        g = torch.Generator().manual_seed(seed)
        text_vocab = min(model.config.text.vocab_size, 32000)
        filler = torch.randint(3, text_vocab, (extra,), generator=g).tolist()
        filler = [t if t != model.image_token_id else 3 for t in filler]
        cut = max(i for i, t in enumerate(ids) if t == model.image_token_id) + 1
        ids = ids[:cut] + filler + ids[cut:]
    return ids


def resolve_contexts(requested, natural: int, limit: int, new_tokens: int, explicit: bool):
    """'prompt' -> the natural prompt length; drop defaults that do not fit the model (with a note),
    refuse explicit ones that do not."""
    out, notes = [], []
    for c in requested:
        c = natural if c == "prompt" else int(c)
        if c < natural and not explicit:
            notes.append(f"context {c} skipped: shorter than the prompt ({natural} tokens, image included)")
            continue
        if c < natural:
            raise InputError(f"--contexts: {c} is shorter than the prompt ({natural} tokens, image included)")
        if positions_needed(c, new_tokens) > limit:
            if explicit:
                raise InputError(f"--contexts: {c} + {new_tokens} new tokens needs {positions_needed(c, new_tokens)} "
                                 f"positions, which exceeds the model's context of {limit} tokens")
            notes.append(f"context {c} skipped: {c} + {new_tokens} new tokens exceeds the model's {limit}")
            continue
        if c not in out:
            out.append(c)
    return out, notes


def scenarios(batch_sizes, contexts):
    """Every batch size at the first context, the other contexts at the smallest batch size."""
    first = [(b, contexts[0]) for b in batch_sizes]
    return first + [(min(batch_sizes), c) for c in contexts[1:]]


# ------------------------------------------------------------------------------------------------------
# Engines
# ------------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, ttft_s, decode_s, tokens):
        self.ttft_s, self.decode_s, self.tokens = ttft_s, decode_s, tokens  # tokens: (B, N) lists


class LlavaFastEngine:
    def __init__(self, model, backend: str, compiled=None):
        self.model, self.net, self.backend = model, model.net, backend
        self.compiled = compiled  # a CompiledSteps, or None for the eager path
        self.name = f"llava-fast/{backend}" + ("+compile" if compiled is not None else "")
        if backend == "triton" and model.device.type == "cpu":
            # Triton on a CPU is its interpreter, which kernels only honour if this is set before
            # llava_fast.kernels is first imported (ops.use_backend imports it lazily).
            os.environ.setdefault("TRITON_INTERPRET", "1")

    def run(self, rows, pixel_values, new_tokens, clock: Clock, image_sizes=None) -> Run:
        """model.generate_ids: the engine's own loop (its read-back policy, CUDA graphs on the Triton path).
        Its last_stats give the decode time (first token on the host -> last token on the host); the
        first token's wait is the rest of the call, setup included, as transformers' is. LLaVA-NeXT:
        pixel_values (B, tiles, 3, S, S) and image_sizes (B, 2), as transformers' processor gives them."""
        ops.use_backend(self.backend)
        self.model.compiled = self.compiled
        t0 = clock.now()
        tokens = self.model.generate_ids(rows, pixel_values, max_new_tokens=new_tokens, eos_token_id=None,
                                         image_sizes=image_sizes)
        total = clock.now() - t0
        stats = self.model.last_stats
        steps = stats["steps"]
        decode_s = (steps - 1) * len(rows) / stats["decode_tokens_per_s"] if steps > 1 else 0.0
        if steps != new_tokens or any(len(t) != new_tokens for t in tokens):
            raise RuntimeError(f"{self.name} generated {steps} steps, expected {new_tokens}")
        return Run(total - decode_s, decode_s, tokens)

    def release(self):
        """Free the decoders the model keeps between calls (CUDA-graph workspaces), so a memory
        measurement starts from the weights alone."""
        self.model.release_workspace()

    def vision(self, pixel_values):
        ops.use_backend(self.backend)
        with torch.inference_mode():
            features = self.net.image_features(pixel_values)
            return ops.project_image_features(features, *self.net.multi_modal_projector.weights())


class _TokenClock:
    """A transformers streamer that stamps the host time of every generated token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        if value.dim() == 1:  # (B,) new tokens; the prompt arrives first as (B, T)
            self.times.append(time.perf_counter())

    def end(self):
        pass


class TransformersEngine:
    name = TRANSFORMERS

    def __init__(self, model):
        self.model = model
        self.hf = build_transformers_model(model)
        self.pad = model.config.text.pad_token_id if model.config.text.pad_token_id is not None else 0

    def run(self, rows, pixel_values, new_tokens, clock: Clock, image_sizes=None) -> Run:
        from transformers import GenerationConfig

        ids = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        mask = torch.ones_like(ids)
        gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                               pad_token_id=self.pad, use_cache=True)
        stamps = _TokenClock()
        t0 = clock.now()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = {} if image_sizes is None else {"image_sizes": image_sizes}
            out = self.hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                                   generation_config=gen, streamer=stamps, **images)
        if len(stamps.times) != new_tokens or out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens "
                               f"({len(stamps.times)} streamed), expected {new_tokens}")
        return Run(stamps.times[0] - t0, stamps.times[-1] - stamps.times[0], out[:, ids.shape[1]:].tolist())

    def vision(self, pixel_values):
        cfg = self.model.config
        with torch.inference_mode():  # transformers >= 4.52 keeps it on .model, older versions on the top level
            return getattr(self.hf, "model", self.hf).get_image_features(
                pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy)

    def release(self):
        pass

    def last_logits(self, ids, pixel_values, image_sizes=None):
        images = {} if image_sizes is None else {"image_sizes": image_sizes}
        with torch.inference_mode():
            out = self.hf(input_ids=torch.tensor([ids], device=self.model.device), pixel_values=pixel_values,
                          **images)
        return out.logits[:, -1].float()


def build_transformers_model(model):
    """transformers' LlavaForConditionalGeneration (LLaVA-NeXT: LlavaNextForConditionalGeneration) with `model`'s
    shapes, holding llava-fast's own parameter tensors (load_state_dict(assign=True): no second copy of the
    weights). Parameters llava-fast never builds (CLIP layers after the feature layer, post_layernorm) keep
    transformers' initialisation: they do not change the output, but transformers computes them, as it does
    for a real checkpoint. The decoder is a LlamaConfig (a MistralConfig where a sliding window is set)."""
    try:
        import transformers
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            MistralConfig,
        )
    except ImportError:
        raise BaselineUnavailable("transformers is not installed (pip install transformers)") from None
    from llava_fast.checkpoints.layouts import LLAVA_HF_RULES, rename_key

    cfg = model.config
    v, t = cfg.vision, cfg.text
    if cfg.projector_type != "mlp2x_gelu":
        raise BaselineUnavailable(f"transformers' LLaVA has no '{cfg.projector_type}' projector (LLaVA v1)")
    transformers.logging.set_verbosity_error()
    hv = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                          num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                          patch_size=v.patch_size, num_channels=v.num_channels, hidden_act=v.hidden_act,
                          layer_norm_eps=v.layer_norm_eps)
    text_fields = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                       num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, vocab_size=t.vocab_size,
                       max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                       rope_theta=t.rope_theta, tie_word_embeddings=False, bos_token_id=t.bos_token_id,
                       eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
    ht = MistralConfig(**text_fields, sliding_window=t.sliding_window) if t.sliding_window else LlamaConfig(
        **text_fields)
    common = dict(vision_config=hv, text_config=ht, image_token_index=cfg.image_token_id,
                  vision_feature_layer=cfg.vision_feature_layer,
                  vision_feature_select_strategy=cfg.vision_feature_select_strategy, projector_hidden_act="gelu",
                  tie_word_embeddings=False)
    if cfg.anyres:
        hc = LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])
        hf_class = LlavaNextForConditionalGeneration
    else:
        hc = LlavaConfig(**common, image_seq_length=cfg.num_image_tokens)
        hf_class = LlavaForConditionalGeneration
    with torch.device(model.device):
        hf = hf_class._from_config(hc, dtype=model.dtype)
    ours = model.net.state_dict()
    state = {}
    for key, tensor in hf.state_dict().items():
        name = rename_key(key, LLAVA_HF_RULES)
        if name in ours:
            if tuple(ours[name].shape) != tuple(tensor.shape):
                raise BaselineUnavailable(f"{key}: transformers' shape {tuple(tensor.shape)} is not llava-fast's "
                                          f"{tuple(ours[name].shape)}")
            state[key] = ours[name]
        elif "post_layernorm" in name or name.startswith("vision_tower.encoder.layers."):
            state[key] = tensor.normal_(0.0, 0.02) if tensor.dim() > 1 else tensor
        else:
            raise BaselineUnavailable(f"transformers' parameter {key} has no llava-fast counterpart ({name})")
    unused = set(ours) - {rename_key(k, LLAVA_HF_RULES) for k in state}
    if unused:
        raise BaselineUnavailable(f"llava-fast parameters unused by transformers: {sorted(unused)[:3]}")
    hf.load_state_dict(state, assign=True, strict=True)
    # Parameters and buffers transformers built itself (if it ignored the device context) join ours; moving a
    # tensor already on the device returns it, so the shared weights stay shared.
    return hf.to(model.device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------------


def _is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_scenario(engines, rows, pixel_values, new_tokens, repeats, warmup, device, notes, image_sizes=None):
    """{engine name: {"runs": [Run], "peak_memory": bytes or None}} for the engines that completed.

    CUDA first runs each engine alone for its memory footprint: every engine's kept workspaces freed, the
    allocator's peak reset, one run, `max_memory_allocated` (weights included). Then `warmup` untimed runs
    per engine and `repeats` timed rounds, the engine order rotating per round. An engine that runs out of
    memory (or, for transformers, fails in any way) is dropped from the scenario with a note; a failure of
    llava-fast itself propagates."""
    clock = Clock(device)
    cuda = device.type == "cuda"
    results = {e.name: {"runs": [], "peak_memory": None} for e in engines}
    active = list(engines)

    def attempt(engine, fn):
        try:
            return fn()
        except Exception as e:
            if not (_is_oom(e) or engine.name == TRANSFORMERS):
                raise
            first_line = str(e).splitlines()[0][:200] if str(e) else ""
            notes.append(f"{engine.name} at batch {len(rows)}, context {len(rows[0])}: {type(e).__name__}: "
                         f"{first_line}")
            active.remove(engine)
            results.pop(engine.name)
            engine.release()
            if cuda:
                torch.cuda.empty_cache()
            return None

    def footprint(engine):
        for e in engines:
            e.release()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        engine.run(rows, pixel_values, new_tokens, clock, image_sizes)
        results[engine.name]["peak_memory"] = torch.cuda.max_memory_allocated(device)

    if cuda:
        for engine in list(active):
            attempt(engine, lambda engine=engine: footprint(engine))
    for _ in range(warmup):
        for engine in list(active):
            attempt(engine, lambda engine=engine: engine.run(rows, pixel_values, new_tokens, clock, image_sizes))
    for r in range(repeats):
        for engine in active[r % len(active):] + active[: r % len(active)] if active else []:
            if engine in active:
                run = attempt(engine, lambda engine=engine: engine.run(rows, pixel_values, new_tokens, clock,
                                                                       image_sizes))
                if run is not None:
                    results[engine.name]["runs"].append(run)
    return results


def decode_bytes_per_step(net, batch, context, new_tokens) -> int:
    """HBM bytes a decode step must read at least: the decoder's and lm_head's weights once, plus every
    row's K and V at the mean cache length of the decode (context + new_tokens / 2)."""
    lm = net.language_model
    weights = sum(p.numel() * p.element_size() for m in (lm.layers, lm.norm, net.lm_head) for p in m.parameters())
    t = net.cfg.text
    es = net.lm_head.weight.element_size()
    kv = batch * t.num_layers * 2 * t.num_kv_heads * t.head_dim * (context + new_tokens / 2) * es
    return int(weights + kv)


def token_agreement(a, b) -> float:
    """Fraction of positions (rows x steps) where two greedy outputs agree, up to their first difference
    per row (after a difference the prefixes differ, and so may everything after)."""
    agree = total = 0
    for ra, rb in zip(a, b):
        total += len(ra)
        for x, y in zip(ra, rb):
            if x != y:
                break
            agree += 1
    return agree / total if total else 1.0


def run(settings: dict, argv) -> dict:
    """Run the benchmark; returns the result document (see bench/SCHEMA.md)."""
    from llava_fast.bench.device import command_line
    from llava_fast.checkpoints.load import resolve_device_dtype

    device, dtype = resolve_device_dtype(settings["device"], settings["dtype"])
    previous_backend = ops.BACKEND
    doc = new_document("generate", command_line(argv), settings)
    doc["device"] = device_info(device)
    notes = doc["notes"]
    model, name = load_model(settings["preset"], settings["model"], device, dtype, settings.get("vision_tower"))
    settings.update(device=str(device), dtype=str(dtype).replace("torch.", ""), model_name=name)
    if settings["model"]:
        settings["preset"] = None
    pixels_one, sizes_one = bench_image(model)  # preprocessing is not timed
    natural = len(model.encode_prompt(PROMPT, 1, image_sizes=None if sizes_one is None else sizes_one.tolist()))
    contexts, context_notes = resolve_contexts(settings["contexts"], natural, model.context_length,
                                               settings["new_tokens"], settings.pop("contexts_explicit"))
    notes += context_notes
    if not contexts:
        raise InputError("no context length fits the model")
    settings["contexts"] = contexts
    settings["scenarios"] = [{"batch": b, "context": c} for b, c in scenarios(settings["batch_sizes"], contexts)]
    if device.type == "cpu" and "triton" in settings["backends"]:
        notes.append("llava-fast/triton on a CPU runs in Triton's interpreter: its times are not performance")

    engines = [LlavaFastEngine(model, b) for b in settings["backends"]]
    if settings.get("compile"):
        from llava_fast.compiled import CompiledSteps

        # First, so the ratio columns read compiled / eager and compiled / transformers.
        engines = [LlavaFastEngine(model, b, CompiledSteps()) for b in settings["backends"]] + engines
    settings["baseline"] = None
    if settings["transformers"]:
        try:
            engines.append(TransformersEngine(model))
            settings["baseline"] = TRANSFORMERS
        except BaselineUnavailable as e:
            notes.append(f"transformers baseline skipped: {e}")
    settings["engines"] = [e.name for e in engines]
    settings["decode_weight_bytes"] = decode_bytes_per_step(model.net, 1, 0, 0)  # context 0: no K/V

    telemetry = Telemetry(device).start()
    try:
        doc["ceilings"] = measure_ceilings(device)
        cache_bytes = doc["device"]["last_level_cache_bytes"]
        doc["ceilings"]["read_bandwidth"] = measure_read_bandwidth(device, cache_bytes)
        doc["checks"]["transformers_parity"] = _parity(engines, model, pixels_one, sizes_one, natural, notes)
        outputs = {}
        for b, c in scenarios(settings["batch_sizes"], contexts):
            rows = [prompt_ids(model, c, image_sizes=sizes_one)] * b
            # (B, 3, S, S); LLaVA-NeXT (B, tiles, 3, S, S) and sizes (B, 2), as transformers' processor gives them
            pv = pixels_one.unsqueeze(0) if sizes_one is not None else pixels_one
            pv = pv.expand(b, *pv.shape[1:]).contiguous()
            sizes = None if sizes_one is None else sizes_one.expand(b, 2).contiguous()
            results = measure_scenario(engines, rows, pv, settings["new_tokens"], settings["repeats"],
                                       settings["warmup"], device, notes, image_sizes=sizes)
            doc["figures"] += scenario_figures(results, model.net, b, c, settings["new_tokens"], doc["ceilings"],
                                               cache_bytes, notes)
            outputs[(b, c)] = {n: r["runs"][-1].tokens for n, r in results.items() if r["runs"]}
        doc["checks"]["greedy_agreement"] = _agreement(outputs, engines)
        if sizes_one is None:
            doc["figures"] += vision_figures(engines, pixels_one, settings["vision_batch"], settings["repeats"],
                                             device, notes)
        else:
            notes.append("vision_throughput not measured for AnyRes (images of one size per batch): time to first "
                         f"token and its split hold the tower on the image's {len(pixels_one)} tiles, one batch")
        doc["figures"] += ttft_split_figures(engines, model, natural, settings["repeats"])
    finally:
        telemetry.stop()
        ops.use_backend(previous_backend)
    doc["telemetry"] = telemetry.to_dict()
    for e in engines:
        if getattr(e, "compiled", None) is not None:
            doc["figures"].append(figure("compile_time", "s", higher_is_better=False, value=e.compiled.compile_s,
                                         engine=e.name))
    doc["figures"] += ratio_figures(doc["figures"], [e.name for e in engines])
    if device.type == "cpu":
        doc["figures"].append(figure("host_peak_rss", "bytes", higher_is_better=False, value=_peak_rss(),
                                     scope="process"))
    return doc


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _parity(engines, model, pixels_one, sizes_one, natural, notes):
    """Last-position logits of the natural prompt, llava-fast (first backend) vs transformers: the
    comparison is only meaningful if both compute the same function of the same weights."""
    hf = next((e for e in engines if e.name == TRANSFORMERS), None)
    if hf is None:
        return None
    from llava_fast.generate import Decoder

    ids = prompt_ids(model, natural, image_sizes=sizes_one)
    ops.use_backend(engines[0].backend)
    ours = Decoder(model.net, 1, len(ids) + 1).prefill([ids], pixels_one, image_sizes=sizes_one)
    try:
        theirs = hf.last_logits(ids, pixels_one if sizes_one is None else pixels_one.unsqueeze(0), sizes_one)
    except Exception as e:
        notes.append(f"transformers parity check failed: {type(e).__name__}: {e}")
        return None
    diff = (ours - theirs).abs().max().item()
    return {"engine": engines[0].name, "max_abs_logit_diff": diff, "max_abs_logit": theirs.abs().max().item(),
            "same_argmax": bool((ours.argmax(-1) == theirs.argmax(-1)).all())}


def _agreement(outputs, engines):
    ref = engines[0].name
    checks = []
    for (b, c), by_engine in outputs.items():
        for name, tokens in by_engine.items():
            if name != ref and ref in by_engine:
                checks.append({"engine": name, "reference": ref, "batch": b, "context": c,
                               "agreement": token_agreement(tokens, by_engine[ref])})
    return checks


def roofline_applies(step_bytes: int, cache_bytes: int | None) -> str | None:
    """None when a decode step's bytes are bound by the memory read rate; else why its share of that rate says
    nothing: bytes that fit in the last-level cache are read from it after the first step, faster than memory
    (the tiny preset's 4 MB on a CPU with a 480 MiB L3 reached "104%" of the copy rate)."""
    if cache_bytes is None:
        return "the last-level cache size is unknown, so whether the bytes stream from memory is too"
    if step_bytes <= cache_bytes:
        return (f"its {step_bytes / 1e6:.1f} MB per decode step fit in the {cache_bytes / 2**20:.0f} MiB last-level "
                "cache, so the memory read rate is not its ceiling")
    return None


def scenario_figures(results, net, batch, context, new_tokens, ceilings, cache_bytes, notes):
    """The figures of one (batch, context) scenario. decode_bandwidth_pct (over the read-rate ceiling) only
    where the step's bytes exceed the last-level cache (roofline_applies); otherwise a note says why not."""
    figs = []
    bw_peak, bw_source = peak(ceilings, "read_bandwidth")
    step_bytes = decode_bytes_per_step(net, batch, context, new_tokens)
    why_not = roofline_applies(step_bytes, cache_bytes)
    if why_not and new_tokens > 1:
        notes.append(f"decode_bandwidth_pct left out at batch {batch}, context {context}: {why_not}")
    for name, r in results.items():
        runs = r["runs"]
        if not runs:
            continue
        labels = dict(engine=name, batch=batch, context=context)
        figs.append(figure("time_to_first_token", "ms", higher_is_better=False,
                           samples=[1e3 * x.ttft_s for x in runs], **labels))
        figs.append(figure("prefill_throughput", "tokens/s", higher_is_better=True,
                           samples=[batch * context / x.ttft_s for x in runs], **labels))
        if new_tokens > 1:
            # The roofline: a decode step cannot be faster than reading its bytes (weights once per step,
            # each row's K/V) at the memory's read rate; decode_bandwidth_pct is the share of it reached.
            rates = [batch * (new_tokens - 1) / x.decode_s for x in runs]
            figs.append(figure("decode_throughput", "tokens/s", higher_is_better=True, samples=rates, **labels))
            gbps = [step_bytes * rate / batch / 1e9 for rate in rates]
            figs.append(figure("decode_bandwidth", "GB/s", higher_is_better=True, samples=gbps, **labels))
            if not why_not:
                figs.append(figure("decode_bandwidth_pct", "%", higher_is_better=True,
                                   value=100 * summarize(gbps)["median"] / bw_peak, peak=bw_source, **labels))
        if r["peak_memory"] is not None:
            figs.append(figure("peak_memory", "bytes", higher_is_better=False, value=r["peak_memory"], **labels))
    return figs


def vision_figures(engines, pixels_one, n_images, repeats, device, notes):
    """Images/s through the vision tower (to the feature layer) and the projector, n_images per call."""
    figs = []
    g = torch.Generator(device=pixels_one.device).manual_seed(1)
    pv = pixels_one + 0.1 * torch.randn(n_images, *pixels_one.shape[1:], device=pixels_one.device,
                                        dtype=pixels_one.dtype, generator=g)
    for engine in engines:
        try:
            times = time_repeats(lambda engine=engine: engine.vision(pv), device=device, repeats=repeats,
                                 warmup=1)
        except Exception as e:
            if not (_is_oom(e) or engine.name == TRANSFORMERS):
                raise
            notes.append(f"{engine.name} vision tower at {n_images} images: {type(e).__name__}: {e}")
            continue
        figs.append(figure("vision_throughput", "images/s", higher_is_better=True,
                           samples=[n_images / t for t in times], engine=engine.name, batch=n_images))
    return figs


def ttft_split_figures(engines, model, context, repeats):
    """The first token of one image request (bench_image_file's image and PROMPT through `stream()`, batch 1),
    split into image preprocessing (file -> pixel_values; LLaVA-NeXT: the image -> its tiles), vision tower +
    projector (LLaVA-NeXT: all tiles as one batch, then the unpadded grid and its newlines), and prefill, from
    the call's last_stats; `ttft_image_request` is preprocessing + time_to_first_token_s. llava-fast engines,
    rounds interleaved as the scenarios are; the first round of each is a warm-up."""
    image = bench_image_file(model)
    ours = [e for e in engines if isinstance(e, LlavaFastEngine)]
    if not ours or model.config.vision is None:
        return []
    parts = {e.name: {k: [] for k in ("ttft_image_preprocess", "ttft_vision", "ttft_prefill", "ttft_image_request")}
             for e in ours}
    for i in range(repeats + 1):
        for engine in ours[i % len(ours):] + ours[: i % len(ours)]:
            ops.use_backend(engine.backend)
            model.compiled = engine.compiled
            for _ in model.stream(PROMPT, image, max_new_tokens=1, ignore_eos=True):
                pass
            st = model.last_stats
            if i == 0:
                continue
            got = parts[engine.name]
            got["ttft_image_preprocess"].append(1e3 * st["image_preprocess_s"])
            got["ttft_vision"].append(1e3 * st["vision_s"])
            got["ttft_prefill"].append(1e3 * st["prefill_s"])
            got["ttft_image_request"].append(1e3 * (st["image_preprocess_s"] + st["time_to_first_token_s"]))
    return [figure(name, "ms", higher_is_better=False, samples=samples, engine=engine, batch=1, context=context)
            for engine, by_name in parts.items() for name, samples in by_name.items()]


def ratio_figures(figs, engine_names):
    """Speed-ups of each engine over each engine listed after it (triton over torch, both over
    transformers): decode and vision throughput ratios, and baseline TTFT / engine TTFT (> 1 = faster).

    The engines ran interleaved, one run each per round, so sample i of both comes from the same round:
    the figure's samples are the per-round ratios (which cancels load that drifts between rounds)."""
    out = []
    pairs = [(a, b) for i, a in enumerate(engine_names) for b in engine_names[i + 1:]]
    names = {"decode_throughput": "decode_speedup", "time_to_first_token": "ttft_speedup",
             "vision_throughput": "vision_speedup"}
    for f in figs:
        if f["name"] not in names:
            continue
        for a, b in pairs:
            if f["labels"]["engine"] != a:
                continue
            other = find_one(figs, f["name"], **{**f["labels"], "engine": b})
            if other is None:
                continue
            mine, theirs = f.get("samples"), other.get("samples")
            if f["name"] == "time_to_first_token":  # lower is better: baseline time over ours
                mine, theirs = theirs, mine
            labels = {**f["labels"], "baseline": b}
            if mine and theirs and len(mine) == len(theirs) and f["name"] != "vision_throughput":
                out.append(figure(names[f["name"]], "x", higher_is_better=True,
                                  samples=[x / y for x, y in zip(mine, theirs)], **labels))
            else:  # vision engines ran one after the other: no rounds to pair
                ratio = (other["value"] / f["value"]) if f["name"] == "time_to_first_token" else (
                    f["value"] / other["value"])
                out.append(figure(names[f["name"]], "x", higher_is_better=True, value=ratio, **labels))
    return out


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------


def markdown(doc: dict) -> str:
    s = doc["settings"]
    figs = doc["figures"]
    engines = s["engines"]
    title = (f"## llava-fast bench generate: {s['model_name']} ({s['dtype']}) on {doc['device']['name']}, "
             f"{s['new_tokens']} new tokens, greedy")
    lines = [title, ""] + [f"- {x}" for x in header_lines(doc)] + [""]
    pairs = [(a, b) for i, a in enumerate(engines) for b in engines[i + 1:]]
    headers = ["batch", "context", "metric"] + engines + [f"{a} / {b}" for a, b in pairs]
    rows = []
    metrics = [("decode_throughput", "decode tokens/s", "decode_speedup"),
               ("decode_bandwidth_pct", "decode, % of the bandwidth roofline", None),
               ("time_to_first_token", "time to first token, ms", "ttft_speedup"),
               ("prefill_throughput", "prefill tokens/s", None),
               ("peak_memory", "peak memory", None)]
    for sc in s["scenarios"]:
        for metric, label, ratio in metrics:
            cells = [find_one(figs, metric, engine=e, **sc) for e in engines]
            if not any(cells):
                continue
            row = [sc["batch"], sc["context"], label] + [fmt(c["value"], c["unit"]) if c else "-" for c in cells]
            for a, b in pairs:
                r = find_one(figs, ratio, engine=a, baseline=b, **sc) if ratio else None
                row.append(fmt(r["value"], "x") if r else "")
            rows.append(row)
    for sc_batch in {f["labels"]["batch"] for f in figs if f["name"] == "vision_throughput"}:
        cells = [find_one(figs, "vision_throughput", engine=e, batch=sc_batch) for e in engines]
        row = [sc_batch, "-", "vision tower + projector, images/s"] + [fmt(c["value"]) if c else "-" for c in cells]
        for a, b in pairs:
            r = find_one(figs, "vision_speedup", engine=a, baseline=b, batch=sc_batch)
            row.append(fmt(r["value"], "x") if r else "")
        rows.append(row)
    lines.append(md_table(headers, rows))
    split = [[e] + [fmt(find_one(figs, name, engine=e)["value"]) for name in TTFT_SPLIT] for e in engines
             if find_one(figs, "ttft_image_request", engine=e)]
    if split:
        lines += ["", "first token of one image request (batch 1, the prompt), ms: preprocessing (file -> "
                      "pixel_values), vision tower + projector, prefill; the total also holds tokenization and setup",
                  "", md_table(["engine", "preprocess", "tower + projector", "prefill", "total"], split)]
    ceilings = doc.get("ceilings")
    if ceilings and "read_bandwidth" in ceilings and s.get("decode_weight_bytes") and any(
            f["name"] == "decode_bandwidth_pct" for f in figs):
        bw, source = peak(ceilings, "read_bandwidth")
        step_mb = s["decode_weight_bytes"] / 1e6
        lines += ["", f"roofline: {step_mb:.1f} MB of weights read per decode step (+ each row's K/V) at the "
                      f"{source} read rate {bw:.1f} GB/s = {1e3 * bw / step_mb:.0f} steps/s at most"]
    compile_times = [f for f in figs if f["name"] == "compile_time"]
    for f in compile_times:
        lines.append(f"compile time ({f['labels']['engine']}, all graphs of the run, paid once per process): "
                     f"{f['value']:.1f} s")
    checks = doc["checks"]
    parity = checks.get("transformers_parity")
    if parity:
        lines += ["", f"transformers parity ({parity['engine']}, last-token logits of the prompt): max |diff| "
                      f"{parity['max_abs_logit_diff']:.2e} (max |logit| {parity['max_abs_logit']:.2f}), same "
                      f"argmax: {parity['same_argmax']}"]
    agreement = checks.get("greedy_agreement") or []
    if agreement:
        worst = min(agreement, key=lambda a: a["agreement"])
        lines.append(f"greedy tokens agreeing with {worst['reference']}: lowest {100 * worst['agreement']:.0f}% "
                     f"({worst['engine']}, batch {worst['batch']}, context {worst['context']}); random weights "
                     "give near-tied logits, so a late divergence is rounding, not a bug")
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
