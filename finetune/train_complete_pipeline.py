"""The complete Kronos pipeline: data -> tokenizer -> predictor -> prediction -> evaluation -> backtest.

    python finetune/train_complete_pipeline.py --cpu --fast-mode --config-path examples/configs/demo.json
    python finetune/train_complete_pipeline.py --data-source sina --config-path my.json
    python finetune/train_complete_pipeline.py --skip-data-process --skip-tokenizer --config-path my.json
    torchrun --standalone --nproc_per_node=4 finetune/train_complete_pipeline.py --config-path my.json
    # multi-node: torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \
    #     --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 finetune/train_complete_pipeline.py --config-path my.json

Flags: --cpu, --data-source {qlib,sina,csv}, --skip-data-process, --skip-tokenizer, --skip-predictor,
--fast-mode, --config-path PATH, --resume (see README "Flags").
"""
from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)

from kronos import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Kronos complete pipeline: data processing, tokenizer and predictor training, "
        "prediction, evaluation and backtest.",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-path", metavar="PATH", help="JSON or YAML file overriding Config keys")
    parser.add_argument("--cpu", action="store_true", help="force CPU training and inference")
    parser.add_argument("--data-source", choices=["qlib", "sina", "csv"], help="where the market data comes from")
    parser.add_argument("--fast-mode", action="store_true", help="few epochs and batches (minutes on a CPU)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one config key")
    parser.add_argument("-q", "--quiet", action="store_true")
    cli.add_pipeline_flags(parser)
    args = parser.parse_args(argv)
    cli.setup_logging(args.quiet)
    try:
        config = cli.build_config(args)
        return cli.run_pipeline_command(args, config)
    except cli.KronosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
