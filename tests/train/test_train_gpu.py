"""The training step on CUDA, through the Triton kernels (skipped without a GPU).

Accuracy rule (flash-attention's): against a float32 torch reference, the Triton bf16 step's loss and every
gradient may be off by at most twice what the torch bf16 step is off by (plus a small floor).
"""

import checkpoints as ck
import pytest
import torch
from trainutil import make_records, write_data

from llava_fast import ops
from llava_fast.train import TrainArgs, train
from llava_fast.train import checkpoint as ckpt
from llava_fast.train.trainer import TrainingLoss, trainable_parameters

pytestmark = pytest.mark.gpu


def _step(tiny_ckpt, dtype, backend, checkpointing):
    ops.use_backend(backend)
    try:
        base = ckpt.load_base(tiny_ckpt, device=torch.device("cuda"))
        net = base.net
        trainable_parameters(net, stage=2, lora=False)
        net.to(dtype).train().gradient_checkpointing = checkpointing
        g = torch.Generator().manual_seed(0)
        ids = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(3, 32000, (3, 7), generator=g),
                         torch.full((3, 4), 32000), torch.randint(3, 32000, (3, 40), generator=g)], 1)
        labels = ids.masked_fill(ids == 32000, -100)
        labels[2, 30:] = -100  # a shorter row
        loss = TrainingLoss(net)(ids.cuda(), labels.cuda(), ck.random_pixels(3, 28, seed=1).cuda(), 1.0)
        loss.backward()
        return loss.float().item(), {n: p.grad.float() for n, p in net.named_parameters() if p.grad is not None}
    finally:
        ops.use_backend(ops.default_backend())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_step_through_triton_kernels_is_as_accurate_as_torch(tiny_ckpt, checkpointing):
    ref_loss, ref = _step(tiny_ckpt, torch.float32, "torch", checkpointing)
    torch_loss, torch_grads = _step(tiny_ckpt, torch.bfloat16, "torch", checkpointing)
    triton_loss, triton_grads = _step(tiny_ckpt, torch.bfloat16, "triton", checkpointing)
    assert abs(triton_loss - ref_loss) <= 2 * abs(torch_loss - ref_loss) + 1e-3 * abs(ref_loss)
    assert triton_grads.keys() == ref.keys()
    for name, want in ref.items():
        floor = 1e-3 * want.norm()
        assert (triton_grads[name] - want).norm() <= 2 * (torch_grads[name] - want).norm() + floor, name


def test_bf16_lora_run_on_gpu(tiny_ckpt, image_folder, tmp_path):
    data = write_data(tmp_path / "data.json", make_records(16, turns=2))
    result = train(TrainArgs(stage=2, model=tiny_ckpt, data=data, image_folder=image_folder, output=str(tmp_path / "o"),
                             batch_size=8, max_steps=20, lr=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                             projector_lr=1e-2))
    losses = [loss for _, loss in result.losses]
    assert all(loss == loss for loss in losses) and losses[-1] < 0.7 * losses[0]
