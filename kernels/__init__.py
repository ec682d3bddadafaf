"""Triton kernels for llava-fast, installed as `llava_fast.kernels`.

One kernel family per file: the @triton.jit kernels, their launchers, the autograd.Function wrapper where
training needs a backward, and a pointer to the torch reference in `llava_fast.ops` they are tested
against. Each family module exports `TRITON_OPS`, a dict from an op name in `llava_fast.ops.OP_NAMES` to
its Triton implementation (same signature, same semantics); `TRITON_OPS` here merges them and is what
`llava_fast.ops.use_backend("triton")` installs.
"""

import importlib

FAMILIES = ("norms", "activations", "attention", "patch_embed", "splice", "cross_entropy")

TRITON_OPS = {}
for _family in FAMILIES:
    try:
        _module = importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as e:  # a family not written yet; the torch reference stands in
        if e.name != f"{__name__}.{_family}":
            raise
        continue
    TRITON_OPS.update(_module.TRITON_OPS)
