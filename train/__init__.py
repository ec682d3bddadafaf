"""The llava-fast trainer (both LLaVA stages), installed as `llava_fast.train`.

    llava-fast train --stage 1 --model vicuna-7b-v1.5 --vision-tower clip-vit-large-patch14-336 \\
        --data blip_laion_cc_sbu_558k.json --image-folder images --output stage1
    llava-fast train --stage 2 --model stage1 --data llava_v1_5_mix665k.json --image-folder data --output stage2
    torchrun --nproc-per-node 8 -m llava_fast.train --stage 2 ...          # DDP (add --fsdp to shard)

| module | what |
| --- | --- |
| `data.py` | LLaVA JSON records, `encode_conversation` (exact label spans), truncation, batch plan |
| `lora.py` | LoRA adapters on the decoder's linear layers, merging |
| `checkpoint.py` | the base model a run starts from, the llava-hf checkpoint it writes, resumable state |
| `trainer.py` | the loop: freezing per stage, AdamW + cosine, accumulation, bf16, DDP / FSDP2, logging |
| `cli.py` | `llava-fast train`, `llava-fast merge-lora` |
"""

from llava_fast.train.data import IGNORE_INDEX, encode_conversation, expand_and_truncate
from llava_fast.train.trainer import TrainArgs, TrainResult, train

__all__ = ["encode_conversation", "expand_and_truncate", "IGNORE_INDEX", "train", "TrainArgs", "TrainResult"]
