"""A peer engine (llama.cpp, transformers) in a process of its own, so that its crash is a result, not the end of
the benchmark: llama-cpp-python 0.3.36 built natively on a CPU with AMX (Sapphire Rapids) segfaults on Q8_0
weights, and in the benchmark's process that ended the whole run.

In: `ChildEngine(factory, args, threads, import_path)`: factory "module:function" (a function of this file when
the module is empty), called in the child with `args` and returning (run, weight_bytes or None[, ran_on]), run(ids) ->
(ttft_s, decode_s, tokens), ran_on: the instruction sets the engine uses (kept as `ChildEngine.ran_on`). Out:
calling the ChildEngine runs `run` in the child; a child that dies raises
PeerCrashed naming its signal ("crashed (signal 11)"), one whose factory raised raises PeerFailed.

The child is this file run as a script (stdlib only at the top), not a multiprocessing spawn: a spawn imports
the parent's main module and this package, torch included (50 s of a loaded 2-core machine), even for llama.cpp,
which needs none of it. Requests and results are JSON lines on stdin and on the child's own copy of stdout;
the child's fd 1 points at its stderr, so a library's prints cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


class PeerCrashed(Exception):
    """A peer's process died (a signal or an exit) while loading or generating."""


class PeerFailed(Exception):
    """A peer raised an error while loading (not importable, a bad file): reported as a skipped engine."""


class ChildEngine:
    def __init__(self, factory: str, args, threads: int, import_path: str | None = None):
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, env=env, text=True)
        self._send({"factory": factory, "args": list(args), "threads": threads, "import_path": import_path})
        # what the factory counted (transformers'), else None; what the engine says it runs on, else None
        self.weight_bytes, self.ran_on = self._receive()

    def _send(self, message):
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: _receive says how it died

    def _receive(self):
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise PeerCrashed(f"crashed (signal {-code})" if code < 0 else f"exited with status {code}")
        message = json.loads(line)
        if "error" in message:
            self.close()
            raise PeerFailed(message["error"])
        return message["result"]

    def __call__(self, ids):
        self._send({"ids": list(ids)})
        ttft, decode_s, tokens = self._receive()
        return ttft, decode_s, tokens

    def close(self):
        if self.process.poll() is None:
            self._send(None)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()


# ------------------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python); transformers' engine is real_bench.transformers_engine
# ------------------------------------------------------------------------------------------------------


def llama_cpp_engine(path, threads, new_tokens, context):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context + new_tokens + 8,
                          n_batch=512, verbose=False)

    def run(ids):
        # reset(): generate() alone keeps the KV cache of the longest common prefix with the last call (even
        # with reset=True), so every round after the first would prefill one token and report ~10x the rate.
        llm.reset()
        t0 = time.perf_counter()
        tokens, t1 = [], None
        for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            tokens.append(tok)
            if t1 is None:
                t1 = time.perf_counter()
            if len(tokens) == new_tokens:
                break
        return t1 - t0, time.perf_counter() - t1, tokens
    flags = llama_cpp.llama_print_system_info().decode().replace("|", " ").split()  # "AVX2 = 1 | AMX_INT8 = 0 ..."
    ran_on = "ggml " + " ".join(flags[i - 1] for i in range(1, len(flags) - 1)
                                if flags[i] == "=" and flags[i + 1] == "1")
    return run, None, ran_on


def _child():
    import importlib

    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # bench/ itself: its cli.py, schema.py, ... must not shadow other modules
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # prints of the engine's libraries go to stderr
    spec = json.loads(sys.stdin.readline())
    if spec["import_path"]:
        sys.path.insert(0, spec["import_path"])
    try:
        module, _, function = spec["factory"].partition(":")
        factory = globals()[function] if not module else getattr(importlib.import_module(module), function)
        run, weight_bytes, *ran_on = factory(*spec["args"])
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=protocol, flush=True)
        return
    print(json.dumps({"result": [weight_bytes, ran_on[0] if ran_on else None]}), file=protocol, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request is None:
            return
        print(json.dumps({"result": list(run(request["ids"]))}), file=protocol, flush=True)


if __name__ == "__main__":
    _child()
