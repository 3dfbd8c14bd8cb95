"""The complete Kronos pipeline: data -> tokenizer -> predictor -> prediction -> evaluation -> backtest.

    python finetune/train_complete_pipeline.py --cpu --fast-mode --config-path examples/configs/demo.json
    python finetune/train_complete_pipeline.py --data-source sina --config-path my.json
    python finetune/train_complete_pipeline.py --skip-data-process --skip-tokenizer --config-path my.json
    torchrun --standalone --nproc_per_node=4 finetune/train_complete_pipeline.py --config-path my.json
    # multi-node: torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \
    #     --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 finetune/train_complete_pipeline.py --config-path my.json

The same command as `kronos pipeline` (same flags: --config-path, --set KEY=VALUE, --fast-mode, --cpu, -q,
--data-source, the --skip-* flags and --resume; see README "Flags").
"""

import sys

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)
from kronos import cli


def main(argv=None) -> int:
    return cli.main(
        argv,
        command="pipeline",
        prog="train_complete_pipeline.py",
        description="Kronos complete pipeline: data processing, tokenizer and predictor training, "
        "prediction, evaluation and backtest.",
    )


if __name__ == "__main__":
    sys.exit(main())
