"""Fused lm_head + cross-entropy for training: the (N, V) logits never exist at once.

Reference (the oracle the tests use): `llava_fast.ops.linear_cross_entropy`.

Math, for token rows n with label y_n != ignore_index, M = number of such rows:
    z_n    = hidden_n @ W^T                               (V,) logits, in hidden's dtype like F.linear
    loss   = (1/M) * sum_n (logsumexp(z_n) - z_n[y_n])    fp32
    dz_n   = (softmax(z_n) - onehot(y_n)) / M             (0 for ignored rows)
    dhidden = dz @ W,   dW = dz^T @ hidden
Shapes: hidden (N, C), W (V, C), labels (N,). N = B*T tokens (a few thousand), V = 32000/32064, C = 4096.

Algorithm: split the N rows into chunks whose logits fit MAX_CHUNK_LOGITS_BYTES. For each chunk: one
GEMM gives the chunk's logits; the Triton kernel (one program per row) finds the row's max and sum of
exponentials in one online pass over V, writes the row's loss, and in a second pass overwrites the logits
in place with dz; two more GEMMs give the chunk's dhidden rows and add its share of dW. All gradients are
therefore finished in forward; backward only multiplies them by the incoming scalar gradient.

Memory saved: eager torch holds the (N, V) logits in bf16, their fp32 copy, the fp32 log-softmax saved
for backward, then the fp32 dlogits and their bf16 cast: for N = 8192, V = 32000 up to ~3.5 GiB. Here
the peak extra is one chunk of logits (<= 256 MiB) plus dhidden (N*C) and dW (V*C) that backward needs
anyway. The price: dW is accumulated across chunks in W's dtype (one rounding per chunk; with the
default budget a 8192-token bf16 batch has 2 chunks), and double backward (retain_graph) is refused
because backward scales the stored gradients in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_loss_and_grad_kernel(
    LOGITS, LABELS, LOSS, NUM_VALID,
    row_stride_logits, n_vocab, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row of logits -> its loss (unscaled) in LOSS[row]; with WRITE_GRAD the row becomes dz in place."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * row_stride_logits
    label = tl.load(LABELS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)

    if label == ignore_index:  # no loss, zero gradient
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for start in tl.range(0, n_vocab, BLOCK_V):
                tl.store(logits_row + start + cols, tl.zeros([BLOCK_V], tl.float32), mask=start + cols < n_vocab)
        return
    tl.device_assert((label >= 0) & (label < n_vocab), "linear_cross_entropy: label out of [0, V)")

    # Pass 1: running max and running sum of exp(z - max), fp32, one read of the row.
    row_max = float("-inf")
    sum_exp = 0.0
    for start in tl.range(0, n_vocab, BLOCK_V):
        z = tl.load(logits_row + start + cols, mask=start + cols < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        row_max = new_max
    logsumexp = row_max + tl.log(sum_exp)
    label_logit = tl.load(logits_row + label).to(tl.float32)
    tl.store(LOSS + row, logsumexp - label_logit)

    # Pass 2: dz = (softmax - onehot) / M written over the logits (the row is still hot in L2: 64 KiB).
    if WRITE_GRAD:
        inv_num_valid = 1.0 / tl.maximum(tl.load(NUM_VALID), 1.0)
        for start in tl.range(0, n_vocab, BLOCK_V):
            mask = start + cols < n_vocab
            z = tl.load(logits_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dz = tl.exp(z - logsumexp)
            dz = tl.where(start + cols == label, dz - 1.0, dz)
            tl.store(logits_row + start + cols, dz * inv_num_valid, mask=mask)


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------

# 256 MiB of logits per chunk: 4096 tokens of a 32000-word vocabulary in bf16, enough rows that the
# three GEMMs per chunk stay compute-bound on H100 (a 4096 x 4096 x 32000 GEMM is ~1 TFLOP, ~1.5 ms).
MAX_CHUNK_LOGITS_BYTES = 256 * 1024 * 1024
# 4096 columns and 8 warps a program: 16 fp32 values per thread per block, 8 blocks for V = 32000.
VOCAB_BLOCK = 4096


def chunk_rows_for(n_rows, n_vocab, dtype, max_chunk_bytes=MAX_CHUNK_LOGITS_BYTES):
    """Tokens per chunk so that a chunk's (rows, V) logits take at most max_chunk_bytes."""
    rows = max(1, max_chunk_bytes // (n_vocab * torch.tensor([], dtype=dtype).element_size()))
    if rows >= 256:
        rows -= rows % 128  # GEMM tiles are 128 rows: a ragged last tile wastes a wave
    return max(1, min(n_rows, rows))


def cross_entropy_loss_and_grad_(logits, labels, loss_rows, num_valid, ignore_index, write_grad):
    """Row losses into loss_rows (rows,); with write_grad, logits (rows, V) are overwritten by dz."""
    n_rows, n_vocab = logits.shape
    if n_rows == 0:
        return
    _cross_entropy_loss_and_grad_kernel[(n_rows,)](
        logits, labels, loss_rows, num_valid,
        logits.stride(0), n_vocab, ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=min(VOCAB_BLOCK, triton.next_power_of_2(n_vocab)), num_warps=8,
    )


def linear_cross_entropy_forward(hidden, weight, labels, ignore_index, max_chunk_bytes, grad_hidden_wanted,
                                 grad_weight_wanted):
    """Returns (loss, dhidden or None, dW or None); the gradients are for a loss gradient of 1."""
    n_rows, n_channels = hidden.shape
    n_vocab = weight.shape[0]
    write_grad = grad_hidden_wanted or grad_weight_wanted
    # Counted on the device: a .item() here would stall the stream once per training step.
    num_valid = (labels != ignore_index).sum().to(torch.float32)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_wanted else None
    grad_weight = torch.zeros_like(weight) if grad_weight_wanted else None

    chunk_rows = chunk_rows_for(n_rows, n_vocab, hidden.dtype, max_chunk_bytes)
    logits_buffer = torch.empty((chunk_rows, n_vocab), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        hidden_chunk = hidden[start:end]  # (n, C)
        logits = logits_buffer[: end - start]  # (n, V)
        torch.mm(hidden_chunk, weight.t(), out=logits)
        cross_entropy_loss_and_grad_(logits, labels[start:end], loss_rows[start:end], num_valid, ignore_index,
                                     write_grad)
        if grad_hidden_wanted:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # (n, V) @ (V, C)
        if grad_weight_wanted:
            grad_weight.addmm_(logits.t(), hidden_chunk)  # (V, n) @ (n, C)
    loss = loss_rows.sum() / num_valid.clamp(min=1.0)  # all rows ignored: 0, not the reference's 0/0
    return loss, grad_hidden, grad_weight


# ------------------------------------------------------------------------------------------------------
# Autograd wrapper and the op
# ------------------------------------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, max_chunk_bytes, grad_hidden_wanted,
                grad_weight_wanted):
        loss, grad_hidden, grad_weight = linear_cross_entropy_forward(
            hidden, weight, labels, ignore_index, max_chunk_bytes, grad_hidden_wanted, grad_weight_wanted
        )
        # Not saved tensors: these are results, not inputs to a recomputation, and backward frees them.
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("linear_cross_entropy: backward ran twice (retain_graph); the fused op stores "
                               "its gradients once and scales them in place")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        # In place: a copy would hold a second (V, C) gradient at the peak of the step.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy_chunked(hidden, lm_head_weight, labels, ignore_index=-100,
                                 max_chunk_bytes=MAX_CHUNK_LOGITS_BYTES):
    """`linear_cross_entropy` with an explicit bound on the bytes of one chunk's logits."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: hidden (N, C) and labels (N,), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    grad_enabled = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), lm_head_weight.contiguous(), labels.contiguous(), ignore_index, max_chunk_bytes,
        grad_enabled and hidden.requires_grad, grad_enabled and lm_head_weight.requires_grad,
    )


def linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index=-100):
    """`llava_fast.ops.linear_cross_entropy`: mean cross-entropy of hidden @ W^T over non-ignored labels."""
    return linear_cross_entropy_chunked(hidden, lm_head_weight, labels, ignore_index)


TRITON_OPS = {"linear_cross_entropy": linear_cross_entropy}
