import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. triton.jit reads this when a kernel is
# decorated, so it must be set before any llava_fast.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n auto`: one worker per core) each worker computes on one thread, and so do
# the processes it starts (CLI runs, servers, peers), which read OMP_NUM_THREADS: two workers of two threads each
# on a 2-core machine made every step wait on a preempted thread. A test about threads sets its own count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import pytest  # noqa: E402

# Real data this project did not write (tokenizer, LLaVA's images, configs, LLaVA-Bench, the paper's prompts);
# tests/data/README.md gives each file's source and licence.
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="session")
def reference_dir():
    return DATA


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run the test on the torch path and again with the Triton kernels (the interpreter on a CPU)."""
    from llava_fast import ops

    before = ops.BACKEND
    ops.use_backend(request.param)
    yield request.param
    ops.use_backend(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.py runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
