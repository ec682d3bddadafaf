"""Reading and writing the pipelines' files: JSON lines in (every bad line named by its number), JSON and JSON
lines out (a JSON output is rewritten atomically, so a crash leaves the previous complete file; a JSON-lines
output is appended line by line and flushed, so a crash loses at most the line being written).

In: paths. Out: lists of (line number, dict), or files on disk. Errors: llava_fast.InputError naming the file
and the line.
"""

from __future__ import annotations

import csv
import json
import os

from llava_fast.checkpoints.config import read_json as read_checkpoint_json
from llava_fast.errors import CheckpointError, InputError


def read_jsonl(path, what="input"):
    """[(line number, object), ...] of a JSON-lines file; blank lines are skipped. InputError for a missing
    file, a line that is not JSON, or a line that is not a JSON object, with the line number."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{what} {path} line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{what} {path} line {lineno}: expected a JSON object, got "
                                     f"{type(obj).__name__}")
                rows.append((lineno, obj))
    except FileNotFoundError:
        raise InputError(f"{what} {path}: file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 text ({e.reason})") from None
    return rows


def read_json(path, what="input"):
    """A whole JSON file; InputError naming the flag and the file (config.read_json reads it)."""
    try:
        return read_checkpoint_json(path)
    except CheckpointError as e:
        raise InputError(f"{what}: {e}") from None


def read_table(path, what="input"):
    """Rows (line number, dict) of a JSON-lines, CSV, or JSON-list file, chosen by the extension (.csv, .json;
    anything else is read as JSON lines). For CSV the line number is the row's first line."""
    if path.endswith(".json"):
        data = read_json(path, what)
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise InputError(f"{what} {path}: expected a JSON list of objects")
        return [(i + 1, x) for i, x in enumerate(data)]  # "line" = position in the list, 1-based
    if path.endswith(".csv"):
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                return [(reader.line_num, dict(row)) for row in reader]
        except FileNotFoundError:
            raise InputError(f"{what} {path}: file not found") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputError(f"{what} {path}: not a readable CSV file ({e})") from None
    return read_jsonl(path, what)


def write_json_atomic(path, obj):
    """Write to PATH.tmp, fsync, rename over PATH: readers see the old file or the new one, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlAppender:
    """Append one JSON object per line, flushed after each: resumable outputs (answers, reviews)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, obj):
        self.file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def done_keys(path, key, what="output"):
    """The `key` values of the records already in a JSON-lines output (resume); empty if it does not exist."""
    if not os.path.exists(path):
        return set()
    return {obj.get(key) for _, obj in read_jsonl(path, what)}
