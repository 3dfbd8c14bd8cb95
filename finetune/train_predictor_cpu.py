"""Stage 2 on CPU only: the same training as train_predictor.py with device forced to 'cpu'.

python finetune/train_predictor_cpu.py --config-path my.yaml [--resume]
torchrun --standalone --nproc_per_node=2 finetune/train_predictor_cpu.py --config-path my.yaml   # gloo
"""

import sys

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)
from kronos.cli import main

if __name__ == "__main__":
    sys.exit(
        main(
            command="train-predictor",
            prog="train_predictor_cpu.py",
            description="Stage 2: finetune the Kronos predictor (CPU, one GPU, or torchrun DDP).",
            cpu=True,
        )
    )
