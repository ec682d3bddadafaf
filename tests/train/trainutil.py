"""Helpers of the trainer tests: LLaVA-format records and data files."""

import json

import numpy as np


def make_records(n, *, text_only_every=4, turns=1, answer_words=(3, 9), seed=0):
    """n distinct conversations; every `text_only_every`-th has no image (0: all have one)."""
    rng = np.random.default_rng(seed)
    words = ["red", "bus", "cat", "tree", "sky", "blue", "green", "dog", "house", "river", "car", "bird"]
    records = []
    for i in range(n):
        conv = []
        for t in range(turns):
            q = f"Question {i}.{t}: what is the {words[(i + t) % len(words)]} doing?"
            a = " ".join(rng.choice(words, size=int(rng.integers(*answer_words)))) + f" number {i}."
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        record = {"id": f"r{i}", "conversations": conv}
        if not (text_only_every and i % text_only_every == text_only_every - 1):
            record["image"] = f"img{i % 4}.png"
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        records.append(record)
    return records


def write_data(path, records):
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)
