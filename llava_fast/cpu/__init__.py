"""The CPU native path, Python side: which native kernels run for a loaded model, and their torch references.

In: a model in its compute dtype (float32 / bfloat16), optionally a weight-only quantization scheme. Out: the
same model with its linear layers packed for the native kernels (csrc/, the extension llava_fast._C) and a decode
step that runs a whole decoder step in one native call. Every native kernel is tested against the torch
reference kept beside its wrapper.

    gemv.py           `GemvLinear`: packed weights (float32, bfloat16, int8, int4), the few-row GEMV, its reference
    native_decode.py  the decode step and prefill as one native call (csrc/decode.cpp), and when it may run
    plan.py           `CpuPlan`: per loaded model, the table, the decode and prefill paths, the threads, and why
    isa.py            which kernel table runs (`llava_fast.cpu_isa()`), LLAVA_FAST_CPU_ISA's check
    quantize.py       weight-only int8 / int4 quantization (torchao's parameters) onto GemvLinear
    vision.py         the CLIP tower's quick_gelu in place on the native kernels (csrc/vision.cpp)
"""
