"""The decoder's input embeddings: text rows gathered, image rows projected and stored in place.

Torch reference: `llava_fast.ops.splice_image_embeddings` (embedding of the ids with image positions set to
id 0, the projector on all image features, masked_scatter of the projected rows into the image positions).

Math. With is_image[p] = (ids[p] == image_token_id) over the flattened positions p of (B, T):

    feature_row[p] = cumsum(is_image)[p] - 1          # which projected row image position p receives
    out[p] = embed_weight[ids[p]]                     if not is_image[p]
    out[p] = projector(image_features)[feature_row[p]]  otherwise
    projector(x) = x @ w1^T + b1                                    (linear, LLaVA v1)
                 = gelu(x @ w1^T + b1) @ w2^T + b2                  (mlp2x_gelu, LLaVA-1.5; exact erf GELU)

Shapes: input_ids (B, T); embed_weight (V, C); image_features (K, Nimg, Cv); w1 (C1, Cv), w2 (C, C1)
(nn.Linear layout); out (B, T, C), dtype of embed_weight. R = K * Nimg projected rows.

Launches (no host sync, so the forward is CUDA-graph capturable):
  1. `is_image` and its int32 cumsum (2 small torch ops over B*T ids).
  2. `_gather_text_rows_kernel`: writes every text row of `out`, and records dest_row[r] = p, the position
     of the r-th image token (the inverse of feature_row, built by stores, no sort or nonzero).
  3. `_projector_gemm_kernel` once (linear) or twice (mlp2x_gelu): the first mlp GEMM writes
     gelu(x w1^T + b1) to an (R, C1) buffer; the last GEMM's epilogue adds the bias, casts, and stores
     row r straight to out[dest_row[r]].
What this saves against the reference at LLaVA-1.5-7B scale (B = 1, T = 2048 with R = 576 image rows,
C = C1 = 4096, fp16), HBM bytes outside the projector's own weights and mlp intermediate (both paths have
those): the reference gathers 2048 table rows (16.8 MB read) into a full (T, C) tensor (16.8 MB written),
writes the projected rows (4.7 MB), then masked_scatter reads both (21.5 MB) and writes (T, C) again
(16.8 MB): ~77 MB over 4+ launches. Here only the 1472 text rows are read (12.1 MB) and each output row is
written once (16.8 MB): ~29 MB. The GEMM FLOPs are the same (2 * R * 4096 * (1024 + 4096) = 24 GFLOP for
mlp2x_gelu).

Backward (autograd.Function; the GEMMs are cuBLAS matmuls through torch, their FLOPs are the reference's):
  - image rows: g = grad_out[dest_row] (an (R, C) gather), then the projector's weight, bias and feature
    grads; the GELU derivative needs the pre-activation, which the first GEMM also stores when grads are
    needed (STORE_PREACT), as the reference's autograd keeps it too.
  - embedding table: `aten.embedding_dense_backward`, the same kernel F.embedding's backward runs (torch,
    not a Triton atomic kernel): it sums repeated ids in fp32 after a sort (no fp16 atomics), so the
    table's grad is the reference's own. Image positions are routed to an extra padding row V
    (so their grads are skipped without a masked (B, T, C) copy of grad_out); the (V + 1, C) result is
    returned as its first V rows.

Contract edge: the caller guarantees that the number of image positions equals R. Checking it would cost a
host sync, so instead the kernels stay memory-safe when it does not hold: surplus image positions get
embedding row 0 (what the reference gives when image_features is None), surplus feature rows are dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_text_rows_kernel(
    ids_ptr, image_cumsum_ptr, embed_ptr, out_ptr, dest_row_ptr,
    n_positions, n_feature_rows, C, image_token_id,
    stride_embed, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    positions = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    position_in = positions < n_positions
    col_in = cols < C

    ids = tl.load(ids_ptr + positions, mask=position_in, other=0)
    is_image = ids == image_token_id
    feature_row = tl.load(image_cumsum_ptr + positions, mask=position_in, other=0) - 1
    fed_by_projector = is_image & (feature_row < n_feature_rows) & position_in

    # Image positions without a feature row read embedding row 0, as the reference's masked_fill does.
    table_row = tl.where(is_image, 0, ids).to(tl.int64)
    write = position_in & ~fed_by_projector
    rows = tl.load(
        embed_ptr + table_row[:, None] * stride_embed + cols[None, :], mask=write[:, None] & col_in[None, :],
    )
    tl.store(
        out_ptr + positions[:, None].to(tl.int64) * stride_out + cols[None, :], rows,
        mask=write[:, None] & col_in[None, :],
    )
    # The inverse map for the GEMM's scatter epilogue: feature row r -> its position. One column block
    # writes it.
    if pid_c == 0:
        tl.store(dest_row_ptr + feature_row, positions, mask=fed_by_projector)


@triton.jit
def _projector_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, preact_ptr, dest_row_ptr, image_cumsum_ptr,
    M, N, K, n_positions,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, STORE_PREACT: tl.constexpr,
    SCATTER_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[row(m), n] = act(sum_k x[m, k] * w[n, k] + bias[n]); row(m) = dest_row[m] if SCATTER_ROWS else m.

    With STORE_PREACT the pre-activation also goes to preact_ptr (same layout as out, unscattered).
    """
    # Grouped program order: GROUP_M row blocks walk the same column blocks together, so a weight tile
    # (up to 4096 x 4096 x 2 B = 32 MB in total, near H100's 50 MB L2) is reused from L2 by GROUP_M rows.
    pid = tl.program_id(0)
    n_blocks_m = tl.cdiv(M, BLOCK_M)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * n_blocks_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(n_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_in[:, None] & k_in[None, :], other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=k_in[:, None] & n_in[None, :], other=0.0,
        )  # (BLOCK_K, BLOCK_N): w^T by addressing
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tile_in = m_in[:, None] & n_in[None, :]
    if STORE_PREACT:
        tl.store(
            preact_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(preact_ptr.dtype.element_ty), mask=tile_in,
        )
    if APPLY_GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact GELU, as F.gelu

    if SCATTER_ROWS:
        # Feature rows past the number of image positions have no destination (a contract violation the
        # caller should have caught); they are dropped instead of written through an unset dest_row.
        n_image_positions = tl.load(image_cumsum_ptr + n_positions - 1)
        m_in = m_in & (offs_m < n_image_positions)
        out_rows = tl.load(dest_row_ptr + offs_m, mask=m_in, other=0).to(tl.int64)
    else:
        out_rows = offs_m.to(tl.int64)
    tl.store(
        out_ptr + out_rows[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :],
    )


def _gemm_config(device, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).

    GPU: 128 x 128 x 64 16-bit tiles, 8 warps, 3 stages (96 KB of shared memory) is the usual H100 shape
    for a 4096-wide GEMM; R = 576 rows per image gives 5 x 32 = 160 programs per image for 132 SMs.
    fp32 (IEEE dot) halves BLOCK_K to keep shared memory the same. Not yet measured on a GPU.
    Interpreter: small tiles, the test shapes are tiny.
    """
    if device.type != "cuda":
        return 16, 32, 32, 4, 4, 1
    return 128, 128, 64 if dtype.itemsize <= 2 else 32, 8, 8, 3


def _projector_gemm(x, w, bias, out, *, apply_gelu=False, preact=None, dest_row=None, image_cumsum=None):
    """Launch `_projector_gemm_kernel` for out = act(x @ w^T + bias), rows scattered through dest_row."""
    M, K = x.shape
    N = w.shape[0]
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages = _gemm_config(x.device, x.dtype)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    _projector_gemm_kernel[grid](
        x, w, bias if bias is not None else w, out, preact if preact is not None else out,
        dest_row if dest_row is not None else x, image_cumsum if image_cumsum is not None else x,
        M, N, K, image_cumsum.numel() if image_cumsum is not None else 0,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, APPLY_GELU=apply_gelu, STORE_PREACT=preact is not None,
        SCATTER_ROWS=dest_row is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
        num_warps=num_warps, num_stages=num_stages,
    )


def _splice_forward(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2, b2, keep_preact):
    """Returns (out, image_cumsum, dest_row, hidden, preact); the last three are None without images."""
    B, T = input_ids.shape
    V, C = embed_weight.shape
    embed_weight = embed_weight.contiguous()  # the gather assumes unit column stride; a no-op for a parameter
    flat_ids = input_ids.reshape(-1)
    n_positions = flat_ids.numel()
    image_cumsum = torch.cumsum(flat_ids == image_token_id, 0, dtype=torch.int32)  # (B*T,)
    has_images = image_features is not None and image_features.shape[0] > 0
    n_feature_rows = image_features.shape[0] * image_features.shape[1] if has_images else 0
    out = torch.empty(B, T, C, device=embed_weight.device, dtype=embed_weight.dtype)
    out_rows = out.view(n_positions, C)
    dest_row = torch.empty(n_feature_rows, device=flat_ids.device, dtype=torch.int32)
    if n_positions == 0:
        return out, image_cumsum, None, None, None

    BLOCK_T, BLOCK_C = (16, 256) if out.is_cuda else (32, 64)
    grid = (triton.cdiv(n_positions, BLOCK_T), triton.cdiv(C, BLOCK_C))
    _gather_text_rows_kernel[grid](
        flat_ids, image_cumsum, embed_weight, out_rows, dest_row,
        n_positions, n_feature_rows, C, image_token_id,
        embed_weight.stride(0), out_rows.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
    )
    if not has_images:
        return out, image_cumsum, None, None, None

    x = image_features.reshape(n_feature_rows, image_features.shape[-1])  # (R, Cv)
    scatter = dict(dest_row=dest_row, image_cumsum=image_cumsum)
    if w2 is None:
        _projector_gemm(x, w1, b1, out_rows, **scatter)
        return out, image_cumsum, dest_row, None, None
    hidden = torch.empty(n_feature_rows, w1.shape[0], device=x.device, dtype=x.dtype)  # gelu(x w1^T + b1)
    preact = torch.empty_like(hidden) if keep_preact else None
    _projector_gemm(x, w1, b1, hidden, apply_gelu=True, preact=preact)
    _projector_gemm(hidden, w2, b2, out_rows, **scatter)
    return out, image_cumsum, dest_row, hidden, preact


class SpliceImageEmbeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, embed_weight, image_features, image_token_id, w1, b1, w2, b2):
        # The GELU derivative (for w1, b1 and feature grads) needs the pre-activation; skip storing it
        # when only the embedding table or w2/b2 train.
        keep_preact = any(ctx.needs_input_grad[i] for i in (2, 4, 5))
        out, image_cumsum, dest_row, hidden, preact = _splice_forward(
            input_ids, embed_weight, image_features, image_token_id, w1, b1, w2, b2, keep_preact
        )
        ctx.image_token_id = image_token_id
        ctx.vocab_size = embed_weight.shape[0]
        ctx.has_images = dest_row is not None
        ctx.save_for_backward(input_ids, image_cumsum, dest_row, image_features, w1, w2, hidden, preact)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input_ids, image_cumsum, dest_row, image_features, w1, w2, hidden, preact = ctx.saved_tensors
        needs = ctx.needs_input_grad  # input_ids, embed_weight, image_features, token id, w1, b1, w2, b2
        C = grad_out.shape[-1]
        grad_rows = grad_out.reshape(-1, C)  # (B*T, C)
        flat_ids = input_ids.reshape(-1)
        is_image = flat_ids == ctx.image_token_id
        n_feature_rows = dest_row.numel() if ctx.has_images else 0
        fed_by_projector = is_image & (image_cumsum <= n_feature_rows)

        grad_embed = grad_features = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if needs[1]:
            V = ctx.vocab_size
            # Projector-fed positions go to padding row V, whose grads embedding_dense_backward skips;
            # image positions without features took row 0 in the forward and send their grads there.
            table_rows = torch.where(fed_by_projector, V, torch.where(is_image, 0, flat_ids))
            grad_embed = torch.ops.aten.embedding_dense_backward(grad_rows, table_rows, V + 1, V, False)[:V]

        if ctx.has_images and any(needs[2:]):
            # Rows past the number of image positions were dropped in the forward: zero grads, and a safe
            # index in place of their unset dest_row.
            written = torch.arange(n_feature_rows, device=dest_row.device) < image_cumsum[-1]
            rows = torch.where(written, dest_row, 0)
            grad_y = (grad_rows.index_select(0, rows) * written[:, None]).to(w1.dtype)  # (R, C)
            x = image_features.reshape(n_feature_rows, -1)  # (R, Cv)
            if w2 is not None:
                if needs[6]:
                    grad_w2 = grad_y.t() @ hidden
                if needs[7]:
                    grad_b2 = grad_y.sum(0)
                if not (needs[2] or needs[4] or needs[5]):
                    return None, grad_embed, None, None, None, None, grad_w2, grad_b2
                grad_y = torch.ops.aten.gelu_backward(grad_y @ w2, preact)  # d(pre-activation), (R, C1)
            if needs[4]:
                grad_w1 = grad_y.t() @ x
            if needs[5]:
                grad_b1 = grad_y.sum(0)
            if needs[2]:
                grad_features = (grad_y @ w1).view_as(image_features)
        return None, grad_embed, grad_features, None, grad_w1, grad_b1, grad_w2, grad_b2


def splice_image_embeddings(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2=None, b2=None):
    """Same contract as `llava_fast.ops.splice_image_embeddings`; differentiable in every float input."""
    inputs = (embed_weight, image_features, w1, b1, w2, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return SpliceImageEmbeddings.apply(input_ids, embed_weight, image_features, image_token_id, w1, b1, w2, b2)
    return _splice_forward(
        input_ids, embed_weight, image_features, image_token_id, w1, b1, w2, b2, keep_preact=False
    )[0]


TRITON_OPS = {"splice_image_embeddings": splice_image_embeddings}
