"""K-line data: the canonical frame (:mod:`.schema`), sources (:mod:`.sources`), cleaning and splits
(:mod:`.processing`) and processed datasets on disk (:mod:`.store`).

Typical use::

    from kronos.config import Config
    from kronos.data import DataProcessorFactory, load_split

    manifest = DataProcessorFactory.create_processor(config.data_source, config).run_pipeline()
    train = load_split(config.dataset_path, "train")
"""

from __future__ import annotations

import importlib
from typing import Any

from kronos.data.schema import (
    KLINE_COLUMNS,
    SPLIT_COLUMNS,
    TIME_FEATURES,
    VALUE_COLUMNS,
    validate_kline_frame,
)
from kronos.data.store import SPLITS, dataset_exists, load_manifest, load_split, save_dataset

_LAZY = {
    "BaseDataProcessor": "kronos.data.sources",
    "DataProcessorFactory": "kronos.data.sources",
    "process_frames": "kronos.data.processing",
    "clean_kline_frame": "kronos.data.processing",
    "add_time_features": "kronos.data.processing",
}

__all__ = [
    "KLINE_COLUMNS",
    "SPLIT_COLUMNS",
    "TIME_FEATURES",
    "VALUE_COLUMNS",
    "SPLITS",
    "validate_kline_frame",
    "save_dataset",
    "load_split",
    "load_manifest",
    "dataset_exists",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kronos.data' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
