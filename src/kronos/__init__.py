"""Kronos: a foundation model for financial K-lines, with data, training, inference and backtest tools.

The public API is imported lazily so that ``import kronos`` stays cheap for data-only work.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "kronos.config",
    "KronosError": "kronos.errors",
    "ConfigError": "kronos.errors",
    "DataError": "kronos.errors",
    "CheckpointError": "kronos.errors",
    "InputError": "kronos.errors",
    "DependencyError": "kronos.errors",
    "TrainingError": "kronos.errors",
    "BusyError": "kronos.errors",
    "Kronos": "kronos.model",
    "KronosTokenizer": "kronos.model",
    "KronosPredictor": "kronos.inference",
    # the official package's other names, for code written for the official repository
    "auto_regressive_inference": "kronos.inference",
    "calc_time_stamps": "kronos.inference",
    "get_model_class": "kronos.inference",
    "model_dict": "kronos.inference",
    "DataProcessorFactory": "kronos.data.sources",
    "BaseDataProcessor": "kronos.data.sources",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kronos' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
