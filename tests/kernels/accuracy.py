"""The accuracy rule the kernel tests share (flash-attention's): a kernel's error against an fp32 reference
may be at most 2x the error plain PyTorch makes in the same dtype, plus one ulp at the output's scale; fp32
outputs are compared with the fp32 reference directly."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even), so bf16 runs on a GPU only.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="torch.bfloat16")


def assert_close_to_reference(name, actual, same_dtype_reference, fp32_reference, fp32_atol=1e-5):
    assert actual.dtype == same_dtype_reference.dtype, f"{name}: dtype {actual.dtype}"
    assert actual.shape == same_dtype_reference.shape, f"{name}: shape {tuple(actual.shape)}"
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, same_dtype_reference, rtol=1e-5, atol=fp32_atol, msg=name)
        return
    reference = fp32_reference.float()
    kernel_error = (actual.float() - reference).abs().max().item()
    torch_error = (same_dtype_reference.float() - reference).abs().max().item()
    one_ulp = torch.finfo(actual.dtype).eps * reference.abs().max().item()
    assert kernel_error <= 2 * torch_error + one_ulp, f"{name}: error {kernel_error} vs torch's {torch_error}"
