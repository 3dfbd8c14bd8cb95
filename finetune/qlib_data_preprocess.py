"""Build the training dataset from Qlib data (the seed's `finetune/qlib_data_preprocess.py`).

Usage (from the repository root or from finetune/):
    python finetune/qlib_data_preprocess.py [--config-path CONFIG.yaml|CONFIG.json]

Reads the Qlib folder `qlib_data_path` for the pool `instrument`, cleans the bars, adds calendar features,
splits them by `train/val/test_time_range` (or `split_ratios`) and writes
`<dataset_path>/{train,val,test}.parquet` + `manifest.json`. Needs `pip install 'kronos[qlib]'`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import _bootstrap  # noqa: F401,E402  (makes `kronos` importable from a source checkout)

from kronos.config import Config  # noqa: E402
from kronos.data.sources import DataProcessorFactory  # noqa: E402
from kronos.errors import KronosError  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Kronos training dataset from Qlib data.")
    parser.add_argument("--config-path", default=None, help="JSON or YAML file overriding the default config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = Config.from_file(args.config_path) if args.config_path else Config()
        manifest = DataProcessorFactory.create_processor("qlib", config).run_pipeline()
    except KronosError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever the cause
        return 1
    rows = ", ".join(f"{name} {info['rows']} rows" for name, info in manifest["splits"].items())
    logging.getLogger("qlib_data_preprocess").info(
        "dataset ready at %s: %d symbols; %s", config.dataset_path, len(manifest["symbols"]), rows
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
