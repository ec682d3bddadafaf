"""The result document's schema (documented in bench/SCHEMA.md) and its validator.

SCHEMA is JSON Schema (draft 2020-12), restricted to the keywords `validate` implements (type, required,
properties, additionalProperties, items, enum, const, minimum, minItems), so the check needs no
`jsonschema` package. `validate` adds the checks JSON Schema cannot express: units by name, finite values,
order statistics consistent with the samples, unique figure keys, labels of each figure kind.
"""

from __future__ import annotations

import math

from llava_fast.bench.report import SCHEMA_VERSION, figure_key

# "1": dimensionless
UNITS = ("ms", "s", "tokens/s", "requests/s", "images/s", "bytes", "GB/s", "TFLOP/s", "%", "x", "1")

# name -> (unit, higher_is_better, required labels)
FIGURES = {
    # generate
    "time_to_first_token": ("ms", False, ("engine", "batch", "context")),
    "prefill_throughput": ("tokens/s", True, ("engine", "batch", "context")),
    "decode_throughput": ("tokens/s", True, ("engine", "batch", "context")),
    "decode_bandwidth": ("GB/s", True, ("engine", "batch", "context")),
    "decode_bandwidth_pct": ("%", True, ("engine", "batch", "context", "peak")),
    "peak_memory": ("bytes", False, ("engine", "batch", "context")),
    "vision_throughput": ("images/s", True, ("engine", "batch")),
    "decode_speedup": ("x", True, ("engine", "baseline", "batch", "context")),
    "ttft_speedup": ("x", True, ("engine", "baseline", "batch", "context")),
    "vision_speedup": ("x", True, ("engine", "baseline", "batch")),
    "host_peak_rss": ("bytes", False, ("scope",)),
    "ttft_image_preprocess": ("ms", False, ("engine", "batch", "context")),
    "ttft_vision": ("ms", False, ("engine", "batch", "context")),
    "ttft_prefill": ("ms", False, ("engine", "batch", "context")),
    "ttft_image_request": ("ms", False, ("engine", "batch", "context")),
    # real (also uses the generate figures above)
    "perplexity": ("1", False, ("engine", "tokens")),
    "top1_agreement": ("%", True, ("engine", "baseline", "tokens")),
    # kernels
    "kernel_time": ("ms", False, ("kernel", "impl", "shape", "dtype")),
    "kernel_tflops": ("TFLOP/s", True, ("kernel", "impl", "shape", "dtype")),
    "kernel_bandwidth": ("GB/s", True, ("kernel", "impl", "shape", "dtype")),
    "kernel_pct_of_peak": ("%", True, ("kernel", "impl", "shape", "dtype", "bound", "peak")),
    "kernel_speedup": ("x", True, ("kernel", "impl", "baseline", "shape", "dtype")),
    # train
    "train_step_time": ("ms", False, ("stage", "engine", "batch", "seq_len")),
    "train_throughput": ("tokens/s", True, ("stage", "engine", "batch", "seq_len")),
    "train_mfu": ("%", True, ("stage", "engine", "batch", "seq_len", "peak")),
    "train_peak_memory": ("bytes", False, ("stage", "engine", "batch", "seq_len")),
    "train_speedup": ("x", True, ("stage", "engine", "baseline", "batch", "seq_len")),
    "train_fwd_bwd_peak_memory": ("bytes", False, ("stage", "engine", "batch", "seq_len")),
    # serve
    "serve_request_throughput": ("requests/s", True, ("engine", "clients")),
    "serve_output_throughput": ("tokens/s", True, ("engine", "clients")),
    "serve_ttft": ("ms", False, ("engine", "clients", "image")),
    "serve_ttft_p99": ("ms", False, ("engine", "clients", "image")),
    "serve_itl_p50": ("ms", False, ("engine", "clients")),
    "serve_itl_p99": ("ms", False, ("engine", "clients")),
    "serve_speedup": ("x", True, ("engine", "baseline", "clients")),
    "serve_ttft_repeated_over_new": ("x", False, ("engine", "clients")),
    "serve_rss_idle": ("bytes", False, ("engine", "clients")),
    "serve_rss_peak": ("bytes", False, ("engine", "clients")),
    "serve_weights": ("bytes", False, ("engine", "clients")),
    "serve_kv_live_at_peak": ("bytes", False, ("engine", "clients")),
    "serve_rss_overhead": ("bytes", False, ("engine", "clients")),
    "serve_rss_idle_overhead": ("bytes", False, ("engine", "clients")),
    # --against: llava-fast's figure over the other server's, at the same client count
    "serve_ratio_output_throughput": ("x", True, ("engine", "baseline", "clients")),
    "serve_ratio_ttft_p50": ("x", False, ("engine", "baseline", "clients")),
    "serve_ratio_ttft_p99": ("x", False, ("engine", "baseline", "clients")),
    "serve_ratio_itl_p50": ("x", False, ("engine", "baseline", "clients")),
    "serve_ratio_itl_p99": ("x", False, ("engine", "baseline", "clients")),
}

_NUM = {"type": "number"}
_STATS = {
    "type": "object",
    "required": ["median", "q1", "q3", "min", "max", "n"],
    "properties": {"median": _NUM, "q1": _NUM, "q3": _NUM, "min": _NUM, "max": _NUM,
                   "n": {"type": "integer", "minimum": 1}},
    "additionalProperties": False,
}
_FIGURE = {
    "type": "object",
    "required": ["name", "unit", "value", "higher_is_better", "labels"],
    "properties": {
        "name": {"type": "string", "enum": sorted(FIGURES)},
        "unit": {"type": "string", "enum": list(UNITS)},
        "value": _NUM,
        "higher_is_better": {"type": "boolean"},
        "labels": {"type": "object", "additionalProperties": {"type": ["string", "integer", "number", "null"]}},
        "stats": _STATS,
        "samples": {"type": "array", "items": _NUM, "minItems": 1},
    },
    "additionalProperties": False,
}
_CEILING = {
    "type": "object",
    "required": ["unit", "measured", "stats", "method", "datasheet"],
    "properties": {"unit": {"type": "string"}, "measured": _NUM, "stats": _STATS, "method": {"type": "string"},
                   "datasheet": {"type": ["number", "null"]}, "dtype": {"type": "string"}},
    "additionalProperties": False,
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llava-fast bench result",
    "type": "object",
    "required": ["schema", "kind", "created_utc", "command", "commit", "software", "device", "settings",
                 "ceilings", "telemetry", "figures", "checks", "notes"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "kind": {"enum": ["generate", "kernels", "gemv", "train", "real", "serve"]},
        "created_utc": {"type": "string"},
        "command": {"type": "string"},
        "commit": {"type": "object", "required": ["sha", "dirty"],
                   "properties": {"sha": {"type": ["string", "null"]}, "dirty": {"type": ["boolean", "null"]}}},
        "software": {"type": "object", "required": ["python", "torch", "triton", "transformers", "llava-fast"],
                     "additionalProperties": {"type": ["string", "integer", "null"]}},
        "device": {
            "type": "object", "required": ["type", "name", "host"],
            "properties": {
                "type": {"enum": ["cpu", "cuda"]}, "name": {"type": "string"},
                "host": {"type": "object", "required": ["cpu", "cores", "torch_threads"]},
                "gpu": {"type": "object", "required": ["name", "capability", "sm_count", "memory_total_bytes",
                                                       "driver"]},
            },
        },
        "settings": {"type": "object", "required": ["device", "dtype", "repeats", "warmup"]},
        "ceilings": {"type": "object", "required": ["bandwidth", "matmul", "datasheet_model"],
                     "properties": {"bandwidth": _CEILING, "matmul": _CEILING, "read_bandwidth": _CEILING,
                                    "datasheet_model": {"type": ["string", "null"]}},
                     "additionalProperties": False},
        "telemetry": {"type": "object", "required": ["available", "reason", "interval_s", "static", "summary",
                                                     "samples"],
                      "properties": {"available": {"type": "boolean"}, "reason": {"type": ["string", "null"]},
                                     "interval_s": _NUM, "static": {"type": "object"},
                                     "summary": {"type": "object", "additionalProperties": _STATS},
                                     "samples": {"type": "array", "items": {"type": "object"}}}},
        "figures": {"type": "array", "items": _FIGURE, "minItems": 1},
        "checks": {"type": "object"},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value, name):
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def check(value, schema, path="$") -> list[str]:
    """Errors of `value` against the JSON Schema subset used in SCHEMA."""
    errors = []
    if "const" in schema and value != schema["const"]:
        return [f"{path}: expected {schema['const']!r}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(value).__name__}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required field {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, sub in value.items():
            if key in props:
                errors += check(sub, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                errors += check(sub, extra, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += check(item, schema["items"], f"{path}[{i}]")
    return errors


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_figure(f, path) -> list[str]:
    errors = []
    unit, higher, labels = FIGURES[f["name"]]
    if f["unit"] != unit:
        errors.append(f"{path}: {f['name']} is measured in {unit!r}, not {f['unit']!r}")
    if f["higher_is_better"] is not higher:
        errors.append(f"{path}: {f['name']} has higher_is_better={higher}")
    missing = [k for k in labels if k not in f["labels"]]
    if missing:
        errors.append(f"{path}: {f['name']} lacks labels {missing}")
    if not _finite(f["value"]):
        errors.append(f"{path}: value {f['value']!r} is not a finite number")
    elif f["value"] < 0 or (f["value"] == 0 and f["unit"] not in ("bytes", "%")):
        errors.append(f"{path}: {f['name']} = {f['value']} is not positive")
    if ("stats" in f) != ("samples" in f):
        errors.append(f"{path}: stats and samples come together")
    if "stats" in f and "samples" in f:
        s, xs = f["stats"], sorted(f["samples"])
        if not all(_finite(x) for x in xs):
            errors.append(f"{path}: non-finite sample")
            return errors
        if s["n"] != len(xs):
            errors.append(f"{path}: stats.n = {s['n']} but {len(xs)} samples")
        if not (s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]):
            errors.append(f"{path}: stats out of order (min <= q1 <= median <= q3 <= max)")
        if xs and (not math.isclose(s["min"], xs[0], rel_tol=1e-9) or not math.isclose(s["max"], xs[-1], rel_tol=1e-9)):
            errors.append(f"{path}: stats min/max do not match the samples")
        if not math.isclose(f["value"], s["median"], rel_tol=1e-9):
            errors.append(f"{path}: value {f['value']} is not the median {s['median']}")
    return errors


def validate(doc) -> list[str]:
    """All the ways `doc` departs from the schema; an empty list means valid."""
    errors = check(doc, SCHEMA)
    if errors or not isinstance(doc, dict):
        return errors
    seen = {}
    for i, f in enumerate(doc["figures"]):
        errors += _check_figure(f, f"$.figures[{i}]")
        key = figure_key(f)
        if key in seen:
            errors.append(f"$.figures[{i}]: duplicate of figures[{seen[key]}] ({key})")
        seen.setdefault(key, i)
    for which in ("bandwidth", "matmul"):
        c = doc["ceilings"][which]
        if not (_finite(c["measured"]) and c["measured"] > 0):
            errors.append(f"$.ceilings.{which}.measured: not a positive number")
    if doc["device"]["type"] == "cuda" and "gpu" not in doc["device"]:
        errors.append("$.device: a cuda result needs the gpu section")
    return errors
