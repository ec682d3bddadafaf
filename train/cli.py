"""`llava-fast train` and `llava-fast merge-lora` (also `torchrun --nproc-per-node N -m llava_fast.train ...`).

    llava-fast train --stage {1,2} --model DIR --data FILE.json --image-folder DIR --output DIR
        [--vision-tower DIR] [--projector FILE] [--epochs E | --max-steps N] [--batch-size B] [--grad-accum G]
        [--lr LR] [--max-length L] [--template NAME] [--lora-r R --lora-alpha A] [--seed S] [--resume] [--strict]
        [--overwrite]
    llava-fast merge-lora --adapter RUN_DIR --output DIR [--model BASE_DIR] [--overwrite]

A non-empty --output is refused unless --overwrite (train: or --resume, to continue the run there). Every
mismatch (an adapter of another model's shapes, a missing or unreadable file) is an error naming the files.
"""

from __future__ import annotations

import os

from llava_fast.cli import SubcommandParser
from llava_fast.errors import CheckpointError, InputError


def build_parser():
    p = SubcommandParser(prog="llava-fast train", description="Train LLaVA: stage 1 (projector) or stage 2 "
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
    p.add_argument("--overwrite", action="store_true", help="train into a non-empty --output, replacing the run "
                   "or checkpoint there")
    p.add_argument("--strict", action="store_true", help="stop on the first bad record instead of skipping it")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this global norm (0: no "
                   "clipping; default 1.0)")
    p.add_argument("--step-in-backward", action="store_true", help="update each parameter during backward as soon "
                   "as its gradient is final, so all gradients never exist at once (less memory, same losses; needs "
                   "--max-grad-norm 0 and one process; bf16 stage 2 full also keeps no bf16 copy of the trained "
                   "weights, each made from its float32 master where an op reads it)")
    p.add_argument("--two-pass-clipping", action="store_true", help="with clipping: a first forward + backward "
                   "only takes the gradient norm, a second steps each parameter during backward with its clipped "
                   "gradient, so all gradients never exist at once (4 bytes a trained parameter less, for a second "
                   "forward + backward; same losses to float32 rounding; one process, --grad-accum 1; bf16 stage 2 "
                   "full: no bf16 copy of the trained weights either, as --step-in-backward)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--recompute-mlp", action="store_true", help="with --no-gradient-checkpointing, stage 2 full: each "
                   "decoder MLP keeps only its input and recomputes gate, up and SwiGLU in backward (a third of the "
                   "activations for two more GEMMs per layer; same losses)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="bf16: bf16 weights, float32 master weights (the GPU default); fp32 (the CPU default): "
                   "float32 arithmetic, the frozen matrices that the checkpoint stores in float16/bfloat16 (LLaVA's "
                   "are) held so and widened to float32 where an op reads them in one process (exact: half the "
                   "bytes, the same bits); a float32 checkpoint, or DDP and FSDP, hold float32 as before")
    p.add_argument("--frozen-float32", action="store_true", help="fp32: hold the frozen matrices in float32 even "
                   "where the checkpoint stores them in float16/bfloat16: 2 bytes more per frozen parameter, no "
                   "widening where an op reads them (~6-12%% of a LoRA step at LLaVA-1.5-7B shapes); same losses")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2) "
                   "across the torchrun processes instead of replicating them (DDP)")
    p.add_argument("--image-aspect-ratio", choices=("pad", "square"),
                   help="pad images to square first (default: stage 1 square, stage 2 pad, as LLaVA-1.5; "
                   "LLaVA-NeXT checkpoints tile every image with AnyRes instead)")
    p.add_argument("--max-image-pixels", type=int, help="largest image file, width x height, read (default "
                   "67108864 = 8192 x 8192; a larger one is a bad record)")
    p.add_argument("--workers", type=int, help="data loader processes (default 0 on CPU, up to 8 per GPU)")
    p.add_argument("--cache-image-features", action="store_true", help="keep the frozen vision tower's features "
                   "of each image in host memory, so later epochs skip the tower (same losses)")
    p.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="resumable checkpoints kept (oldest deleted)")
    p.add_argument("--log-every", type=int, default=10, help="progress lines every N steps (when not a terminal)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available, cuda:LOCAL_RANK under torchrun)")
    return p


def main(argv=None):
    from llava_fast.train.trainer import TrainArgs, train

    args = vars(build_parser().parse_args(argv))
    overwrite = args.pop("overwrite")
    max_image_pixels = args.pop("max_image_pixels")
    if max_image_pixels is not None:  # the data loader's processes are forked after this, and inherit it
        if max_image_pixels < 1:
            raise InputError(f"--max-image-pixels must be at least 1, got {max_image_pixels}")
        from llava_fast.image import set_max_image_pixels

        set_max_image_pixels(max_image_pixels)
    if overwrite and args["resume"]:
        raise InputError("--overwrite and --resume contradict each other: continue the run in --output, or replace it")
    run = TrainArgs(**args)
    run.resolved()  # bad settings fail before --overwrite clears anything
    _check_inputs(run)
    if not args["resume"]:
        check_new_output(args["output"], overwrite, training=True)
    train(run)
    return 0


def _check_inputs(run):
    """What the run reads, checked before the base model loads (a 7B load takes a minute; the data file was
    read only after it): the data file and image folder exist, the template and device are known."""
    from llava_fast.checkpoints.load import resolve_device_dtype
    from llava_fast.prompts.templates import get_template

    if not os.path.isfile(run.data):
        raise InputError(f"--data {run.data}: file not found")
    if run.projector and not os.path.isfile(run.projector):
        raise InputError(f"--projector {run.projector}: file not found")
    _check_output_is_not_an_input(run.output, (run.model, "--model"), (run.vision_tower, "--vision-tower"))
    if not os.path.isdir(run.image_folder):
        raise InputError(f"--image-folder {run.image_folder}: not a directory")
    if run.template is not None:
        get_template(run.template)
    # Also without --device: on the CPU it checks LLAVA_FAST_CPU_ISA, which a run with no --device ignored when
    # it named a table that is unknown or that the CPU lacks (every other command refuses it).
    resolve_device_dtype(run.device)


def _check_output_is_not_an_input(output, *inputs):
    """--output names no directory the command reads, by any path to it (a symlink, `dir/.`): with --overwrite,
    a train run with --output the --model directory cleared and then replaced the checkpoint it started from."""
    for path, what in inputs:
        if path and os.path.realpath(output) == os.path.realpath(path):
            raise InputError(f"--output {output} is {what} directory: choose another --output")


def check_new_output(path, overwrite, training=False):
    """Refuse to write into an existing file or non-empty directory unless --overwrite (nothing already done is
    lost by accident). With --overwrite, training removes a previous run's resumable state there, so a later
    --resume cannot pick up a checkpoint of the replaced run."""
    if os.path.isfile(path):
        raise InputError(f"--output {path} is a file, not a directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if not overwrite:
        hint = "; pass --resume to continue the run there," if training else ";"
        raise InputError(f"--output {path} already exists and is not empty{hint} pass --overwrite to replace "
                         "it, or choose another --output")
    import re
    import shutil

    # Under torchrun, process 0 clears it, before the processes rendezvous.
    if not training or os.environ.get("RANK", "0") != "0":
        return
    for name in os.listdir(path):
        if re.fullmatch(r"checkpoint-\d+(\.tmp)?", name):
            shutil.rmtree(os.path.join(path, name))
    from llava_fast.train.trainer import FINISHED

    for name in ("train_log.jsonl", FINISHED):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))


def merge_lora_main(argv=None):
    import torch

    from llava_fast.checkpoints.config import read_json
    from llava_fast.train import checkpoint as ckpt
    from llava_fast.train.lora import add_lora, merge_lora

    p = SubcommandParser(prog="llava-fast merge-lora", description="Fold a LoRA run's adapters into its "
                                "base model and write a full llava-hf checkpoint.")
    p.add_argument("--adapter", required=True, help="the --output directory of a LoRA training run")
    p.add_argument("--output", required=True, help="directory for the merged checkpoint")
    p.add_argument("--model", help="base checkpoint (default: the one the run trained on)")
    p.add_argument("--vision-tower", help="CLIP directory (default: the run's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = p.parse_args(argv)
    from llava_fast.checkpoints.load import resolve_device_dtype

    device, _ = resolve_device_dtype(args.device)  # before the base model loads ("bogus" was a traceback there)
    config_path = os.path.join(args.adapter, "adapter_config.json")
    weights_path = os.path.join(args.adapter, "adapter_model.safetensors")
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise InputError(f"--adapter {args.adapter}: no adapter_config.json / adapter_model.safetensors "
                         "(the output of a `llava-fast train --lora-r ...` run)")
    config = read_json(config_path)
    absent = [k for k in ("r", "alpha", "base_model") if not isinstance(config, dict) or k not in config]
    if absent:
        raise CheckpointError(f"{config_path}: missing {', '.join(absent)} (not written by `llava-fast train`)")
    model_dir = args.model or config["base_model"]
    if not os.path.isdir(model_dir):
        raise InputError(f"the base model {model_dir} ({'--model' if args.model else 'from ' + config_path}) is "
                         "not a directory; pass --model BASE_DIR")
    _check_output_is_not_an_input(args.output, (model_dir, "the base model"), (args.adapter, "--adapter"))
    check_new_output(args.output, args.overwrite)
    base = ckpt.load_base(model_dir, vision_tower=args.vision_tower or config.get("vision_tower"),
                          device=device, image_aspect_ratio=config.get("image_aspect_ratio"))
    add_lora(base.net, config["r"], config["alpha"], 0.0)
    adapter = ckpt.load_tensors(weights_path)
    params = dict(base.net.named_parameters())
    unknown = sorted(set(adapter) - set(params))
    missing = sorted(n for n in params if n.endswith((".lora_A", ".lora_B")) and n not in adapter)
    if unknown or missing:
        raise CheckpointError(f"{weights_path} does not fit the base model {model_dir}: unknown {unknown[:3]}, "
                              f"missing {missing[:3]}")
    misfit = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in sorted(adapter.items())
              if t.shape != params[n].shape]
    if misfit:
        name, got, want = misfit[0]
        raise CheckpointError(f"{weights_path} was trained on a model of other shapes than the base model "
                              f"{model_dir}: {name} is {got} in the adapter, {want} in the base "
                              f"({len(misfit)} tensors differ)")
    with torch.no_grad():
        for name, tensor in adapter.items():
            params[name].copy_(tensor)
    changed = {n: base.net.get_parameter(n) for n in merge_lora(base.net)}
    changed.update({n: adapter[n] for n in adapter if n.startswith("multi_modal_projector.")})
    ckpt.save_checkpoint(args.output, base, changed)
    print(f"llava-fast merge-lora: wrote {args.output}")
    return 0
