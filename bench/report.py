"""Results: figures with units, the JSON document, markdown tables, the optional plot, and `compare`.

A figure is one measured or derived number with its unit, its direction (higher or lower is better), the
labels that say what it is (engine, batch, context, kernel, ...), and, when measured, its raw samples and
their order statistics. The document layout is specified in bench/SCHEMA.md and checked by
llava_fast.bench.schema.validate.
"""

from __future__ import annotations

import json
import math
import os

from llava_fast.bench.timing import relative_spread, summarize

SCHEMA_VERSION = "llava-fast-bench/1"


def figure(name: str, unit: str, *, higher_is_better: bool, samples=None, value=None, **labels) -> dict:
    """A figure from raw samples (value = their median) or from one derived value (ratios, formulas)."""
    if (samples is None) == (value is None):
        raise ValueError("give samples or value, not both")
    fig = {"name": name, "unit": unit, "higher_is_better": higher_is_better, "labels": labels}
    if samples is not None:
        samples = [float(s) for s in samples]
        fig["stats"] = summarize(samples)
        fig["value"] = fig["stats"]["median"]
        fig["samples"] = samples
    else:
        fig["value"] = float(value)
    return fig


def figure_key(fig: dict) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(fig["labels"].items()))
    return f"{fig['name']}[{labels}]"


def find(figures, name, **labels):
    """The figures named `name` whose labels include all of `labels`."""
    return [f for f in figures if f["name"] == name and all(f["labels"].get(k) == v for k, v in labels.items())]


def find_one(figures, name, **labels):
    hits = find(figures, name, **labels)
    return hits[0] if len(hits) == 1 else None


def new_document(kind: str, command: str, settings: dict) -> dict:
    from llava_fast.bench.device import git_commit, software_versions, utc_now

    return {"schema": SCHEMA_VERSION, "kind": kind, "created_utc": utc_now(), "command": command,
            "commit": git_commit(), "software": software_versions(), "device": None, "settings": settings,
            "ceilings": None, "telemetry": None, "figures": [], "checks": {}, "notes": []}


def default_json_path(doc: dict) -> str:
    from llava_fast.bench.device import device_slug

    stamp = doc["created_utc"].replace(":", "").replace("-", "").replace("T", "-").rstrip("Z")
    subject = doc["settings"].get("model_name") or doc["settings"].get("preset") or "model"
    subject = "".join(c if c.isalnum() or c in "-._" else "-" for c in str(subject))
    return os.path.join("bench-results", f"{doc['kind']}-{subject}-{device_slug(doc['device'])}-{stamp}.json")


def write_json(doc: dict, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "bytes":
        return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"
    if unit == "%":
        return f"{value:.1f}%"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def header_lines(doc: dict) -> list[str]:
    d, s = doc["device"], doc["settings"]
    commit = doc["commit"].get("sha") or "unknown"
    dirty = " (uncommitted changes)" if doc["commit"].get("dirty") else ""
    lines = [f"device: {d['name']} ({d['type']}); torch {doc['software']['torch']}; commit {commit[:12]}{dirty}"]
    c = doc.get("ceilings")
    if c:
        bw, mm = c["bandwidth"], c["matmul"]
        sheet = (f"; datasheet ({c['datasheet_model']}) {fmt(bw['datasheet'])} GB/s, {fmt(mm['datasheet'])} "
                 f"TFLOP/s bf16") if c.get("datasheet_model") else ""
        lines.append(f"measured ceilings: copy {fmt(bw['measured'])} GB/s, {mm['dtype']} matmul "
                     f"{fmt(mm['measured'])} TFLOP/s{sheet}")
    if d["type"] == "cpu" and d["host"].get("load_average"):
        end = d["host"].get("load_average_end")
        lines.append(f"host load average (1 min): {d['host']['load_average'][0]:.2f} at start"
                     + (f", {end[0]:.2f} at end" if end else "") + f", on {d['host']['cores']} cores")
    if s.get("repeats"):
        lines.append(f"median of {s['repeats']} repeats after {s.get('warmup', 1)} warm-up")
    return lines


# ------------------------------------------------------------------------------------------------------
# Plot (optional matplotlib)
# ------------------------------------------------------------------------------------------------------


def plot_generate(doc: dict, path: str) -> str | None:
    """Decode tokens/s against batch size (at the first context) and against context (at batch 1), one
    line per engine. Returns a note when the plot could not be made (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no plot written to {path}: matplotlib is not installed (pip install matplotlib)"
    figs = find(doc["figures"], "decode_throughput")
    engines = list(dict.fromkeys(f["labels"]["engine"] for f in figs))
    base_context = doc["settings"]["contexts"][0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for engine in engines:
        by_batch = sorted((f["labels"]["batch"], f["value"]) for f in figs
                          if f["labels"]["engine"] == engine and f["labels"]["context"] == base_context)
        by_context = sorted((f["labels"]["context"], f["value"]) for f in figs
                            if f["labels"]["engine"] == engine and f["labels"]["batch"] == 1)
        if by_batch:
            ax1.plot(*zip(*by_batch), marker="o", label=engine)
        if by_context:
            ax2.plot(*zip(*by_context), marker="o", label=engine)
    ax1.set(xlabel="batch size", ylabel="decode tokens/s", title=f"context {base_context}")
    ax1.set_xscale("log", base=2)
    ax2.set(xlabel="context (tokens)", ylabel="decode tokens/s", title="batch 1")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"llava-fast bench generate: {doc['settings'].get('model_name')} on {doc['device']['name']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------------
# Compare
# ------------------------------------------------------------------------------------------------------


def compare(a: dict, b: dict, threshold: float = 0.05) -> dict:
    """Per-figure change from A to B and a verdict.

    delta = (B - A) / |A|. A figure's noise is the larger relative interquartile range of its two runs,
    doubled; the change counts when |delta| exceeds max(threshold, noise). Verdict: 'regression' when it
    moved the worse way (lower for higher_is_better figures), 'improvement' the better way, 'within noise'
    otherwise. Figures present in only one file are listed, not judged.
    """
    fa = {figure_key(f): f for f in a["figures"]}
    fb = {figure_key(f): f for f in b["figures"]}
    rows = []
    for key in fa.keys() & fb.keys():
        x, y = fa[key], fb[key]
        if x["unit"] != y["unit"]:
            rows.append({"key": key, "unit": f"{x['unit']} vs {y['unit']}", "a": x["value"], "b": y["value"],
                         "delta": None, "noise": None, "verdict": "unit mismatch"})
            continue
        if x["value"] == 0:
            delta = 0.0 if y["value"] == 0 else math.copysign(math.inf, y["value"])
        else:
            delta = (y["value"] - x["value"]) / abs(x["value"])
        noise = 2 * max(relative_spread(x.get("stats")), relative_spread(y.get("stats")))
        bar = max(threshold, noise)
        better = delta > 0 if x["higher_is_better"] else delta < 0
        verdict = "within noise" if abs(delta) <= bar else ("improvement" if better else "regression")
        rows.append({"key": key, "unit": x["unit"], "a": x["value"], "b": y["value"], "delta": delta,
                     "noise": noise, "verdict": verdict})
    order = {"regression": 0, "improvement": 1, "unit mismatch": 2, "within noise": 3}
    rows.sort(key=lambda r: (order[r["verdict"]], r["key"]))
    warnings = []
    if a["device"]["name"] != b["device"]["name"]:
        warnings.append(f"different devices: {a['device']['name']} vs {b['device']['name']}")
    if a["kind"] != b["kind"]:
        warnings.append(f"different kinds of result: {a['kind']} vs {b['kind']}")
    for k in sorted((set(a["settings"]) | set(b["settings"])) - {"wall_s"}):
        if a["settings"].get(k) != b["settings"].get(k):
            warnings.append(f"settings differ: {k} = {a['settings'].get(k)!r} vs {b['settings'].get(k)!r}")
    return {"rows": rows, "only_a": sorted(fa.keys() - fb.keys()), "only_b": sorted(fb.keys() - fa.keys()),
            "warnings": warnings, "threshold": threshold,
            "regressions": sum(r["verdict"] == "regression" for r in rows)}


def compare_markdown(result: dict, name_a: str, name_b: str) -> str:
    lines = [f"## llava-fast bench compare: A = {name_a}, B = {name_b}", ""]
    lines += [f"warning: {w}" for w in result["warnings"]]
    rows = [[r["key"], r["unit"], fmt(r["a"], r["unit"]), fmt(r["b"], r["unit"]),
             "-" if r["delta"] is None else f"{100 * r['delta']:+.1f}%",
             "-" if r["noise"] is None else f"{100 * max(result['threshold'], r['noise']):.1f}%",
             r["verdict"].upper() if r["verdict"] == "regression" else r["verdict"]] for r in result["rows"]]
    lines += ["", md_table(["figure", "unit", "A", "B", "change", "bar", "verdict"], rows), ""]
    if result["only_a"]:
        lines.append(f"only in A ({len(result['only_a'])}): " + ", ".join(result["only_a"]))
    if result["only_b"]:
        lines.append(f"only in B ({len(result['only_b'])}): " + ", ".join(result["only_b"]))
    n = len(result["rows"])
    lines.append(f"{result['regressions']} regression(s) beyond noise among {n} common figures "
                 f"(bar = max({100 * result['threshold']:.0f}%, 2 x relative IQR))")
    return "\n".join(lines)
