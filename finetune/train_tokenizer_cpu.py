"""Stage 1 on CPU only: the same training as train_tokenizer.py with device forced to 'cpu'.

    python finetune/train_tokenizer_cpu.py --config-path my.yaml [--resume]
    torchrun --standalone --nproc_per_node=2 finetune/train_tokenizer_cpu.py --config-path my.yaml   # gloo
"""
import sys

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)

from kronos.train import main

if __name__ == "__main__":
    sys.exit(main("tokenizer", force_cpu=True))
