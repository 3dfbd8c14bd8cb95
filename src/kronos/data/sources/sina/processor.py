"""The ``sina`` data source: K-lines of ``sina_symbols`` fetched with :class:`SinaClient` and cached on disk.

Raw bodies are cached on disk per (symbol, scale, datalen) so that a rerun after a failure only fetches what is
missing. The cache lives in ``sina_cache_dir``, by default ``<dataset_path>/raw_sina`` (the dataset store carries
non-dataset entries over when it rebuilds the folder, so the cache survives). Delete it to fetch fresh bars.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kronos import io as kio
from kronos.config import Config
from kronos.data.sources.base import BaseDataProcessor
from kronos.data.sources.sina.client import SinaClient
from kronos.data.sources.sina.parser import fill_missing_amount, normalize_symbols, parse_kline_body
from kronos.errors import DataError

logger = logging.getLogger(__name__)


def default_cache_dir(dataset_path: str) -> Path:
    """Where raw Sina bodies are cached when ``sina_cache_dir`` is empty: ``<dataset_path>/raw_sina``."""
    return Path(os.path.expanduser(dataset_path)) / "raw_sina"


class SinaDataProcessor(BaseDataProcessor):
    """The ``sina`` data source: K-lines of ``sina_symbols`` at ``sina_scale`` from Sina Finance.

    :meth:`download_data` fetches every symbol not yet cached (pausing ``sina_pause`` between symbols), logs and
    skips the ones that fail, and raises one DataError only when no symbol is available at all;
    :meth:`load_raw` reads the cache. Keyword ``client`` replaces the :class:`SinaClient` built from the config.
    """

    name = "sina"

    def __init__(self, config: Config | None = None, client: SinaClient | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.symbols: list[str] = normalize_symbols(cfg.sina_symbols)
        self.scale = int(cfg.sina_scale)
        self.datalen = int(cfg.sina_datalen)
        self.cache_dir = (
            Path(os.path.expanduser(cfg.sina_cache_dir)) if cfg.sina_cache_dir else default_cache_dir(cfg.dataset_path)
        )
        self.client = client or SinaClient(
            cfg.sina_base_url, timeout=cfg.sina_timeout, retries=cfg.sina_retries, pause=cfg.sina_pause
        )
        self.source_info.update(
            {
                "sina_base_url": self.client.base_url,
                "scale_minutes": self.scale,
                "datalen": self.datalen,
                "requested_symbols": list(self.symbols),
                "cache_dir": str(self.cache_dir),
                "volume_unit": "shares",  # Sina's numbers are kept as given
            }
        )

    def cache_path(self, symbol: str) -> Path:
        """The cached raw body of ``symbol`` (keyed by symbol, scale and datalen)."""
        return self.cache_dir / f"{symbol}_{self.scale}_{self.datalen}.txt"

    def _read_cached(self, symbol: str) -> pd.DataFrame | None:
        path = self.cache_path(symbol)
        if not path.is_file():
            return None
        try:
            return parse_kline_body(path.read_text(encoding="utf-8"), symbol, str(path), max_bars=self.datalen)
        except (DataError, OSError, UnicodeDecodeError) as exc:
            logger.warning("ignoring unreadable Sina cache file %s (%s); fetching %s again", path, exc, symbol)
            return None

    def download_data(self) -> None:
        """Fetch the symbols missing from the cache; failures are logged and recorded in ``skipped_symbols``."""
        self.skipped_symbols.clear()
        todo = [s for s in self.symbols if self._read_cached(s) is None]
        if len(todo) < len(self.symbols):
            logger.info(
                "Sina: %d of %d symbol(s) already cached in %s",
                len(self.symbols) - len(todo),
                len(self.symbols),
                self.cache_dir,
            )
        for i, symbol in enumerate(tqdm(todo, desc="sina download", unit="symbol", disable=None)):
            if i and self.client.pause > 0:
                self.client.sleep(self.client.pause)  # be polite between symbols
            try:
                url = self.client.url(symbol, self.scale, self.datalen)
                body = self.client.fetch_body(symbol, self.scale, self.datalen)
                # validate before caching: bad bodies are not kept
                frame = parse_kline_body(body, symbol, url, max_bars=self.datalen)
            except DataError as exc:
                logger.warning("%s", exc)
                self.skipped_symbols[symbol] = str(exc)
                continue
            try:
                kio.write_text(self.cache_path(symbol), body)
            except OSError as exc:
                raise DataError(
                    f"cannot write the Sina cache file {self.cache_path(symbol)}: {exc.strerror or exc}; "
                    "set config key 'sina_cache_dir' to a writable folder"
                ) from None
            logger.debug("Sina %s: %d bars cached", symbol, len(frame))
        failed = [s for s in self.symbols if s in self.skipped_symbols]
        if failed and len(failed) == len(self.symbols):
            first = self.skipped_symbols[failed[0]]
            raise DataError(f"Sina download failed for every symbol ({', '.join(failed)}); first error: {first}")
        if failed:
            logger.warning(
                "Sina: %d of %d symbol(s) failed and are left out: %s; rerun to fetch only those",
                len(failed),
                len(self.symbols),
                ", ".join(failed),
            )

    def load_raw(self) -> dict[str, pd.DataFrame]:
        """Canonical frames of the cached symbols (a missing ``amount`` derived as mean(OHLC) x volume)."""
        frames: dict[str, pd.DataFrame] = {}
        for symbol in self.symbols:
            frame = self._read_cached(symbol)
            if frame is None:
                self.skipped_symbols.setdefault(symbol, f"no cached Sina data in {self.cache_path(symbol)}")
                continue
            frames[symbol] = fill_missing_amount(frame)
        if not frames:
            raise DataError(
                f"no Sina data for {', '.join(self.symbols)} in the cache {self.cache_dir}; "
                "run download_data() first (check the network and config key 'sina_base_url')"
            )
        return frames
