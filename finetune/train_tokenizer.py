"""Stage 1 of the official fine-tuning: train the Kronos tokenizer (one GPU, CPU, or torchrun DDP).

    python finetune/train_tokenizer.py --config-path my.yaml [--resume] [--cpu]
    torchrun --standalone --nproc_per_node=N finetune/train_tokenizer.py --config-path my.yaml

Outputs go to <save_path>/<tokenizer_save_folder_name>/ (checkpoints/best_model, checkpoints/last, metrics.jsonl,
summary.json). The same command as `kronos train-tokenizer` (a thin wrapper over kronos.cli.main); see
kronos.train.trainer for multi-node launches.
"""

import sys

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)
from kronos.cli import main

if __name__ == "__main__":
    sys.exit(
        main(
            command="train-tokenizer",
            prog="train_tokenizer.py",
            description="Stage 1: finetune the Kronos tokenizer (CPU, one GPU, or torchrun DDP).",
        )
    )
