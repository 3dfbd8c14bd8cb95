"""Stage 1 on CPU only: the same training as train_tokenizer.py with device forced to 'cpu'.

python finetune/train_tokenizer_cpu.py --config-path my.yaml [--resume]
torchrun --standalone --nproc_per_node=2 finetune/train_tokenizer_cpu.py --config-path my.yaml   # gloo
"""

import sys

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)
from kronos.cli import main

if __name__ == "__main__":
    sys.exit(
        main(
            command="train-tokenizer",
            prog="train_tokenizer_cpu.py",
            description="Stage 1: finetune the Kronos tokenizer (CPU, one GPU, or torchrun DDP).",
            cpu=True,
        )
    )
