"""The training loop for both LLaVA stages (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5 recipe).

    stage 1   vision tower and LLM frozen, projector trained          (LLaVA-1.5: lr 1e-3, batch 256, 1 epoch)
    stage 2   vision tower frozen; projector + LLM trained             (lr 2e-5, batch 128, 1 epoch)
              or LoRA on the LLM's linear layers + the full projector  (lr 2e-4, projector 2e-5, r 128, alpha 256)

One optimizer step = one global batch of batch_size x grad_accum x processes samples. The loss is the mean
cross-entropy over every target token of the global batch (not a mean of per-micro-batch means), so it does
not depend on how the batch is cut into micro-batches or processes: each micro-batch contributes
sum(CE) / (targets in the global batch), and the target count is all-reduced before the backward passes.

Precision (bf16, the GPU default): the model holds every weight in bf16 and the optimizer updates float32
master copies of the trained ones (`MasterWeights`; stage 2 full stepping in backward in one process keeps no bf16
copy: each trained weight is made from its master where an op reads it); under FSDP the float32 shards are the
masters and are gathered in bf16. Not autocast: autocast casts torch ops, not the Triton kernels behind
`llava_fast.ops`, which would then meet bf16 activations and float32 weights (the splice kernel rejects that). The
forward and backward go through `llava_fast.ops`, so on CUDA they run the Triton kernels (attention, splice, fused
linear cross-entropy, RMSNorm/SwiGLU backward) and on the CPU the torch references.

Precision fp32 (the CPU default): float32 arithmetic throughout. The frozen matrices (the vision tower's, LoRA's base
linears, the whole decoder in stage 1) that the checkpoint stores in float16 or bfloat16, as LLaVA's checkpoints
are, stay in that dtype and are widened to float32 where an op reads them (`MasterWeights.widen_frozen_on_use`):
widening is exact, so the ops see the float32 values a float32 copy would hold, bit for bit, at 2 bytes a parameter
instead of 4, for ~6% of a LoRA step at LLaVA-1.5-7B shapes (the widening's memory traffic). A float32 checkpoint
is held as it is, and so are DDP's and FSDP's frozen weights (float32).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn

from llava_fast import ops
from llava_fast.errors import InputError, count
from llava_fast.generate import is_integer
from llava_fast.image import anyres
from llava_fast.image.native import empty_cpu
from llava_fast.prompts.templates import get_template
from llava_fast.train import checkpoint as ckpt
from llava_fast.train.data import (
    Collate,
    EncodingSpec,
    LlavaDataset,
    StepSampler,
    check_records,
    read_records,
    total_steps,
)
from llava_fast.train.lora import TARGETS, add_lora


@dataclass
class TrainArgs:
    """Every setting of a run (the CLI's flags). None means the stage's default."""

    stage: int
    model: str
    data: str
    output: str
    image_folder: str = "."
    vision_tower: str | None = None
    projector: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int | None = None  # per process (LLaVA's per_device_train_batch_size)
    grad_accum: int = 1
    lr: float | None = None
    projector_lr: float | None = None
    max_length: int | None = None  # default min(2048, the model's context)
    template: str | None = None
    system: str | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    seed: int = 42
    resume: bool = False
    strict: bool = False
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    precision: str | None = None  # "bf16" or "fp32"; default bf16 on CUDA, fp32 on the CPU
    frozen_float32: bool = False  # fp32: hold half-precision frozen matrices in float32 (no widening on use)
    fsdp: bool = False
    image_aspect_ratio: str | None = None  # "pad" or "square"; default: stage 1 square, stage 2 pad (LLaVA-1.5)
    workers: int | None = None
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: none
    keep_checkpoints: int = 1
    log_every: int = 10
    device: str | None = None
    cache_image_features: bool = False  # keep the frozen tower's features per image for later epochs
    step_in_backward: bool = False  # the optimizer steps each parameter during backward (no clipping)
    two_pass_clipping: bool = False  # a norm-only backward, then the clipped step inside a second backward
    recompute_mlp: bool = False  # without checkpointing: MLPs keep their input only (stage 2 full)

    def resolved(self):
        """A copy with the stage defaults filled in."""
        a = TrainArgs(**asdict(self))
        lora = a.lora_r is not None
        if a.stage not in (1, 2):
            raise InputError(f"--stage must be 1 or 2, got {a.stage}")
        if lora and a.stage != 2:
            raise InputError("LoRA (--lora-r) trains the LLM, which only stage 2 does")
        if lora and a.lora_alpha is None:
            raise InputError("LoRA needs --lora-r R >= 1 and --lora-alpha A")
        if a.lora_alpha is not None and not lora:
            raise InputError("--lora-alpha needs --lora-r")
        # None is "unset" (the stage's default); any given value is checked and kept, zeros included: a
        # learning rate of 0 is a valid run (it evaluates the loss), a batch size of 0 is an error.
        _check_number(a.epochs, "--epochs", positive=True)
        for name in ("max_steps", "grad_accum", "max_length", "batch_size", "lora_r", "log_every", "workers",
                     "save_every", "keep_checkpoints", "seed"):
            least = 0 if name in ("workers", "save_every", "keep_checkpoints", "seed") else 1
            value = getattr(a, name)
            if value is not None and (not is_integer(value) or value < least):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
        for name in ("lr", "projector_lr", "weight_decay", "lora_alpha"):
            _check_number(getattr(a, name), f"--{name.replace('_', '-')}", positive=name == "lora_alpha")
        _check_number(a.max_grad_norm, "--max-grad-norm")  # 0: no clipping
        if a.step_in_backward and a.max_grad_norm > 0:
            raise InputError("--step-in-backward updates each parameter during backward, before the global "
                             "gradient norm that clipping needs is known: give it with --max-grad-norm 0")
        if a.step_in_backward and a.fsdp:
            raise InputError("--step-in-backward runs in one process: FSDP reduces gradients after backward")
        if a.two_pass_clipping and (a.max_grad_norm == 0 or a.step_in_backward or a.grad_accum != 1 or a.fsdp
                                    or (lora and a.lora_dropout > 0)):
            raise InputError("--two-pass-clipping runs each step's one micro-batch twice, the same way (the first "
                             "backward only takes the gradient norm): it needs clipping (--max-grad-norm > 0), "
                             "--grad-accum 1, no --step-in-backward, one process (no --fsdp) and, with LoRA, "
                             "--lora-dropout 0")
        if a.recompute_mlp and (a.gradient_checkpointing or a.stage != 2 or lora or a.fsdp):
            raise InputError("--recompute-mlp recomputes the trained MLPs' activations in backward: it needs "
                             "--stage 2 without LoRA, --no-gradient-checkpointing (which already recomputes whole "
                             "layers) and no --fsdp")
        _check_number(a.lora_dropout, "--lora-dropout", below_one=True)
        _check_number(a.warmup_ratio, "--warmup-ratio")
        if a.warmup_ratio > 1:
            raise InputError(f"--warmup-ratio must be in [0, 1], got {a.warmup_ratio!r}")
        if a.batch_size is None:
            a.batch_size = 32 if a.stage == 1 else 16
        if a.lr is None:
            a.lr = 1e-3 if a.stage == 1 else 2e-4 if lora else 2e-5
        if a.projector_lr is None:
            a.projector_lr = 2e-5 if lora else a.lr
        if a.template is None and a.stage == 1:
            a.template = "plain"
        if a.image_aspect_ratio is None:
            a.image_aspect_ratio = "square" if a.stage == 1 else "pad"
        if a.image_aspect_ratio not in ("pad", "square"):
            raise InputError(f"--image-aspect-ratio must be pad or square, got {a.image_aspect_ratio!r}")
        if a.precision not in (None, "bf16", "fp32"):
            raise InputError(f"--precision must be bf16 or fp32, got {a.precision!r}")
        if a.frozen_float32 and a.precision == "bf16":
            raise InputError("--frozen-float32 applies to --precision fp32, whose frozen matrices it holds in "
                             "float32; bf16 holds them in bf16")
        return a


def _check_number(value, flag, positive=False, below_one=False):
    """A finite real number >= 0 (> 0 when positive; < 1 when below_one), or None (unset)."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or (positive and value == 0) or (below_one and value >= 1):
        expected = "> 0" if positive else "in [0, 1)" if below_one else ">= 0"
        raise InputError(f"{flag} must be a finite number {expected}, got {value!r}")


@dataclass
class TrainResult:
    net: nn.Module
    losses: list = field(default_factory=list)  # (step, loss) of this process's run
    skipped: Counter = field(default_factory=Counter)
    outputs: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------------


class TrainingLoss(nn.Module):
    """One micro-batch's share of the step loss. This is the module DDP / FSDP wrap, so their hooks see the
    whole training forward (LlavaForCausalLM.forward returns logits, not the loss)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids, labels, pixel_values, scale, image_features=None, image_sizes=None):
        loss = self.net.loss(input_ids, labels, pixel_values, image_features=image_features,
                             image_sizes=image_sizes) * scale
        if pixel_values is None and image_features is None:
            # No image: the projector is not in the graph. A zero-weighted term gives its trainable weights a
            # zero gradient, so every process reduces the same gradients (DDP and FSDP require it).
            image_only = list(self.net.multi_modal_projector.parameters()) + [self.net.image_newline]
            loss = loss + 0.0 * sum(p.sum() for p in image_only if p is not None and p.requires_grad)
        return loss


class MasterWeights:
    """Float32 master copies of the trained parameters, which the optimizer updates while the model computes in
    bf16 (Micikevicius et al. 2018, "Mixed Precision Training"). After each backward the bf16 gradients are
    added into float32 master gradients (accumulation stays float32); after each step the masters are rounded
    into the model. With float32 parameters (CPU, FSDP's shards) the masters are the parameters themselves."""

    def __init__(self, named_params, dtype, cast_on_use_in=None):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.dtype, self.net = dtype, None
        self.made = self.made_grad_sink = self.scratch = None
        self.widened = []  # (module, attribute) of each frozen matrix widened on use (widen_frozen_on_use)
        if dtype == torch.float32:
            self.masters = self.params
            return
        if cast_on_use_in is not None:
            self._cast_on_use(cast_on_use_in, dtype)
            return
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        for p in self.params:
            p.data = p.data.to(dtype)

    def _cast_on_use(self, net, dtype):
        """Keep no `dtype` copy of a trained weight (2 bytes a parameter, 0.9 GiB at LLaVA-1.5-7B's one-layer stage 2
        full): the model's parameter becomes its float32 master, and reading it (module.weight) gives the master
        rounded to `dtype` (a parametrization, differentiable: the gradient comes back as the `dtype` gradient made
        float32, as the fold makes it), made where an op reads it and freed with the op's output; what backward
        needs of it is made again there (casting()'s saved-tensor hooks), not kept from forward. The rounded master
        is the weight the copy path holds after each step (copy_to_model rounds the same way), so the same ops see
        the same bits: losses and updates equal the copy path's. For stepping in backward (the masters step from
        their own post-accumulate-grad hooks) in one process; not for tied weights (one parameter, two modules)."""
        from torch.nn.utils import parametrize

        # made: storage address -> (weakref to a weight made from a master, that master)
        self.made, self.net = {}, net
        for name, p in zip(self.names, self.params):
            owner, _, attr = name.rpartition(".")
            module = net.get_submodule(owner)
            if p.dtype != torch.float32:
                p.data = p.data.float()
            parametrize.register_parametrization(module, attr, _MasterRounded(dtype, self), unsafe=True)
        self.masters = self.params  # the model's parameters are the float32 masters now

    def widen_frozen_on_use(self, net):
        """Float32 models: each frozen parameter held in float16/bfloat16 (the checkpoint's dtype, which load_base
        keeps for the matrices `widened_on_use` names) reads as its float32 widening, made where an op reads it
        (the cast on use's parametrization, to float32) and freed with the op's output; what backward needs of it
        (the input gradient's dy W) is widened again there (casting()'s hooks), not kept from forward. Widening
        is exact, so every op sees the bits a float32 copy holds: 2 bytes a frozen parameter instead of 4 (the
        vision tower, 0.3 B parameters, and LoRA's base linears, 0.2 B a decoder layer at LLaVA-1.5-7B). A
        `dtype` other than float32 holds every frozen weight in `dtype` already: nothing to do."""
        from torch.nn.utils import parametrize

        if self.dtype != torch.float32:
            return
        for name, p in list(net.named_parameters()):
            if p.requires_grad or p.dtype not in HALF_DTYPES:
                continue
            owner, _, attr = name.rpartition(".")
            module = net.get_submodule(owner)
            if self.made is None:
                self.made, self.scratch = {}, WidenScratch()
            parametrize.register_parametrization(module, attr, _MasterRounded(torch.float32, self), unsafe=True)
            self.widened.append((module, attr))

    def make(self, source, dtype):
        """source.to(dtype): a frozen weight's widening into a reused buffer (WidenScratch), else a new tensor."""
        if self.scratch is not None and dtype == torch.float32 and source.dtype in HALF_DTYPES:
            return self.scratch.widen(source)
        return source.to(dtype)

    def casting(self):
        """Around a forward (cast on use, widening on use; else nothing): each saved weight made from a master or
        widened from a frozen weight is kept as the recipe to make it again, not as the tensor."""
        if self.made is None:
            return contextlib.nullcontext()
        made = self.made

        def pack(t):
            entry = made.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
            if entry is None:
                return t
            made_t, master = entry[0](), entry[1]
            if made_t is None or made_t.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                return t  # the address of a freed weight, now another tensor's
            return master, t.dtype, t.shape, t.stride(), t.storage_offset()

        def unpack(x):
            if isinstance(x, torch.Tensor):
                return x
            master, dtype, shape, stride, offset = x
            return self.make(master.detach(), dtype).as_strided(shape, stride, offset)

        @contextlib.contextmanager
        def context():
            made.clear()
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                    yield
            finally:
                made.clear()  # packed entries hold their master, not the made weight

        return context()

    def fold_grads_in_backward(self):
        """Add each bf16 gradient into its float32 master gradient as soon as backward has finished it (a
        post-accumulate-grad hook per parameter) and free it, so the bf16 gradient set (2 bytes a trained
        parameter) never exists whole; the same sums as accumulate_grads. Not under DDP, whose reducer reads
        p.grad after these hooks."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.register_post_accumulate_grad_hook(partial(_fold_grad, m))

    def accumulate_grads(self):
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None:
                m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                p.grad = None

    def copy_to_model(self):
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)

    def keep_rounded_weights(self):
        """After the run, cast on use: each model parameter becomes its master rounded to the compute dtype, as the
        copy path leaves it (the parametrizations removed; the masters are no longer the model's). Widening on use:
        each frozen matrix becomes the float32 parameter the model would have held without it, one at a time."""
        from torch.nn.utils import parametrize

        for module, attr in self.widened:
            held = getattr(module.parametrizations, attr).original
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            setattr(module, attr, nn.Parameter(held.detach().float(), requires_grad=False))
        self.widened = []
        if self.net is None:
            self.made = None
            return
        for name, p in zip(self.names, self.params):
            owner, _, attr = name.rpartition(".")
            module = self.net.get_submodule(owner)
            dtype = getattr(module.parametrizations, attr)[0].dtype
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            setattr(module, attr, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
        self.made = self.net = None

    def state_dict(self):
        return {n: m.detach() for n, m in zip(self.names, self.masters)}

    def load_state_dict(self, state):
        with torch.no_grad():
            for n, m in zip(self.names, self.masters):
                m.copy_(state[n])
        self.copy_to_model()


HALF_DTYPES = (torch.float16, torch.bfloat16)


def widened_on_use(name, stored):
    """Whether a float32 run holds the frozen weight `name`, stored in the checkpoint as `stored`, in the
    checkpoint's float16/bfloat16 and widens it where an op reads it (MasterWeights.widen_frozen_on_use): the
    matrices (linear, patch and position-embedding weights); not the embedding table nor lm_head, which their ops
    read whole (the splice's row gather, the fused linear cross-entropy's chunks of rows): widened there, each
    would be a (V, C) float32 transient, 501 MiB at LLaVA-1.5-7B, at the step's peak. Vectors (norms, biases,
    0.1% of the weights) stay float32."""
    return (stored.dtype in HALF_DTYPES and stored.dim() >= 2
            and name not in ("language_model.embed_tokens.weight", "lm_head.weight"))


class WidenScratch:
    """Float32 buffers, reused, that frozen float16/bfloat16 weights are widened into where an op reads them. A
    new (out, in) float32 tensor per read is faulted in page by page (glibc maps each block above 32 MiB afresh):
    widening an 11008 x 4096 float16 matrix took ~50 ms into a new tensor against ~27 ms into a reused one, beside a
    ~235 ms float32 GEMM at 640 rows (2 Sapphire Rapids cores, loaded host). A buffer is reused only while no tensor
    but its own holds its storage (the storage's use count: the buffer and the count's probe), so a widened weight
    still alive (an op reading two at once, a view autograd kept outside casting()) gets a buffer of its own. A
    weight that no free buffer holds gets a new one and the free ones, all too small, are dropped: the buffers
    number the most widened weights alive at once (one or two), the first as large as the largest weight (172 MiB
    at LLaVA-1.5-7B's 11008 x 4096), not one buffer per size met on the way up (110 MiB more at 7B shapes)."""

    def __init__(self):
        self.buffers = []

    @staticmethod
    def _free(buf):
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) == 2  # buf and this probe only

    def widen(self, source):
        n = source.numel()
        for buf in self.buffers:
            if buf.numel() >= n and self._free(buf):
                return buf[:n].view(source.shape).copy_(source)
        self.buffers = [buf for buf in self.buffers if not self._free(buf)]
        # On 2 MiB pages where the kernel grants them on request: the widening's writes and the GEMM's reads of a
        # buffer on 4 KiB pages walk the page table every 4 KiB (a LoRA step at LLaVA-1.5-7B shapes, 2 layers, 640
        # tokens, 2 Sapphire Rapids cores: 1.094x the float32-held step's time on 4 KiB pages, 1.075x on 2 MiB).
        buf = (empty_cpu((n,), torch.float32) if source.device.type == "cpu"
               else torch.empty(n, dtype=torch.float32, device=source.device))
        self.buffers.append(buf)
        return buf.view(source.shape).copy_(source)


class _MasterRounded(nn.Module):
    """The parametrization of MasterWeights' cast on use: the float32 master -> the weight in `dtype`, recorded
    (by storage address) for casting()'s hooks. Also widening on use: a frozen float16/bfloat16 weight -> float32."""

    def __init__(self, dtype, masters):
        super().__init__()
        self.dtype, self.masters = dtype, masters

    def forward(self, master):
        w = _RoundedMaster.apply(master, self.dtype, self.masters)
        if torch.is_grad_enabled():
            self.masters.made[w.untyped_storage().data_ptr()] = (weakref.ref(w), master)
        return w


class _RoundedMaster(torch.autograd.Function):
    """master.to(dtype), whose backward makes the gradient float32 (as to()'s does), or, while stepping in backward
    (masters.made_grad_sink set) with nothing accumulated in the master yet, hands the whole `dtype` gradient of a
    matrix to that sink, which makes it float32 by row chunks (OptimizerInBackward._step_made)."""

    @staticmethod
    def forward(ctx, master, dtype, masters):
        ctx.master, ctx.masters = master, masters
        return masters.make(master, dtype)

    @staticmethod
    def backward(ctx, grad):
        sink, master = ctx.masters.made_grad_sink, ctx.master
        if sink is None or master.grad is not None or grad.dim() < 2 or grad.layout != torch.strided:
            return grad.to(torch.float32), None, None
        sink(master, grad)
        return None, None, None


def casts_weights_on_use(net, dtype, a, lora, dist):
    """Whether a run's bfloat16 model keeps no copy of its trained weights (MasterWeights' cast on use): stepping in
    backward (--step-in-backward, --two-pass-clipping), stage 2 full, one process, untied embeddings."""
    return (dtype != torch.float32 and (a.step_in_backward or a.two_pass_clipping) and not lora and dist is None
            and not a.fsdp and net.lm_head.weight is not net.language_model.embed_tokens.weight)


def _fold_grad(master, p):
    master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
    p.grad = None


class PerTensorUpdate:
    """The run optimizer's update one trained tensor at a time: a one-tensor AdamW per master sharing the run
    optimizer's state dict (checkpoints save and resume it as before) and its group's settings, the fused
    kernel's per-element arithmetic of one step over all tensors, so the parameters are bit-equal to the plain
    step's. update(master) steps a master whose gradient is set, frees that gradient and rounds the master into
    the model's parameter."""

    def __init__(self, optimizer, masters):
        self.single = {}  # master -> (one-tensor AdamW sharing the state, the run optimizer's group)
        self.param_of = dict(zip(masters.masters, masters.params))
        for group in optimizer.param_groups:
            for m in group["params"]:
                one = type(optimizer)([m], lr=group["lr"])
                one.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
                self.single[m] = (one, group)
        self.optimizer = optimizer

    def update(self, master):
        one, group = self.single[master]
        if master.grad.is_sparse:  # the embedding's rows (sparse_embedding_grad): the same update by row chunks
            _adamw_by_row_chunks(self.optimizer, group, master)
        else:
            one.state = self.optimizer.state  # looked up each time: load_state_dict replaces the dict
            one.param_groups[0]["lr"] = group["lr"]
            one.step()
        master.grad = None
        p = self.param_of[master]
        if master is not p:
            with torch.no_grad():
                p.copy_(master)


class OptimizerInBackward:
    """The optimizer's step for each trained parameter inside the last micro-batch's backward, as soon as its
    gradient is final (a post-accumulate-grad hook, after the bf16 fold), the gradient freed at once: the
    whole gradient set (float32, 4 bytes a trained parameter) never exists. Each update is a `PerTensorUpdate`,
    so losses are bit-equal to the plain step's. Gradient clipping scales every gradient by the global norm,
    known only once backward ends, so --step-in-backward runs without clipping (the trainer refuses it with
    --max-grad-norm > 0); the global norm is still summed as the gradients go by, for the log.
    --two-pass-clipping gets the norm first from a backward that only sums squares (norm_only), then runs the
    forward and backward again and steps each gradient times the clip factor: the gradient set never exists
    (4 bytes a trained parameter: 28 GB at LLaVA-1.5-7B's stage 2 full) for a second forward and backward.
    With `net` given and lm_head's weight trained in float32 (its own master, untied), its gradient never exists
    whole either: the loss hands it over in vocabulary row chunks (net.lm_head_grad_sink, set while armed), each
    summed into the norm and stepped at once (`_step_rows`); 501 MiB fewer at LLaVA-1.5-7B's 32064 x 4096. So do the
    decoder's float32 attention projections and MLP weights, from their ops by row chunks (`weight_grad_sink`): one
    16-43 MiB chunk alive at a time instead of a 64-172 MiB gradient at LLaVA-1.5-7B."""

    def __init__(self, optimizer, masters, net=None):
        self.armed, self.squares, self.masters = False, None, masters
        self.per_tensor = PerTensorUpdate(optimizer, masters)
        for p, m in zip(masters.params, masters.masters):  # registered after the fold: runs after it
            p.register_post_accumulate_grad_hook(partial(self._step, m))
        self.net, self.sinking = None, []
        if net is not None:
            own = {id(m) for m in self.per_tensor.single} & {id(p) for p in masters.params}  # float32: their own
            head = net.lm_head.weight
            if head is not net.language_model.embed_tokens.weight and id(head) in own:
                self.net = net
            # the decoder's attention projections and MLPs hand their weights' gradients over by row chunks
            # (ops.linear_weight_grad_to_sink, ops.swiglu_mlp_recomputed)
            blocks = [b for layer in getattr(net.language_model, "layers", ()) for b in (layer.self_attn, layer.mlp)]
            self.sinking = [b for b in blocks if _plain_linears_trained_in_float32(b, own)]

    def arm(self, device, scale=None, norm_only=False):
        """The next backward steps every parameter (call before the last micro-batch's backward, with the
        step's learning rates already in the run optimizer's groups), its gradient first multiplied by `scale`
        (a 0-dim tensor: the clip factor) when given; norm_only: it only sums the squares and frees each
        gradient (the first pass of --two-pass-clipping)."""
        self.armed, self.squares = True, torch.zeros((), dtype=torch.float32, device=device)
        self.scale, self.norm_only = scale, norm_only
        if self.net is not None:
            self.net.lm_head_grad_sink = partial(self._step_rows, self.net.lm_head.weight)
        for module in self.sinking:
            module.weight_grad_sink = self._step_rows
        self.masters.made_grad_sink = self._step_made  # cast on use (else unused)

    def disarm(self):
        """-> the global gradient norm of the step. Steps any parameter the last backward did not reach."""
        for m in self.per_tensor.single:
            if m.grad is not None:
                self._step(m, self.per_tensor.param_of[m])
        self.armed = False
        if self.net is not None:
            self.net.lm_head_grad_sink = None
        for module in self.sinking:
            module.weight_grad_sink = None
        self.masters.made_grad_sink = None
        return self.squares.sqrt()

    def _step(self, master, p):
        if not self.armed or master.grad is None:  # None: lm_head's gradient went to _step_rows
            return
        if master.grad.is_sparse:  # the embedding's rows: one entry each (micro-batches accumulate by concatenation)
            master.grad = sum_sparse_rows(master.grad)
        grad = master.grad._values() if master.grad.is_sparse else master.grad
        self.squares += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if self.norm_only:
            master.grad = None
            return
        if self.scale is not None:
            grad.mul_(self.scale)
        self.per_tensor.update(master)

    def _step_rows(self, master, lo, hi, grad):
        """Rows lo:hi of `master`'s gradient (lm_head's from the loss, a decoder weight's from its op, in row order,
        each row once): into the norm, then,
        clipped, the fused AdamW on those rows of the weight and its moments; the step count moves after the last
        rows. Bit-equal to the whole tensor's update for a multiple of 16 rows (see step_row_sparse). Earlier
        micro-batches' gradient, accumulated in .grad, is added first (as autograd would) and freed after the last
        rows."""
        if master.grad is not None:
            grad += master.grad[lo:hi]
            if hi == master.shape[0]:
                master.grad = None
        self.squares += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if self.norm_only:
            return
        if self.scale is not None:
            grad.mul_(self.scale)
        group = self.per_tensor.single[master][1]
        state = _adamw_state(self.per_tensor.optimizer, group, master)
        _adamw_rows(group, master, lo, hi, grad, state, state["step"].clone())
        if hi == master.shape[0]:
            state["step"].add_(1)

    def _step_made(self, master, grad):
        """A master's whole gradient in the model's dtype (MasterWeights' cast on use, nothing accumulated before it),
        made float32 and stepped by row chunks (VOCAB_ROWS_PER_GRAD_CHUNK, 1024) with _step_rows: the float32 gradient
        never exists whole (501 MiB for LLaVA-1.5-7B's lm_head or embedding table, beside their 251 MiB bf16 one).
        The norm's squares are summed by chunks too: torch's norm of the whole bf16 tensor in float32 makes that
        501 MiB copy; the chunks' sum differs from it in the last bits, as lm_head's does in float32."""
        rows = ops.VOCAB_ROWS_PER_GRAD_CHUNK
        for lo in range(0, master.shape[0], rows):
            hi = min(master.shape[0], lo + rows)
            self._step_rows(master, lo, hi, grad[lo:hi].to(torch.float32, memory_format=torch.contiguous_format))


def _plain_linears_trained_in_float32(module, own):
    """Whether an attention block's q/k/v/o or an MLP's gate/up/down are all plain nn.Linear (not fused, not LoRA)
    whose weights are float32 masters of their own (ids in `own`)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj") if hasattr(module, "o_proj") else ("gate_proj", "up_proj",
                                                                                         "down_proj")
    return all(type(getattr(module, n, None)) is nn.Linear and id(getattr(module, n).weight) in own for n in names)


def clip_factor(norm, max_norm):
    """clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


class StepFromModelGrads:
    """The optimizer step of a bf16 model trained one micro-batch a step (no accumulation, one process): the
    bf16 gradients stay in the model's parameters until the step, which takes the global norm from them (in
    float32: `_foreach_norm(dtype=float32)` equals the norm of their float32 copies bit for bit), then for each
    tensor forms the float32 gradient (exact: a bf16 value is a float32 value), clips it, steps it
    (`PerTensorUpdate`) and frees it. The float32 gradient set (4 bytes a trained parameter) never exists, the
    bf16 one (2 bytes) does: 96 MiB less at the end of backward, the step's peak, on the tiny preset's stage 2
    (50M trained parameters); same bits as folding in backward, then clip_grad_norm_ and the plain step."""

    def __init__(self, optimizer, masters):
        self.masters = masters
        self.per_tensor = PerTensorUpdate(optimizer, masters)

    def step(self, max_norm):
        """-> the global gradient norm before clipping (max_norm 0: no clipping)."""
        pairs = [(p, m) for p, m in zip(self.masters.params, self.masters.masters) if p.grad is not None]
        if not pairs:
            return torch.zeros(())
        norms = torch._foreach_norm([p.grad for p, _ in pairs], 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        scale = clip_factor(total, max_norm) if max_norm > 0 else None
        # smallest first: when the (V, C) embedding's and lm_head's float32 gradients are formed (63 MiB each on
        # the tiny preset) the other bf16 gradients are already freed
        for p, m in sorted(pairs, key=lambda pm: pm[0].numel()):
            m.grad, p.grad = p.grad.float(), None
            if scale is not None:
                m.grad.mul_(scale)
            self.per_tensor.update(m)
        return total


def return_freed_heap():
    """Hand the heap memory freed so far back to the OS (glibc's malloc_trim; nothing elsewhere).

    glibc keeps freed chunks below its mmap threshold, which it raises to the size of each large block freed
    (up to 32 MiB), for reuse in its heap; the blocks a step frees (forward temporaries, activations freed in
    backward) are mostly not reused by what it allocates next, of other sizes, so the resident set climbs far
    above the live tensors. Stage 2 full on the CPU (`trims_heap`) calls this after backward and after the step,
    and in float32, whose peak is the end of backward, also after forward and once the decoder's backward is
    done (before the embedding's (V, C) gradient is allocated). On the tiny preset that takes the peak resident
    set from 1088 to ~950 MiB in float32 (837 MiB live) and from ~1030 to ~935 MiB in bfloat16 (902 live), at
    ~1 ms a call plus faulting the pages in again: +0-4% of a float32 step; in bfloat16, whose peak is in forward,
    the two extra calls would cost ~10% of its shorter step for nothing. LoRA and stage 1, whose peaks are half
    the alternative's already, skip it (3-8% of their step). It changes no allocator setting, so other code in
    the process keeps glibc's defaults."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def trims_heap(args, device):
    """(after backward and the step, also after forward and the decoder's backward): where the step returns its
    freed heap to the OS (see return_freed_heap): stage 2 full on the CPU; the second in float32 only."""
    step = device.type == "cpu" and args.stage == 2 and args.lora_r is None
    return step, step and (args.precision == "fp32" or args.fsdp)


def return_freed_heap_after_decoder_backward(net):
    """return_freed_heap when backward reaches the decoder's input, that is once the decoder's backward is
    done and before the embedding's gradient is allocated."""
    def hook(module, args):
        x = args[0]
        if torch.is_grad_enabled() and x.requires_grad:
            x.register_hook(lambda grad: return_freed_heap())

    return net.language_model.layers[0].register_forward_pre_hook(hook)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None


def make_optimizer(groups, weight_decay, device, sharded=False):
    """AdamW (betas 0.9/0.999, eps 1e-8), fused: one kernel per parameter for the whole update, on CUDA and on
    the CPU. The CPU's default for-loop AdamW makes ~10 passes over each float32 tensor (p, grad, m, v); on
    the tiny preset's stage 2 (50M trained parameters) the fused one is several times faster. Sharded
    (DTensor) parameters on the CPU keep the for-loop implementation."""
    fused = device.type == "cuda" or (device.type == "cpu" and not sharded)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, fused=fused)


class ImageFeatureCache:
    """The frozen vision tower's features of each image (keyed by record and image number), computed once and
    reused by later epochs: from epoch 2 on a step skips the tower's forward. Exact: the tower is frozen and
    has no dropout, and an image's preprocessing is deterministic. Held in host memory, in the tower's dtype:
    num_image_tokens x vision width x bytes per image (tiny preset 256 KiB; LLaVA-1.5-7B bf16 1.1 MiB, so
    665K images need ~750 GB: meant for datasets that fit, trained for several epochs).

    LLaVA-NeXT: an entry is the whole image, the features of all its AnyRes tiles (base + grid, 3 to 5 with
    LLaVA-1.6's pinpoints, so 3-5x the bytes), and a repeat of the image skips the tower for every tile."""

    def __init__(self, net):
        self.net, self.store, self.bytes = net, {}, 0

    def features(self, pixel_values, keys, image_sizes=None):
        """(K, 3, S, S) pixels of the images `keys` -> (K, num_image_tokens, Cv) features on their device.
        With image_sizes (K, 2) (LLaVA-NeXT): pixel_values are the K images' tiles, image after image, and
        the result their tiles' features (sum of tiles, P * P, Cv)."""
        if image_sizes is None:
            tiles = [1] * len(keys)
        else:
            cfg = self.net.cfg
            tiles = [anyres.num_tiles(h, w, cfg.image_grid_pinpoints, cfg.vision.image_size)
                     for h, w in image_sizes.tolist()]
        per_image = pixel_values.split(tiles)
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        if missing:
            with torch.no_grad():
                new = self.net.image_features(torch.cat([per_image[i] for i in missing]))  # (m tiles, R, Cv)
            for i, f in zip(missing, new.split([tiles[i] for i in missing])):
                self.store[keys[i]] = f.to("cpu", copy=True)
                self.bytes += f.numel() * f.element_size()
        return torch.cat([self.store[key] for key in keys]).to(pixel_values.device, non_blocking=True)


def cosine_lr(step, total, warmup, peak):
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total` (step counts from 0)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def trains_llm_weight(name, stage, lora):
    """Whether the run trains the language-model side's parameter `name` (the projector is always trained).
    LLaVA-NeXT's image_newline trains with the LLM, as the original's full fine-tune trains it (its LoRA runs and
    stage 1 leave it frozen). LoRA trains its adapters, which the checkpoint does not hold."""
    if stage == 1:
        return False
    if lora:
        return name.endswith((".lora_A", ".lora_B"))
    return name.startswith(("language_model.", "lm_head.")) or name == "image_newline"


def trainable_parameters(net, stage, lora):
    """Unfreeze what the stage trains; returns (llm params, projector params) as (name, param) lists."""
    net.requires_grad_(False)
    projector = list(net.multi_modal_projector.named_parameters(prefix="multi_modal_projector"))
    # named_parameters lists a shared tensor once: tied embeddings are one parameter, trained as one.
    llm = [(n, p) for n, p in net.named_parameters() if trains_llm_weight(n, stage, lora)]
    for _, p in projector + llm:
        p.requires_grad_(True)
    return llm, projector


def fuse_frozen_projections(net, stage, fsdp=False):
    """Stage 1 trains the projector only, so the decoder is frozen: its q/k/v and gate/up projections are fused
    into one weight each (LlavaForCausalLM.fuse_projections, as inference runs them), 4 GEMMs per layer instead
    of 7 in forward and in the input-gradient backward, and no sum of the q/k/v (and gate/up) input gradients.
    state_dict() keeps the split names, so the written checkpoint is unchanged. Stage 2 trains these weights
    under their own names (masters, LoRA targets, checkpoints) and keeps them apart; its vision tower is frozen
    as stage 1's, so its q/k/v are fused (fuse_vision_projections): 2 GEMMs per tower layer fewer, at 577 rows
    by 1024 x 1024 each at LLaVA-1.5-7B, and in a float32 run of a half-precision checkpoint one widening
    instead of three. Not under FSDP in stage 2 (its full-state gather of the trained weights reads the tower's
    split names)."""
    if stage == 1:
        net.fuse_projections()
    elif not fsdp:
        net.fuse_vision_projections()


_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device):
    """Dense bf16 tensor-core peak of the GPU, or None where unknown (no MFU is shown then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def step_flops(cfg, row_lengths, num_images, llm_weight_grads, projector_trains):
    """Model FLOPs of one training step (gradient-checkpointing recomputation not counted, as MFU does not).

    Decoder, per token: 2N forward + 2N input gradients (always: the projector's gradient flows through the
    whole LLM) + 2N weight gradients when the LLM trains (N = matmul parameters incl. lm_head); attention
    2*H*D*T per layer per token forward (causal), twice that backward. Vision tower: forward only (frozen, no
    gradient flows into it). Projector: forward, and weight gradients when it trains.
    """
    t, v = cfg.text, cfg.vision
    C, L, HD, KD = t.hidden_size, t.num_layers, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    n_llm = L * (2 * C * HD + 2 * C * KD + 3 * C * t.intermediate_size) + C * t.vocab_size
    tokens = sum(row_lengths)
    attn = sum(2 * L * HD * T * T for T in row_lengths)  # forward, causal
    flops = tokens * (4 + (2 if llm_weight_grads else 0)) * n_llm + 3 * attn
    Cv, P = v.hidden_size, v.num_patches + 1
    n_vis = cfg.num_vision_layers_run * (4 * Cv * Cv + 2 * Cv * v.intermediate_size)
    flops += num_images * (2 * n_vis * P + 4 * cfg.num_vision_layers_run * Cv * P * P)
    n_proj = Cv * C + C * C
    flops += num_images * cfg.num_image_tokens * (4 if projector_trains else 2) * n_proj
    return flops


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed every `every` steps otherwise."""

    def __init__(self, total, every, stream=None):
        # stderr as it is now, not as it was when this module was imported: a program (or a test's capture) that
        # replaced it since got "I/O operation on closed file" from the first run's progress line on.
        self.stream = sys.stderr if stream is None else stream
        self.total, self.every = total, max(1, every)
        self.tty = self.stream.isatty()

    def update(self, m, eta_s):
        line = (f"step {m['step']}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                f"{m['tokens_per_s']:,.0f} tok/s | {m['samples_per_s']:.1f} samples/s"
                + (f" | MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "")
                + f" | ETA {_hms(eta_s)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(120)[:160])
            self.stream.flush()
        elif m["step"] % self.every == 0 or m["step"] == self.total:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.tty:
            self.stream.write("\n")


def _hms(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _strip_prefix(name):
    for prefix in ("module.", "net."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


def _setup_distributed(device_arg):
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda requested but no CUDA GPU is available")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size(), device
    return None, 0, 1, device


def run_config(a: TrainArgs, world):
    """The settings a resumed run must share with the run it resumes."""
    keys = ("stage", "model", "data", "image_folder", "vision_tower", "projector", "epochs", "max_steps", "batch_size",
            "grad_accum", "lr", "projector_lr", "max_length", "template", "system", "lora_r", "lora_alpha",
            "lora_dropout", "seed", "warmup_ratio", "weight_decay", "max_grad_norm", "precision", "fsdp",
            "image_aspect_ratio")
    d = {k: getattr(a, k) for k in keys}
    for k in ("model", "data", "image_folder", "vision_tower", "projector"):
        d[k] = os.path.abspath(d[k]) if d[k] else d[k]
    d["world_size"] = world
    return d


def _check_resume_settings(a, world, existing) -> str:
    """The latest checkpoint in --output, after checking that this run's settings equal the run's it resumes."""
    path = os.path.join(a.output, f"checkpoint-{existing[-1]}")
    _check_same_run(a, world, ckpt.read_json(os.path.join(path, "trainer_state.json"))["run"], path)
    return path


FINISHED = "train_finished.json"  # in --output, written once the outputs are: {"steps": total, "run": settings}


def _finished_steps(a, world) -> int | None:
    """The steps of the finished run in --output (its outputs written), None if it holds none. A --resume of it
    ran its steps after the newest checkpoint again and rewrote its outputs, saying nothing; with other settings
    (more steps, another data file) it is the usual refusal."""
    path = os.path.join(a.output, FINISHED)
    if not os.path.isfile(path):
        return None
    finished = ckpt.read_json(path)
    _check_same_run(a, world, finished["run"], path)
    return finished["steps"]


def _check_same_run(a, world, saved, where):
    """This run's settings equal those of the run `saved` (from the file `where`): the learning-rate schedule,
    the data order and each step's batch follow them, and a resumed run reproduces the uninterrupted one. A
    setting still None (resolved from the checkpoint later) is not compared yet."""
    differs = {k: (saved.get(k), v) for k, v in run_config(a, world).items()
               if saved.get(k) != v and (v is not None or k not in ("max_length", "template"))}
    if differs:
        flag = {"world_size": "processes"}
        raise InputError(f"--resume: settings differ from the run in {where}: " +
                         ", ".join(f"{flag.get(k, '--' + k.replace('_', '-'))} was {old!r}, now {new!r}"
                                   for k, (old, new) in differs.items()) +
                         "; a resumed run keeps its settings (the learning-rate schedule and the data order follow "
                         "them): give those it started with, or start a new run in another --output")


def train(args: TrainArgs) -> TrainResult:
    a = args.resolved()
    dist, rank, world, device = _setup_distributed(a.device)
    try:
        return _train(a, dist, rank, world, device)
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _train(a: TrainArgs, dist, rank, world, device):
    if a.precision is None:
        a.precision = "bf16" if device.type == "cuda" else "fp32"
    main = rank == 0
    log = (lambda *m: print("llava-fast train:", *m, file=sys.stderr, flush=True)) if main else (lambda *m: None)
    finished = _finished_steps(a, world) if a.resume else None
    if finished is not None:  # before any load; nothing in --output changes
        log(f"the run in {a.output} is finished: its {finished} steps ran and its outputs are written; nothing "
            "to resume (to train further, start a new run from what it wrote, in another --output)")
        return TrainResult(None)
    run = _setup(a, dist, rank, world, device, log)
    run_log = _RunLog(a, run, main, world)
    stepper = _Stepper(a, run.model, run.optimizer, run.masters, run.base.tokenizer, dist, world, device, run.total,
                       math.ceil(a.warmup_ratio * run.total))
    if a.cache_image_features:
        stepper.image_cache = ImageFeatureCache(run.net)
    if stepper.trim_in_backward:
        return_freed_heap_after_decoder_backward(run.net)
    peak = peak_flops(device) if a.precision == "bf16" else None
    result = TrainResult(run.net, skipped=run.skipped)
    runtime_skipped = Counter(run.state.get("skipped_in_batches", {}))
    batches = iter(run.loader)
    run_start, run_tokens, run_samples = time.perf_counter(), 0, 0
    saved_at = run.start  # the step of the newest checkpoint in --output (run.start: none, or the resumed one)
    with _Interrupt(main) as interrupt:
        for step in range(run.start, run.total):
            if interrupt.agreed(dist, device):  # every process, after the same step
                _stop_interrupted(run_log, step, saved_at, run.total, runtime_skipped, log)
            data_start = time.perf_counter()
            micro = [next(batches) for _ in range(a.grad_accum)]
            for b in micro:
                runtime_skipped.update(b.skipped)
            step_start = time.perf_counter()  # the step's time is compute; data loading is logged beside it
            m = stepper.step(step, micro, step_start)
            if m is None:
                log(f"warning: step {step + 1}: every sample of the global batch was dropped; step skipped")
                continue
            m["data_s"] = step_start - data_start
            row_lengths, num_images = m.pop("row_lengths"), m.pop("num_images")
            m["epoch"] = round((step + 1) / run.steps_per_epoch, 4)
            if peak:
                flops = step_flops(run.cfg, row_lengths, num_images, a.stage == 2 and not run.lora, True) * world
                m["mfu"] = flops / m["step_time_s"] / (peak * world)
            run_tokens, run_samples = run_tokens + m["tokens"], run_samples + m["samples"]
            result.losses.append((step + 1, m["loss"]))
            run_log.step(m, (time.perf_counter() - run_start) / (step + 1 - run.start) * (run.total - step - 1))
            if a.save_every and (step + 1) % a.save_every == 0 and step + 1 < run.total:
                run_log.save_checkpoint(step + 1, runtime_skipped)
                saved_at = step + 1
    run_log.close()
    run_time = time.perf_counter() - run_start

    run.masters.keep_rounded_weights()  # the model's own names again (the masters stay float32 for the output)
    result.outputs = _write_outputs(a, run.base, run.model, run.masters, run.lora, run.llm_params,
                                    run.projector_params, dist, main)
    if main:
        ckpt.write_json(os.path.join(a.output, FINISHED), {"steps": run.total, "run": run.this_run})
    result.skipped = run.skipped + runtime_skipped
    log(f"done: {run.total - run.start} steps in {_hms(run_time)} ({run_samples} samples, {run_tokens:,} tokens, "
        f"{run_tokens / max(run_time, 1e-9):,.0f} tokens/s, data loading included)" +
        (f"; final loss {result.losses[-1][1]:.4f}" if result.losses else "") +
        (f"; image feature cache {stepper.image_cache.bytes / 2**20:,.1f} MiB" if stepper.image_cache else ""))
    if result.skipped:
        log("skipped records: " + ", ".join(f"{n} x {r}" for r, n in result.skipped.most_common()))
    log("wrote " + ", ".join(result.outputs))
    return result


class _Interrupt:
    """Ctrl-C (SIGINT) while the steps run. The first asks for a checkpoint after the current step and a stop
    there, not at once: mid-step the weights can be half-updated (--step-in-backward steps each parameter during
    backward), and the optimizer's state ahead of them. The second raises KeyboardInterrupt at once. Under
    torchrun each process gets its signal on its own, possibly during different steps, so before each step the
    processes all-reduce their requests (one number) and all stop after the same step. A terminal's Ctrl-C
    reaches torchrun's agent and its workers together, and the agent then sends each worker a SIGINT of its own
    (and a SIGKILL 30 s later if it has not exited): under torchrun a second SIGINT within FORWARDED_S of the first
    is that copy, not a second Ctrl-C. Installed in the main thread over Python's default handler only: a run
    started with SIGINT ignored, or inside a program with its own handler, keeps that."""

    FORWARDED_S = 2.0  # the agent forwards within milliseconds; a person's second Ctrl-C takes longer

    def __init__(self, main):
        self.main, self.requested, self.installed = main, False, False
        self.first_at = None
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return False

    def _handle(self, signum, frame):
        if self.requested:  # under torchrun: the agent's copy of the first, or a second Ctrl-C
            if time.monotonic() - self.first_at < self.FORWARDED_S:
                return
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested, self.first_at = True, time.monotonic()
        if not self.under_torchrun:  # the second: KeyboardInterrupt at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.main:  # os.write: print() here could re-enter a stderr write the signal interrupted
            os.write(2, b"\n" * sys.stderr.isatty() + b"llava-fast train: interrupted: saving a checkpoint after "
                        b"this step (Ctrl-C again to quit without it)\n")

    def agreed(self, dist, device):
        """Whether any process was interrupted (collective under torch.distributed)."""
        if dist is None:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)


def _stop_interrupted(run_log, done, saved_at, total, runtime_skipped, log):
    """After an interrupt: a resumable checkpoint of the `done` steps (unless one exists), one line, and
    KeyboardInterrupt (the CLI's exit code 130)."""
    output = run_log.a.output
    if done > saved_at:
        path = run_log.save_checkpoint(done, runtime_skipped)
        log(f"interrupted: saved step {done} of {total} in {path}; continue with --resume")
    elif done > 0:
        log(f"interrupted: step {done} of {total} is already in {os.path.join(output, f'checkpoint-{done}')}; "
            "continue with --resume")
    else:
        log("interrupted before the first step finished: nothing to save")
    run_log.close()
    raise KeyboardInterrupt


def _ignore_sigint(worker_id):
    """The data loader's workers leave Ctrl-C to the main process, which finishes its step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _Run:
    """What a run trains and how: the model and its trained parameters, the data, the optimizer, where it
    starts (resume)."""

    base: object
    net: nn.Module
    cfg: object
    lora: bool
    llm_params: list
    projector_params: list
    examples: list
    skipped: Counter
    total: int
    steps_per_epoch: int
    model: nn.Module = None  # TrainingLoss, wrapped by DDP / FSDP
    masters: MasterWeights = None
    optimizer: torch.optim.Optimizer = None
    this_run: dict = None
    start: int = 0
    state: dict = field(default_factory=dict)
    loader: object = None


def _setup(a, dist, rank, world, device, log) -> _Run:
    """Load and freeze the model, check the records, build the optimizer (resuming its state) and the loader."""
    lora, main = a.lora_r is not None, rank == 0
    existing = _check_output(a, main)
    if a.resume:  # before the load (a minute at 7B) and the records; the flags resolved by the load are None here
        _check_resume_settings(a, world, existing)
    dtype = torch.bfloat16 if a.precision == "bf16" and not a.fsdp else torch.float32  # FSDP gathers in bf16

    def trains(name):
        return name.startswith("multi_modal_projector.") or trains_llm_weight(name, a.stage, lora)

    # The records are checked before the weights load (a minute at 7B): a --strict run with a bad record, a data
    # file that is not LLaVA's JSON, or a --max-length past the context stop in seconds. Config and tokenizer suffice.
    files = ckpt.read_base(a.model, vision_tower=a.vision_tower)
    cfg = files.cfg
    if a.max_length is None:
        a.max_length = min(2048, cfg.text.max_position_embeddings)
    if a.max_length > cfg.text.max_position_embeddings:
        raise InputError(f"--max-length {a.max_length} exceeds the model's context of "
                         f"{cfg.text.max_position_embeddings} tokens")
    if a.template is None:
        a.template = "vicuna_v1" if cfg.template == "llava_hf" else cfg.template
    records = read_records(a.data)
    spec = EncodingSpec(files.tokenizer, get_template(a.template), files.image_token_id, cfg.num_image_tokens,
                        a.max_length, a.image_folder, a.system, image_token_count=_image_token_count(cfg))
    t0 = time.perf_counter()
    examples, skipped = _check_records(records, spec, a, dist, rank, world, log)
    checked_s = time.perf_counter() - t0
    global_batch = a.batch_size * a.grad_accum * world
    total, steps_per_epoch = total_steps(len(examples), global_batch, a.epochs, a.max_steps)

    # float32 in one process: frozen matrices stored in half precision stay so, widened on use (DDP and FSDP
    # replicate or shard the parameters as they find them)
    widen = dtype == torch.float32 and dist is None and not a.fsdp and not a.frozen_float32
    base = ckpt.load_base(a.model, vision_tower=a.vision_tower, projector=a.projector, device=device,
                          image_aspect_ratio=a.image_aspect_ratio, seed=a.seed, frozen_dtype=dtype, trains=trains,
                          files=files, keeps_stored=widened_on_use if widen else None)
    net = base.net
    if lora:
        add_lora(net, a.lora_r, a.lora_alpha, a.lora_dropout, seed=a.seed)
    llm_params, projector_params = trainable_parameters(net, a.stage, lora)
    fuse_frozen_projections(net, a.stage, a.fsdp)
    for p in net.parameters():
        if not p.requires_grad and not (widen and p.dtype in HALF_DTYPES):
            p.data = p.data.to(dtype)
    net.gradient_checkpointing = a.gradient_checkpointing
    if sparse_embedding_grad(net, a.stage, lora, dtype, dist is not None or a.fsdp):
        keep_embedding_grad_sparse(net)
    if a.recompute_mlp:
        net.recompute_mlp_activations()
    net.train()
    torch.manual_seed(a.seed + rank)  # LoRA dropout draws from here

    log(f"{len(examples)} records ({sum(e.has_image for e in examples)} with images) checked in "
        f"{checked_s:.1f}s; stage {a.stage}{' LoRA' if lora else ''}, template {a.template}; "
        f"global batch {global_batch} = {a.batch_size} x {a.grad_accum} accumulation x {world} processes; "
        f"{total} steps ({steps_per_epoch} per epoch, {len(examples) - steps_per_epoch * global_batch} records left "
        f"out of each epoch's last incomplete batch); {a.precision} on {device}")
    run = _Run(base, net, cfg, lora, llm_params, projector_params, examples, skipped, total, steps_per_epoch)

    module = TrainingLoss(net)
    trained = [n for n, _ in llm_params + projector_params]
    if not a.fsdp:  # DDP must see the final (bf16) parameters
        cast_on_use = casts_weights_on_use(net, dtype, a, lora, dist)
        run.masters = MasterWeights([(n, net.get_parameter(n)) for n in trained], dtype, net if cast_on_use else None)
        if widen:
            run.masters.widen_frozen_on_use(net)
    run.model = _wrap(module, net, a, dist, device)
    if a.fsdp:  # FSDP replaced the parameters by float32 shards
        run.masters = MasterWeights([(n, module.get_parameter(f"net.{n}")) for n in trained], torch.float32)
    master = dict(zip(run.masters.names, run.masters.masters))
    groups = [{"params": [master[n] for n, _ in params], "lr": lr, "peak_lr": lr}
              for params, lr in ((llm_params, a.lr), (projector_params, a.projector_lr)) if params]
    run.optimizer = make_optimizer(groups, a.weight_decay, device, sharded=a.fsdp)
    run.this_run = run_config(a, world)
    if a.resume:
        path = _check_resume_settings(a, world, existing)  # again: --max-length and --template are now resolved
        run.state = ckpt.load_state(path, run.model, run.optimizer, None if a.fsdp else run.masters)
        run.start = run.state["step"]
        log(f"resuming from {path} (step {run.start} of {total})")

    workers = a.workers if a.workers is not None else (
        min(8, (os.cpu_count() or 1) // world) if device.type == "cuda" else 0)
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the forked workers tokenize on their own
    run.loader = torch.utils.data.DataLoader(
        LlavaDataset(records, examples, spec, base.processor, strict=a.strict),
        batch_sampler=StepSampler(examples, a.batch_size, a.grad_accum, world, rank, a.seed, run.start, total),
        collate_fn=Collate(base.tokenizer.pad_token_id), num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None, worker_init_fn=_ignore_sigint if workers else None,
        generator=torch.Generator().manual_seed(a.seed))  # not the global RNG: resuming must not shift it
    return run


def _image_token_count(cfg):
    """LLaVA-NeXT: (height, width) -> the image's prompt positions, as the model's forward arranges them
    (image/anyres.py num_image_tokens); None for LLaVA v1 / 1.5 (num_image_tokens each)."""
    if not cfg.anyres:
        return None
    return functools.partial(anyres.num_image_tokens, pinpoints=cfg.image_grid_pinpoints,
                             tile_size=cfg.vision.image_size,
                             patches_per_side=cfg.vision.image_size // cfg.vision.patch_size,
                             base_tokens=cfg.num_image_tokens, exact=cfg.exact_unpad)


class _RunLog:
    """train_log.jsonl (one JSON line per step; on resume the lines after the checkpoint are dropped, as those
    steps run again), the progress line, and the resumable checkpoints. Only process 0 writes the log."""

    def __init__(self, a, run: _Run, main, world):
        self.a, self.run, self.main, self.world = a, run, main, world
        self.file = self.progress = None
        if not main:
            return
        path = os.path.join(a.output, "train_log.jsonl")
        kept = []
        if a.resume:
            with open(path) as f:
                kept = [line for line in f if _logged_step(line) <= run.start]
        ckpt.atomic_write(path, lambda tmp: open(tmp, "w").write("".join(kept)))
        self.file = open(path, "a")
        self.progress = Progress(run.total, a.log_every)

    def step(self, metrics, eta_s):
        if self.main:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
            self.progress.update(metrics, eta_s)

    def save_checkpoint(self, step, runtime_skipped):
        """-> the checkpoint's directory."""
        r = self.run
        return ckpt.save_state(self.a.output, step, r.model, r.optimizer, None if self.a.fsdp else r.masters,
                        {"step": step, "run": r.this_run, "world_size": self.world,
                         "skipped_in_batches": dict(runtime_skipped)}, keep=self.a.keep_checkpoints)

    def close(self):
        if self.main:
            self.progress.close()
            self.file.close()


def _logged_step(line):
    """The step of a train_log.jsonl line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _check_output(a, main):
    """The checkpoints already in --output (which must hold one to --resume, and none otherwise)."""
    if os.path.abspath(a.output) == os.path.abspath(a.model):
        raise InputError("--output must not be the --model directory")
    existing = ckpt.list_checkpoints(a.output)
    if not a.resume and (existing or any(os.path.exists(os.path.join(a.output, f))
                                         for f in ("train_log.jsonl", FINISHED))):
        raise InputError(f"--output {a.output} already holds a run; pass --resume to continue it, or choose "
                         "another --output")
    if a.resume and not existing:
        raise InputError(f"--resume: no complete checkpoint-STEP directory in {a.output}")
    if main:
        os.makedirs(a.output, exist_ok=True)
    return existing


def _check_records(records, spec, a, dist, rank, world, log):
    """check_records, each process taking every world-th record; everyone gets the whole result."""
    first_bad = {}
    examples, skipped = check_records(records, spec, indices=range(rank, len(records), world),
                                      text_only_ok=a.stage == 2, first_bad=first_bad)
    if dist:
        gathered = [None] * world
        dist.all_gather_object(gathered, (examples, skipped, first_bad))
        examples = sorted((e for part, _, _ in gathered for e in part), key=lambda e: e.index)
        skipped = sum((c for _, c, _ in gathered), Counter())
        first_bad = {r: min(f[r] for _, _, f in gathered if r in f) for r in skipped}

    def where(reason):  # the first record skipped for it: its position in the file, and its id when it has one
        index = first_bad[reason]
        record_id = records[index].get("id") if isinstance(records[index], dict) else None
        return f"records[{index}]" + (f", id {record_id!r}" if record_id is not None else "")

    reasons = ", ".join(f"{n} x {r} (first: {where(r)})" for r, n in skipped.most_common())
    if skipped and a.strict:
        raise InputError(f"--strict: {count(sum(skipped.values()), 'bad record')} in {a.data}: {reasons}")
    if skipped:
        log(f"warning: skipping {sum(skipped.values())} of {len(records)} records: {reasons}")
    return examples, skipped


def _wrap(module, net, a, dist, device):
    """DDP (replicas), FSDP2 (each decoder layer and the rest sharded), or the module itself."""
    if a.fsdp:
        if not dist:
            raise InputError("--fsdp needs several processes (torchrun --nproc-per-node N ...)")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if a.precision == "bf16" else None,
                                      reduce_dtype=torch.float32)
        for layer in net.language_model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    if dist:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


class _Stepper:
    """One optimizer step over a global batch's micro-batches (this process's share)."""

    def __init__(self, a, model, optimizer, masters, tokenizer, dist, world, device, total, warmup):
        self.a, self.model, self.optimizer, self.masters = a, model, optimizer, masters
        self.dist, self.world, self.device, self.total, self.warmup = dist, world, device, total, warmup
        # DDP reduces the gradients once, after the last micro-batch, when they accumulate in float32 parameters;
        # bf16 gradients are reduced after every micro-batch and accumulated in the float32 masters.
        self.defer_sync = dist is not None and not a.fsdp and masters.masters is masters.params
        # Two tokens, one target: a finite loss that a zero scale turns into zero gradients.
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
        self.dummy = (torch.tensor([[bos, bos]], device=device), torch.tensor([[-100, bos]], device=device))
        self.image_cache = None
        self.in_backward = self.from_model_grads = None
        self.trim, self.trim_in_backward = trims_heap(a, device)
        bf16_masters = masters.masters is not masters.params
        in_backward = a.step_in_backward or a.two_pass_clipping
        if dist is None and bf16_masters and a.grad_accum == 1 and not in_backward:
            self.from_model_grads = StepFromModelGrads(optimizer, masters)  # nothing to accumulate
        elif dist is None:  # DDP's reducer reads p.grad after the per-parameter hooks
            masters.fold_grads_in_backward()
        if in_backward:
            if dist is not None:
                flag = "--step-in-backward" if a.step_in_backward else "--two-pass-clipping"
                raise InputError(f"{flag} runs in one process: DDP reduces gradients after backward")
            self.in_backward = OptimizerInBackward(optimizer, masters, model.net)  # one process: unwrapped

    def step(self, step, micro, start):
        """Returns the step's metrics, or None when the global batch has no target (every sample dropped).
        start: perf_counter() when the step began (its batches already loaded)."""
        counts = torch.tensor([sum(b.num_targets for b in micro), sum(b.num_tokens for b in micro),
                               sum(b.num_samples for b in micro)], dtype=torch.float64, device=self.device)
        if self.dist:
            self.dist.all_reduce(counts)
        targets, tokens, samples = (int(x) for x in counts.tolist())
        if targets == 0:
            return None
        ce_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        row_lengths, num_images = [], 0
        for g in self.optimizer.param_groups:
            g["lr"] = cosine_lr(step, self.total, self.warmup, g["peak_lr"])
        for k, b in enumerate(micro):
            if b.num_samples:
                b = b.to(self.device)
                ids, labels, pixels, scale = b.input_ids, b.labels, b.pixel_values, b.num_targets * self.world / targets
                row_lengths += b.lengths
                num_images += 0 if pixels is None else int(pixels.shape[0])
            else:  # every sample of this micro-batch dropped: a zero-weighted row keeps the collectives in step
                (ids, labels), pixels, scale = self.dummy, None, 0.0
            features, sizes = None, b.image_sizes
            if self.image_cache is not None and pixels is not None:
                features, pixels = self.image_cache.features(pixels, b.image_keys, sizes), None
            last = k == len(micro) - 1
            if last and self.in_backward and self.a.two_pass_clipping:
                # first pass: the gradient norm only, each gradient freed as backward makes it; the forward
                # and backward run again below, the same way (no dropout), and step each clipped gradient
                self.in_backward.arm(self.device, norm_only=True)
                with self.masters.casting():
                    first = self.model(ids, labels, pixels, scale, features, sizes)
                if self.trim_in_backward:  # as in the second pass
                    return_freed_heap()
                first.backward()
                del first
                if self.trim:
                    return_freed_heap()
                norm = self.in_backward.disarm()
                self.in_backward.arm(self.device, scale=clip_factor(norm, self.a.max_grad_norm))
            elif last and self.in_backward:
                self.in_backward.arm(self.device)
            with self.model.no_sync() if self.defer_sync and not last else contextlib.nullcontext():
                with self.masters.casting():
                    loss = self.model(ids, labels, pixels, scale, features, sizes)
                if self.trim_in_backward:  # the forward's freed temporaries, before backward allocates
                    return_freed_heap()
                loss.backward()
            if not self.from_model_grads:
                self.masters.accumulate_grads()
            ce_sum += loss.detach().double() * targets / self.world
        if self.trim:  # the activations' freed heap, before the optimizer allocates
            return_freed_heap()
        if self.in_backward:  # every parameter already stepped
            grad_norm = self.in_backward.disarm()
        elif self.from_model_grads:
            grad_norm = self.from_model_grads.step(self.a.max_grad_norm)
        else:
            grad_norm = clip_or_norm(self.masters.masters, self.a.max_grad_norm)
            step_row_sparse(self.optimizer)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.masters.copy_to_model()
        if self.trim:
            return_freed_heap()
        if self.dist:
            self.dist.all_reduce(ce_sum)
        loss = float(ce_sum) / targets  # the step's one host sync
        elapsed = time.perf_counter() - start
        return {"step": step + 1, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm), "tokens": tokens, "samples": samples, "tokens_per_s": tokens / elapsed,
                "samples_per_s": samples / elapsed, "step_time_s": elapsed, "row_lengths": row_lengths,
                "num_images": num_images}


def clip_or_norm(params, max_norm):
    """Clip the gradients to a global norm of max_norm (0: no clipping); -> the norm before clipping.

    A sparse gradient (the embedding table's rows, `sparse_embedding_grad`) has its rows summed and counts by its
    stored values: its zeros add nothing to the norm, and clipping scales the values as clip_grad_norm_ scales a dense
    gradient (same bits in every row). Its norm is summed in another order than the dense tensor's, so the
    global norm can differ from clip_grad_norm_'s in the last bits (relative 1e-7)."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = sum_sparse_rows(p.grad)
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and grads:  # clip_grad_norm_'s arithmetic (clip_grads_with_norm_ reads p.grad, not values)
        torch._foreach_mul_(grads, clip_factor(norm, max_norm))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def sparse_embedding_grad(net, stage, lora, dtype, distributed=False):
    """Whether the run keeps the embedding table's gradient as the batch's rows (a sparse COO tensor) rather than
    a dense (V, C) one, which is zero in every row no token of the batch looks up: 32000 x 4096 float32 is 512 MiB
    at LLaVA-1.5-7B, held from backward to the step (or, stepping in backward, at backward's end) beside everything
    else. Float32 stage 2 full in one process (bf16 forms each float32 gradient at the step, smallest first, after
    the others are freed; DDP and FSDP reduce dense gradients); not with tied embeddings, whose gradient lm_head
    fills densely anyway."""
    embed = net.language_model.embed_tokens.weight
    return (stage == 2 and not lora and dtype == torch.float32 and not distributed
            and net.lm_head.weight is not embed)


def keep_embedding_grad_sparse(net):
    """The embedding table's gradient as the looked-up rows (see sparse_embedding_grad). Each backward's rows are
    summed (sum_sparse_rows) before they accumulate into .grad, so that accumulated micro-batches add as dense
    gradients do, each micro-batch's sum first: the same bits."""
    embed = net.language_model.embed_tokens
    embed.sparse = True
    embed.weight.register_hook(lambda grad: sum_sparse_rows(grad) if grad.is_sparse else grad)


def sum_sparse_rows(grad):
    """A sparse COO (V, C) gradient with repeated rows -> one entry per row, each the sum of its entries in the
    order they come, from zero: the order and so the bits of the dense embedding backward (which adds each
    token's row into a zeroed (V, C) table in token order) and of dense accumulation (earlier entries first).
    Not Tensor.coalesce(), whose sums of repeated rows differ from the dense backward's in the last bits."""
    rows, inverse = torch.unique(grad._indices()[0], sorted=True, return_inverse=True)
    values = grad._values()
    summed = values.new_zeros((len(rows), *values.shape[1:])).index_add_(0, inverse, values)
    return torch.sparse_coo_tensor(rows[None], summed, grad.shape, is_coalesced=True, check_invariants=False)


def step_row_sparse(optimizer, rows_per_chunk=1024):
    """The optimizer's AdamW step of each parameter whose gradient is sparse (then freed), so that
    optimizer.step() steps the rest. AdamW updates every row, touched or not (the moments decay and the
    parameter moves while they are non-zero), exactly as on the dense gradient: the same fused update runs on
    row chunks of the parameter and its moments, each with its chunk of the gradient made dense (16 MiB at 1024 x
    4096 float32, not 512 MiB). The fused update is elementwise and the CPU kernel splits a tensor into 64-byte
    units (16 float32), vectorized, with a scalar tail at the tensor's end only; a chunk of a multiple of 16 rows
    is a whole number of units whatever the width, so every element takes the path it takes in the whole tensor
    and the results are equal bit for bit (test_row_sparse_adamw_equals_torch_adamw_on_the_dense_gradient; a
    5-row chunk of a 23-wide table moves some second moments by an ulp: scalar tails inside the tensor)."""
    if rows_per_chunk % 16:
        raise ValueError(f"rows_per_chunk must be a multiple of 16, got {rows_per_chunk}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                _adamw_by_row_chunks(optimizer, group, p, rows_per_chunk)
                p.grad = None


def _adamw_state(optimizer, group, p):
    """p's AdamW state in `optimizer` (made as Adam._init_group makes a fused group's), for a step of its rows."""
    if not (isinstance(optimizer, torch.optim.AdamW) and group["fused"]) or group["amsgrad"] or group["capturable"]:
        raise ValueError("a gradient by rows is stepped by fused AdamW without amsgrad only")
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _adamw_rows(group, p, lo, hi, grad, state, step):
    """The fused AdamW update of rows lo:hi of p and its moments with their gradient `grad` (hi - lo, ...); `step`
    (a copy of the count before this step) is advanced, the state's count is not."""
    from torch.optim.adamw import adamw  # the functional AdamW that AdamW.step calls

    beta1, beta2 = group["betas"]
    with torch.no_grad():
        adamw([p.detach()[lo:hi]], [grad], [state["exp_avg"][lo:hi]], [state["exp_avg_sq"][lo:hi]], [], [step],
              fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


def _adamw_by_row_chunks(optimizer, group, p, rows_per_chunk=1024):
    state = _adamw_state(optimizer, group, p)
    grad = sum_sparse_rows(p.grad)
    rows, values = grad._indices()[0], grad._values()  # rows ascending, unique
    bounds = torch.arange(0, p.shape[0] + rows_per_chunk, rows_per_chunk, device=rows.device).clamp_(max=p.shape[0])
    starts = torch.searchsorted(rows, bounds).tolist()
    step_before = state["step"].clone()
    for k in range(len(bounds) - 1):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        g = torch.zeros((hi - lo, *p.shape[1:]), dtype=p.dtype, device=p.device)
        g.index_copy_(0, rows[starts[k]:starts[k + 1]] - lo, values[starts[k]:starts[k + 1]])
        # each chunk takes the step from its count before this step, as the whole does
        _adamw_rows(group, p, lo, hi, g, state, step_before.clone())
    state["step"].add_(1)  # the count the whole tensor's step leaves


def _full_trained_state(model, masters, fsdp):
    """name (ours) -> float32 tensor of every trained parameter, on rank 0 (collective under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=True))
        return {_strip_prefix(k): v for k, v in state.items()}
    return masters.state_dict()


def _write_outputs(a, base, model, masters, lora, llm_params, projector_params, dist, main):
    state = _full_trained_state(model, masters, a.fsdp)
    outputs = []
    if main:
        projector = {n: state[n] for n, _ in projector_params}
        if lora:
            adapter = {n: state[n] for n, _ in llm_params}
            ckpt.save_tensors(os.path.join(a.output, "adapter_model.safetensors"), {**adapter, **projector})
            ckpt.write_json(os.path.join(a.output, "adapter_config.json"), {
                "r": a.lora_r, "alpha": a.lora_alpha, "dropout": a.lora_dropout, "target_modules": list(TARGETS),
                "base_model": os.path.abspath(a.model),
                "vision_tower": os.path.abspath(a.vision_tower) if a.vision_tower else None,
                "projector": os.path.abspath(a.projector) if a.projector else None,
                "image_aspect_ratio": a.image_aspect_ratio})
            outputs += ["adapter_model.safetensors", "adapter_config.json"]
        else:
            layout = ckpt.save_checkpoint(a.output, base, state)
            outputs.append(f"{layout} checkpoint (config.json, model-*.safetensors)")
        if a.stage == 1:
            ckpt.save_tensors(os.path.join(a.output, "mm_projector.safetensors"), projector)
            outputs.append("mm_projector.safetensors")
        outputs.append("train_log.jsonl")
    if dist:
        dist.barrier()
    return [os.path.join(a.output, o) for o in outputs]
