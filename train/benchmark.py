"""Training-step throughput on LLaVA shapes with random weights: tokens/s, MFU, peak memory, and the projected
wall-clock of a LLaVA stage on 8 GPUs beside the paper's.

    python -m llava_fast.train.benchmark --preset llava-1.5-7b --stage 1 --batch-size 32
    python -m llava_fast.train.benchmark --preset llava-1.5-7b --stage 2 --lora-r 128 --lora-alpha 256 --batch-size 16
    python -m llava_fast.train.benchmark --preset llava-1.5-7b --stage 2 --layers 8 --transformers

The step is the trainer's own (`_Stepper`: bf16 weights, float32 masters, fused AdamW, gradient checkpointing,
clipping) on synthetic rows of BOS + the image's tokens + `--text-tokens` text tokens (the last 60% of them
targets). Full stage-2 fine-tuning of 7B does not fit one 80 GB GPU (float32 masters, gradients and AdamW
moments alone are 16 bytes x 7B = 112 GB; the trainer shards them with --fsdp); `--layers N` measures it on an
N-layer decoder, whose MFU is the full model's to within the lm_head's share. `--transformers` also runs
LlavaForConditionalGeneration's forward + backward on the same batch (bf16 weights, its gradient
checkpointing) and reports both peak memories of that forward + backward.

Paper (Liu et al. 2023, LLaVA-1.5, 7B on 8 A100s): stage 1 ~3.5 h (558K samples), stage 2 ~10 h (665K samples).
"""

from __future__ import annotations

import argparse
import time

import torch

from llava_fast.errors import InputError
from llava_fast.train.data import Batch
from llava_fast.train.lora import add_lora
from llava_fast.train.trainer import (MasterWeights, TrainArgs, TrainingLoss, _Stepper, peak_flops, step_flops,
                                      trainable_parameters)

PAPER = {1: (558_000, 3.5), 2: (665_000, 10.0)}  # samples, hours on 8 A100s


def synthetic_batch(cfg, batch_size, text_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img = cfg.num_image_tokens
    text = torch.randint(3, min(cfg.text.vocab_size, 32000), (batch_size, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), torch.full((batch_size, n_img), cfg.image_token_id),
                     text], 1)  # (B, 1 + n_img + text_tokens)
    labels = ids.clone()
    labels[:, : 1 + n_img + int(0.4 * text_tokens)] = -100
    size = cfg.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=g)
    T = ids.shape[1]
    return Batch(ids, labels, pixels, batch_size, batch_size * T, int((labels[:, 1:] != -100).sum()), [T] * batch_size,
                 [])


def build(preset, layers, device):
    from llava_fast.model import LlavaForCausalLM
    from llava_fast.presets import preset_config, random_init_

    cfg = preset_config(preset)
    if layers:
        cfg.text.num_layers = layers
    with torch.device("meta"):
        net = LlavaForCausalLM(cfg)
    net = random_init_(net.to_empty(device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32))
    net.init_rope(device)
    return net


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lora = args.lora_r is not None
    net = build(args.preset, args.layers, device)
    cfg = net.cfg
    if lora:
        add_lora(net, args.lora_r, args.lora_alpha, 0.0)
    llm, projector = trainable_parameters(net, args.stage, lora)
    dtype = next(net.parameters()).dtype
    for p in net.parameters():
        p.data = p.data.to(dtype)  # LoRA adapters are created in float32
    masters = MasterWeights(llm + projector, dtype)
    net.gradient_checkpointing = not args.no_gradient_checkpointing
    net.train()
    optimizer = torch.optim.AdamW([{"params": masters.masters, "lr": 1e-5, "peak_lr": 1e-5}],
                                  fused=device.type == "cuda")
    targs = TrainArgs(stage=args.stage, model="", data="", output="",
                      precision="bf16" if dtype == torch.bfloat16 else "fp32")
    stepper = _Stepper(targs, TrainingLoss(net), optimizer, masters, _Tok(), None, 1, device, 10**6, 1)
    batch = synthetic_batch(cfg, args.batch_size, args.text_tokens)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        m = stepper.step(i, [batch], time.perf_counter())  # ends with a host sync (the loss)
        if i >= args.warmup:
            times.append(m["step_time_s"])
    step_time = sorted(times)[len(times) // 2]
    flops = step_flops(cfg, batch.lengths, args.batch_size, args.stage == 2 and not lora, True)
    peak = peak_flops(device)
    result = {"preset": args.preset, "stage": args.stage, "lora_r": args.lora_r, "layers": cfg.text.num_layers,
              "batch_size": args.batch_size, "tokens_per_row": batch.lengths[0], "step_time_s": step_time,
              "tokens_per_s": batch.num_tokens / step_time, "samples_per_s": args.batch_size / step_time,
              "mfu": flops / step_time / peak if peak else None,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    samples, paper_hours = PAPER[args.stage]
    result["projected_hours_8_gpus"] = samples / (result["samples_per_s"] * 8) / 3600
    result["paper_hours_8_a100"] = paper_hours
    if args.transformers:
        del stepper, optimizer, masters, net  # free the first model before building two more
        result.update(transformers_memory(cfg, batch, args, device))
    return result


class _Tok:  # what _Stepper needs of a tokenizer
    bos_token_id = 1


def _forward_backward_peak(fn, device):
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def transformers_memory(cfg, batch, args, device):
    """Peak memory of one forward + backward, transformers vs llava-fast, same batch and trainable split (with
    LoRA, transformers trains the projector only: peft is not a dependency)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b = batch.to(device)
    theirs = _transformers_peak(cfg, b, args, device, dtype)
    net = build(args.preset, args.layers, device)
    if args.lora_r is not None:
        add_lora(net, args.lora_r, args.lora_alpha, 0.0)
    trainable_parameters(net, args.stage, args.lora_r is not None)
    for p in net.parameters():
        p.data = p.data.to(dtype)
    net.gradient_checkpointing = not args.no_gradient_checkpointing
    net.train()
    loss = TrainingLoss(net)
    ours = _forward_backward_peak(lambda: loss(b.input_ids, b.labels, b.pixel_values, 1.0).backward(), device)
    return {"fwd_bwd_peak_memory_gib": ours, "transformers_fwd_bwd_peak_memory_gib": theirs}


def _transformers_peak(cfg, b, args, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    t, v = cfg.text, cfg.vision
    hf_cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                       image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act),
        text_config=LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                                num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
                                max_position_embeddings=t.max_position_embeddings),
        image_token_index=cfg.image_token_id, vision_feature_layer=cfg.vision_feature_layer,
        image_seq_length=cfg.num_image_tokens)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(hf_cfg).to(dtype)
    hf.requires_grad_(False)
    trained = hf.model.multi_modal_projector.parameters() if args.stage == 1 or args.lora_r else hf.parameters()
    for p in trained:
        p.requires_grad_(True)
    hf.model.vision_tower.requires_grad_(False)
    if not args.no_gradient_checkpointing:  # renamed activation_checkpointing_enable in transformers 5
        getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)()
    hf.train()

    def step():
        hf(input_ids=b.input_ids, pixel_values=b.pixel_values.to(dtype), labels=b.labels).loss.backward()

    step()  # warm up
    hf.zero_grad(set_to_none=True)
    return _forward_backward_peak(step, device)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llava_fast.train.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float, default=256.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-tokens", type=int, help="text tokens per row (default 64 stage 1, 320 stage 2)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--transformers", action="store_true", help="also measure transformers' forward+backward memory")
    args = p.parse_args(argv)
    if args.text_tokens is None:
        args.text_tokens = 64 if args.stage == 1 else 320
    if args.text_tokens < 1:
        raise InputError(f"--text-tokens must be at least 1, got {args.text_tokens}")
    r = run(args)
    for k, value in r.items():
        print(f"{k:38s} {value:.4g}" if isinstance(value, float) else f"{k:38s} {value}")
    return r


if __name__ == "__main__":
    main()
