"""`bench real`'s record of the cores behind each of our prefills: this process's, and other processes' (a
prefill slowed by other work on the host is told apart from a slower kernel)."""

import math
import sys
import types

import pytest
import torch
from test_native_decode import text_net

from llava_fast.bench.real_bench import host_busy_seconds, llava_engine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")


def test_host_busy_seconds_grows_with_work():
    before = host_busy_seconds()
    x = torch.randn(256, 256)
    for _ in range(200):  # ~0.1 s of work on this process's threads
        x = torch.tanh(x @ x)
    assert host_busy_seconds() - before > 0.02


def test_each_prefill_records_the_cores_it_ran_on():
    run = llava_engine(types.SimpleNamespace(net=text_net()), 3)
    ids = torch.randint(0, 301, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    for rounds in (1, 2):
        ttft, decode_s, tokens = run(ids)
        assert ttft > 0 and decode_s > 0 and len(tokens) == 3
        assert len(run.prefill_cores) == rounds
    for ours, others in run.prefill_cores:  # no upper bound: over a ~ms prefill the per-thread CPU clocks are coarse
        assert ours > 0 and others >= 0 and math.isfinite(ours + others)
