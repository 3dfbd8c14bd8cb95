"""Data processors of the seed's `finetune/sina_data_processor.py`, now living in `kronos.data.sources`.

Kept so that existing scripts' `from sina_data_processor import DataProcessorFactory` keeps working::

    processor = DataProcessorFactory.create_processor("sina", config)   # or "qlib", "csv"
    processor.run_pipeline()
"""

from __future__ import annotations

from typing import Any

try:
    import kronos  # noqa: F401
except ImportError:  # a plain checkout without `pip install -e .`: use the package next to this folder
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kronos.data.sources import BaseDataProcessor, DataProcessorFactory  # noqa: E402

__all__ = [
    "BaseDataProcessor",
    "DataProcessorFactory",
    "QlibDataProcessor",  # noqa: F822  (module __getattr__ below)
    "CsvDataProcessor",  # noqa: F822
    "SinaDataProcessor",  # noqa: F822
]


def __getattr__(name: str) -> Any:
    # Source modules load on first use so a missing pyqlib does not break `import sina_data_processor`.
    if name in ("QlibDataProcessor", "CsvDataProcessor", "SinaDataProcessor"):
        import kronos.data.sources as sources

        return getattr(sources, name)
    raise AttributeError(f"module 'sina_data_processor' has no attribute '{name}'")
