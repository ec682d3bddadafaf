"""The CPU plan (llava_fast/cpu/plan.py): its choice of decode and prefill paths and threads on every kernel table this
CPU runs and every weight format, that the Decoder and the layers follow it, and that switching tables re-plans."""

import dataclasses

import pytest
import torch
from test_native_decode import text_net

import llava_fast
from llava_fast.cpu import gemv, isa, native_decode, plan
from llava_fast.generate import Decoder

pytestmark = pytest.mark.skipif(not gemv.NATIVE, reason="llava_fast._C not built")
TABLES = [t["name"] for t in gemv._C.cpu_isa_tables() if t["usable"]] if gemv.NATIVE else []
FORMATS = [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8wo"), (torch.float32, "int4wo-32"),
           (torch.bfloat16, "int4wo-32")]


@pytest.fixture
def table(request):
    gemv._C.use_cpu_isa(request.param)
    yield request.param
    gemv._C.use_cpu_isa("best")


def expected_prefill(table, family, dtype, quantize):
    # Independent of plan.py: float32 models with float32, int8 or int4 weights on the AVX-512 and AVX2 tables'
    # tiles and GEMMs; bfloat16 models with bfloat16 weights on those tables' multi-row bfloat16 kernels
    if dtype == torch.bfloat16 and quantize is None:
        return "native" if family in ("avx512", "avx2") else "torch"
    fits = dtype == torch.float32 and quantize in (None, "int8wo", "int4wo-32")
    return "native" if fits and family in ("avx512", "avx2") else "torch"


@pytest.mark.parametrize("table", TABLES, indirect=True)
@pytest.mark.parametrize("dtype, quantize", FORMATS)
def test_each_table_and_format(table, dtype, quantize):
    net = text_net(dtype, quantize, hidden_size=96, intermediate_size=160)  # 96: a multiple of int4's group 32
    family = gemv._C.cpu_isa()
    made = plan.for_model(net)
    assert made.table == table and made.threads == torch.get_num_threads() and made.gemv
    assert made.weights == {None: str(dtype).removeprefix("torch."), "int8wo": "int8",
                            "int4wo-32": "int4-32 (lm_head int8)"}[quantize]
    # A SIMD CPU decodes natively on every table, scalar forced included (the reference)
    assert (made.decode, made.decode_why) == ("native", f"one native call per step on the {table} table")
    assert made.prefill == expected_prefill(table, family, dtype, quantize), made
    assert made.prefill_bf16 == gemv.PREFILL_BF16
    assert all(m.plan is made for m in net.modules() if isinstance(m, gemv.GemvLinear))
    dec = Decoder(net, 1, 40)
    assert dec.plan is made and dec.native is native_decode.for_model(net)


@pytest.mark.parametrize("prefill", ["native", "torch"])
def test_the_decoder_prefills_where_the_plan_says(monkeypatch, prefill):
    net = text_net(hidden_size=96, intermediate_size=160)
    plan.use(net, dataclasses.replace(plan.for_model(net), prefill=prefill, threads=1))
    calls = []
    step = native_decode.for_model(net)
    monkeypatch.setattr(step, "prefill", lambda *a: calls.append(a[-1]) or torch.zeros(1, 301), raising=False)
    dec = Decoder(net, 1, 40)
    dec.prefill_slot(0, [3, 1, 4, 1, 5])
    dec.prefill([[2, 7, 1]])
    assert calls == ([1, 1] if prefill == "native" else [])  # with the plan's thread count


def test_switching_the_table_makes_a_new_plan_and_keeps_it():
    net = text_net()
    first = plan.for_model(net)
    assert plan.for_model(net) is first and llava_fast.random_model("tiny").cpu_plan.table == first.table
    gemv._C.use_cpu_isa("scalar")
    try:
        scalar = plan.for_model(net)
        assert scalar.table == "scalar" and scalar.prefill == "torch" and "no tiles" in scalar.prefill_why
        assert plan.for_model(net) is scalar and Decoder(net, 1, 8).plan is scalar
    finally:
        gemv._C.use_cpu_isa("best")
    assert plan.for_model(net) == first


def test_torch_decodes_under_compile_the_environment_switch_and_a_scalar_only_cpu(monkeypatch):
    net = text_net()
    made = plan.make(net, compile=True)
    assert (made.decode, made.prefill, made.compile, made.gemv) == ("torch", "torch", True, True)
    assert "compile" in made.decode_why  # eager calls outside the traced steps still take the GEMV
    monkeypatch.setenv("LLAVA_FAST_NATIVE_DECODE", "0")
    made = plan.make(net)
    assert made.decode == "torch" and "LLAVA_FAST_NATIVE_DECODE=0" in made.decode_why
    assert Decoder(text_net(), 1, 8).native is None  # prepared (planned) with the variable set
    monkeypatch.delenv("LLAVA_FAST_NATIVE_DECODE")
    monkeypatch.setattr(isa, "best_for_this_cpu", lambda: "scalar")
    made = plan.make(net)
    assert made.decode == "torch" and "best table is scalar" in made.decode_why and made.gemv
    net16 = text_net().to(torch.float16)  # a dtype the native step does not take
    made = plan.make(net16)
    assert made.decode == "torch" and made.decode_why == native_decode.why_not(net16)


def test_threads_are_torchs_at_load_and_the_torch_step_runs_its_ops_on_one(monkeypatch):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = text_net(quantize="int8wo")
    finally:
        torch.set_num_threads(saved)
    made = plan.for_model(net)
    assert made.threads == 1 and net.lm_head.threads == 1
    plan.use(net, dataclasses.replace(made, threads=3, decode="torch"))
    seen = []
    real_gemv = gemv._C.gemv
    monkeypatch.setattr(gemv._C, "gemv", lambda *a: seen.append((a[-1], torch.get_num_threads())) or real_gemv(*a))
    torch.set_num_threads(2)
    try:
        dec = Decoder(net, 1, 16)
        assert dec.native is None
        dec.lengths.fill_(4)
        dec.step(torch.tensor([5]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    assert seen and set(seen) == {(3, 1)}  # every GEMV on the plan's 3 threads, torch's ops on 1
