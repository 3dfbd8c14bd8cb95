"""Data sources behind one interface: ``DataProcessorFactory.create_processor(name, config)``.

Built-in names: ``qlib`` (:mod:`.qlib`, needs pyqlib), ``sina`` (:mod:`.sina`, Sina Finance HTTP API),
``csv`` (:mod:`.csv`, CSV/Parquet files) and ``ccxt`` (:mod:`.crypto`, crypto exchanges, needs ccxt). Add your
own with ``DataProcessorFactory.register(name, cls)``.
Source modules are imported on first use, so importing this package never needs pyqlib or ccxt.
"""

from __future__ import annotations

import importlib
from typing import Any

from kronos.data.sources.base import BaseDataProcessor, DataProcessorFactory

_LAZY = {
    "QlibDataProcessor": "kronos.data.sources.qlib",
    "CsvDataProcessor": "kronos.data.sources.csv",
    "SinaDataProcessor": "kronos.data.sources.sina",
    "CcxtDataProcessor": "kronos.data.sources.crypto",
}

__all__ = ["BaseDataProcessor", "DataProcessorFactory", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kronos.data.sources' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
