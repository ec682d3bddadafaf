"""`llava-fast train` and `llava-fast merge-lora` (also `torchrun --nproc-per-node N -m llava_fast.train ...`).

    llava-fast train --stage {1,2} --model DIR --data FILE.json --image-folder DIR --output DIR
        [--vision-tower DIR] [--projector FILE] [--epochs E | --max-steps N] [--batch-size B] [--grad-accum G]
        [--lr LR] [--max-length L] [--template NAME] [--lora-r R --lora-alpha A] [--seed S] [--resume] [--strict]
    llava-fast merge-lora --adapter RUN_DIR --output DIR [--model BASE_DIR]
"""

from __future__ import annotations

import argparse
import os

from llava_fast.errors import CheckpointError, InputError


def build_parser():
    p = argparse.ArgumentParser(prog="llava-fast train", description="Train LLaVA: stage 1 (projector) or stage 2 "
                                "(projector + LLM, or LoRA). Multi-GPU: torchrun --nproc-per-node N -m "
                                "llava_fast.train ...")
    p.add_argument("--stage", type=int, required=True, choices=(1, 2))
    p.add_argument("--model", required=True, help="LLaVA checkpoint (any layout llava-fast loads), or a LLaMA/Vicuna "
                   "checkpoint with --vision-tower for stage 1 from scratch")
    p.add_argument("--data", required=True, help="LLaVA JSON: a list of {id, image, conversations}")
    p.add_argument("--image-folder", default=".", help="image paths in --data are relative to this directory")
    p.add_argument("--output", required=True, help="directory for the checkpoint, train_log.jsonl and resume states")
    p.add_argument("--vision-tower", help="CLIP checkpoint directory (original-LLaVA or LLaMA --model)")
    p.add_argument("--projector", help="projector weights to start from (a stage-1 mm_projector.safetensors, or "
                   "the original repo's mm_projector.bin)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=1.0)
    length.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int,
                   help="samples per process per micro-batch (default 32 stage 1, 16 stage 2)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 stage 1, 2e-5 stage 2, 2e-4 LoRA)")
    p.add_argument("--projector-lr", type=float, help="projector learning rate (default --lr; 2e-5 with LoRA)")
    p.add_argument("--max-length", type=int, help="tokens per sample, image tokens included (default 2048, or the "
                   "model's context if shorter)")
    p.add_argument("--template", help="chat template (default plain for stage 1; the checkpoint's for stage 2, "
                   "vicuna_v1 for llava-hf checkpoints)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument("--lora-r", type=int, help="train LoRA adapters of rank R on the LLM's linear layers (stage 2)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint-STEP in --output")
    p.add_argument("--strict", action="store_true", help="stop on the first bad record instead of skipping it")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="bf16: bf16 weights, float32 master weights (the GPU default); fp32 (the CPU default)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2) "
                   "across the torchrun processes instead of replicating them (DDP)")
    p.add_argument("--image-aspect-ratio", choices=("pad", "square"),
                   help="pad images to square first (default: stage 1 square, stage 2 pad, as LLaVA-1.5)")
    p.add_argument("--workers", type=int, help="data loader processes (default 0 on CPU, up to 8 per GPU)")
    p.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="resumable checkpoints kept (oldest deleted)")
    p.add_argument("--log-every", type=int, default=10, help="progress lines every N steps (when not a terminal)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available, cuda:LOCAL_RANK under torchrun)")
    return p


def main(argv=None):
    from llava_fast.train.trainer import TrainArgs, train

    args = vars(build_parser().parse_args(argv))
    train(TrainArgs(**args))
    return 0


def merge_lora_main(argv=None):
    import torch

    from llava_fast.config import read_json
    from llava_fast.train import checkpoint as ckpt
    from llava_fast.train.lora import add_lora, merge_lora

    p = argparse.ArgumentParser(prog="llava-fast merge-lora", description="Fold a LoRA run's adapters into its "
                                "base model and write a full llava-hf checkpoint.")
    p.add_argument("--adapter", required=True, help="the --output directory of a LoRA training run")
    p.add_argument("--output", required=True, help="directory for the merged checkpoint")
    p.add_argument("--model", help="base checkpoint (default: the one the run trained on)")
    p.add_argument("--vision-tower", help="CLIP directory (default: the run's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    config_path = os.path.join(args.adapter, "adapter_config.json")
    weights_path = os.path.join(args.adapter, "adapter_model.safetensors")
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise InputError(f"--adapter {args.adapter}: no adapter_config.json / adapter_model.safetensors "
                         "(the output of a `llava-fast train --lora-r ...` run)")
    config = read_json(config_path)
    base = ckpt.load_base(args.model or config["base_model"], vision_tower=args.vision_tower or config["vision_tower"],
                          device=torch.device(args.device), image_aspect_ratio=config.get("image_aspect_ratio"))
    add_lora(base.net, config["r"], config["alpha"], 0.0)
    adapter = ckpt.load_tensors(weights_path)
    params = dict(base.net.named_parameters())
    unknown = sorted(set(adapter) - set(params))
    missing = sorted(n for n in params if n.endswith((".lora_A", ".lora_B")) and n not in adapter)
    if unknown or missing:
        raise CheckpointError(f"{weights_path} does not fit this base model: unknown {unknown[:3]}, missing "
                              f"{missing[:3]}")
    with torch.no_grad():
        for name, tensor in adapter.items():
            params[name].copy_(tensor)
    changed = {n: base.net.get_parameter(n) for n in merge_lora(base.net)}
    changed.update({n: adapter[n] for n in adapter if n.startswith("multi_modal_projector.")})
    ckpt.save_llava_hf(args.output, base, changed)
    print(f"llava-fast merge-lora: wrote {args.output}")
    return 0
