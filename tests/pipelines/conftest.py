"""Fixtures of the pipeline tests: the original LLaVA code (PyPI llava-torch 1.2.2.post1, installed --no-deps
into a test cache, run as plain scripts), and a CLI runner that captures exit code and stderr."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # openai_stub
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # checkpoints

CACHE = os.path.expanduser(os.environ.get("LLAVA_FAST_TEST_CACHE", "~/.cache/llava-fast-tests"))


@pytest.fixture(scope="session")
def llava_original():
    """The directory of the original `llava` package (its eval scripts import only the standard library,
    numpy and, for the GPT review, the pre-1.0 openai API that the tests fake)."""
    target = os.path.join(CACHE, "llava-torch-1.2.2.post1")
    package = os.path.join(target, "llava")
    if not os.path.isfile(os.path.join(package, "eval", "eval_science_qa.py")):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                            "llava-torch==1.2.2.post1"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip("the original LLaVA code (PyPI llava-torch==1.2.2.post1) could not be installed; is the "
                        f"package registry reachable? {r.stderr.strip()[-300:]}")
    return package


@pytest.fixture
def cli(capsys):
    """cli("make-data", ...) -> (exit code, stdout, stderr) of llava_fast.cli.main in this process."""
    from llava_fast.cli import main

    def run(*argv):
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the models here are tiny, and on a shared 2-core machine a second thread mostly
    waits at barriers (see tests/train/conftest.py)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
