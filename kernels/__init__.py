"""Triton kernels for llava-fast, installed as `llava_fast.kernels`.

One kernel family per file: the @triton.jit kernels, their launchers, the autograd.Function wrapper where
training needs a backward, and a pointer to the torch reference in `llava_fast.ops` they are tested
against. Each family module exports `TRITON_OPS`, a dict from an op name in `llava_fast.ops.OP_NAMES` to
its Triton implementation (same signature, same semantics); `TRITON_OPS` here merges them and is what
`llava_fast.ops.use_backend("triton")` installs.
"""

import importlib
import os

# attention_common holds what the three attention families share (device helpers, the RoPE + KV-cache write)
# and no op of its own; it is listed so every kernel module is imported and compile-checked.
FAMILIES = ("norms", "activations", "attention_common", "attention_prefill", "attention_decode", "attention_backward",
            "patch_embed", "splice", "cross_entropy")



def _check_interpreter():
    """Fail at import, with the fix, where Triton's CPU interpreter cannot run our kernels at all.

    Triton 3.6's interpreter holds a scalar argument as a NumPy array of shape (1,) and reads it as a loop
    bound through `int(array)`; NumPy 2.4 turned that (deprecated since 1.25) into "TypeError: only
    0-dimensional arrays can be converted to Python scalars", so every kernel with a `range` over a runtime
    bound fails (94 interpreter tests). Triton 3.9's interpreter squeezes the array first. Compiled kernels
    (a GPU, the sm_90 build) never take this path: triton 3.6 with NumPy 2.5 is fine there.
    """
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        return
    import inspect

    import numpy
    import triton
    from triton.runtime import interpreter

    try:
        old_index = "int(self.handle.data))" in inspect.getsource(interpreter._patch_lang_tensor)
    except (AttributeError, OSError, TypeError):  # another interpreter layout: nothing to say
        return
    if old_index and tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        raise ImportError(f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run with "
                          f"NumPy {numpy.__version__}: it converts 1-element arrays to loop bounds, which NumPy "
                          "2.4 made an error. Install numpy<2.4, or a newer Triton (3.9's interpreter is fixed); "
                          "GPU runs are unaffected.")


_check_interpreter()
TRITON_OPS = {}
for _family in FAMILIES:
    TRITON_OPS.update(importlib.import_module(f"{__name__}.{_family}").TRITON_OPS)
