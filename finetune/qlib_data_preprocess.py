"""Build the training dataset from Qlib data (the seed's `finetune/qlib_data_preprocess.py`).

Usage (from the repository root or from finetune/):
    python finetune/qlib_data_preprocess.py [--config-path CONFIG.yaml|CONFIG.json] [--set KEY=VALUE]

Reads the Qlib folder `qlib_data_path` for the pool `instrument`, cleans the bars, adds calendar features,
splits them by `train/val/test_time_range` (or `split_ratios`) and writes
`<dataset_path>/{train,val,test}.parquet` + `manifest.json`. Needs Qlib: `pip install pyqlib`.
The same command as `kronos data --data-source qlib`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)
from kronos import cli


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(
        argv,
        command="data",
        prog="qlib_data_preprocess.py",
        data_source="qlib",
        description="Build the Kronos training dataset from Qlib data.",
    )


if __name__ == "__main__":
    sys.exit(main())
