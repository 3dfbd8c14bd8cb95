"""The data-source interface and the factory that picks a source by name.

A source only has to *load* data: :meth:`BaseDataProcessor.load_raw` returns one canonical raw frame per
symbol (see :mod:`kronos.data.schema`). A source that can read a few symbols at a time (``streams = True``:
:meth:`~BaseDataProcessor.list_symbols` and :meth:`~BaseDataProcessor.load_symbols`, as the Qlib and CSV sources
do) never holds the whole market in memory: the data step reads, cleans and writes ``data_chunk_symbols`` symbols
at a time, shared among the ranks under torchrun. Cleaning, calendar features, splits and the on-disk dataset are shared
by all sources, so every source produces the same dataset format.

Adding a source::

    from kronos.data.schema import validate_kline_frame
    from kronos.data.sources import BaseDataProcessor, DataProcessorFactory

    class MyProcessor(BaseDataProcessor):
        name = "mine"

        def load_raw(self):
            return {"AAPL": validate_kline_frame(fetch_somehow(), "my API")}

    DataProcessorFactory.register("mine", MyProcessor)
    DataProcessorFactory.create_processor("mine", config).run_pipeline()
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd

from kronos.config import Config
from kronos.data.processing import Shard, process_frames, stream_dataset
from kronos.data.store import save_dataset
from kronos.errors import ConfigError, DependencyError

logger = logging.getLogger(__name__)


class BaseDataProcessor(abc.ABC):
    """One data source: download (if needed) -> load raw frames -> process -> save the dataset.

    Subclasses set :attr:`name` and implement :meth:`load_raw`; they may override :meth:`download_data` and
    record symbols they leave out in :attr:`skipped_symbols` (symbol -> reason) and extra facts for the
    manifest in :attr:`source_info` (JSON-serialisable). Extra keyword arguments are kept in :attr:`options`.
    """

    name: str = "base"
    # True: list_symbols/load_symbols read a chunk of symbols at a time (else load_raw reads all at once, on rank 0)
    streams: bool = False

    def __init__(self, config: Config | None = None, **kwargs: Any) -> None:
        self.config: Config = config if config is not None else Config()
        self.options: dict[str, Any] = dict(kwargs)
        self.skipped_symbols: dict[str, str] = {}
        self.source_info: dict[str, Any] = {}
        self.manifest: dict[str, Any] | None = None

    def download_data(self) -> None:
        """Fetch raw data into a local cache when the source needs it (default: nothing to fetch)."""
        return None

    @abc.abstractmethod
    def load_raw(self) -> Mapping[str, pd.DataFrame]:
        """Return ``{symbol: raw frame}`` in the canonical schema; frames may still hold NaN or bad bars."""

    def list_symbols(self) -> list[str]:
        """Every symbol the source has (streaming sources list them without loading their bars).

        Default: everything :meth:`load_raw` returns, held until :meth:`load_symbols` hands it out."""
        self._raw: dict[str, pd.DataFrame] = {str(k): v for k, v in self.load_raw().items()}
        return sorted(self._raw)

    def load_symbols(self, symbols: list[str]) -> Mapping[str, pd.DataFrame]:
        """Raw frames of ``symbols`` (a chunk of :meth:`list_symbols`); a symbol without data may be left out
        (with a reason in :attr:`skipped_symbols`). A source may return :class:`~kronos.data.processing.Bars`
        (the bars of all the symbols in flat arrays, also a mapping of frames), which the data step uses as is."""
        held = getattr(self, "_raw", {})
        return {s: held.pop(s) for s in symbols if s in held}

    def process_raw_data(self) -> dict[str, pd.DataFrame]:
        """Load, clean, add time features and split; returns ``{"train": ..., "val": ..., "test": ...}``.

        The manifest describing the result is kept in :attr:`manifest`.
        """

        raw = self.load_raw()
        splits, self.manifest = process_frames(
            raw, self.config, self.name, skipped=self.skipped_symbols, source_info=self.source_info
        )
        return splits

    def run_pipeline(self, shard: Shard | None = None, chunk_symbols: int | None = None) -> dict[str, Any]:
        """download -> load, clean, split and save to ``config.dataset_path``, ``chunk_symbols`` (default: config
        key ``data_chunk_symbols``) symbols at a time; under torchrun ``shard`` shares the chunks among the ranks
        (see :func:`~kronos.data.processing.stream_dataset`). Returns the manifest written."""

        self.manifest = stream_dataset(self, self.config, shard, chunk_symbols)
        return self.manifest

    def run_whole(self) -> dict[str, Any]:
        """The data step with every symbol in memory at once (as before streaming; same dataset)."""
        self.download_data()
        splits = self.process_raw_data()
        assert self.manifest is not None
        save_dataset(self.config.dataset_path, splits, self.manifest)
        return self.manifest


ProcessorSpec = type | str


class DataProcessorFactory:
    """Creates data processors by name: built-ins ``qlib``, ``sina``, ``csv``, ``ccxt`` plus registered ones.

    Built-in sources are imported only when asked for, so a missing optional dependency (pyqlib, ccxt) or a broken
    source module affects that source alone. ``register(name, cls)`` adds or replaces a source.
    """

    _registry: dict[str, ProcessorSpec] = {
        "qlib": "kronos.data.sources.qlib:QlibDataProcessor",
        "sina": "kronos.data.sources.sina:SinaDataProcessor",
        "csv": "kronos.data.sources.csv:CsvDataProcessor",
        "ccxt": "kronos.data.sources.crypto:CcxtDataProcessor",
    }

    @classmethod
    def register(cls, name: str, processor_cls: type) -> None:
        """Make ``processor_cls`` (a :class:`BaseDataProcessor` subclass) available as ``name``."""
        if not isinstance(processor_cls, type) or not issubclass(processor_cls, BaseDataProcessor):
            raise ConfigError(f"data source '{name}' must be a subclass of BaseDataProcessor, got {processor_cls!r}")
        key = str(name).strip().lower()
        if not key:
            raise ConfigError("data source name must not be empty")
        cls._registry[key] = processor_cls

    @classmethod
    def available(cls) -> list[str]:
        """Names accepted by :meth:`create_processor`."""
        return sorted(cls._registry)

    @classmethod
    def get_class(cls, name: str) -> type:
        """The processor class for ``name`` (importing a built-in source on first use)."""
        key = str(name).strip().lower()
        spec = cls._registry.get(key)
        if spec is None:
            raise ConfigError(
                f"unknown data source '{name}'; known sources: {', '.join(cls.available())} "
                "(set config key 'data_source' or register a new one with DataProcessorFactory.register)"
            )
        if isinstance(spec, str):
            module_name, attr = spec.split(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise DependencyError(f"data source '{key}' cannot be loaded: {exc}") from None
            spec = getattr(module, attr)
            cls._registry[key] = spec
        return spec

    @classmethod
    def create_processor(cls, name: str, config: Config | None = None, **kwargs: Any) -> BaseDataProcessor:
        """Instantiate the processor registered as ``name`` with ``config`` and source-specific ``kwargs``."""
        return cls.get_class(name)(config, **kwargs)


__all__ = ["BaseDataProcessor", "DataProcessorFactory"]
