"""The ``ccxt`` data source: public OHLCV bars of any crypto exchange ccxt supports (``pip install 'kronos[crypto]'``).

``ccxt_exchange`` (an id of ``ccxt.exchanges``: binance, okx, bybit, kraken, ...) and ``ccxt_symbols`` (unified
symbols such as ``BTC/USDT``) pick the markets; ``ccxt_timeframe`` the bar length; ``ccxt_since`` (inclusive) and
``ccxt_until`` (exclusive, empty: now) the UTC period. Bars are fetched in pages of ``ccxt_limit`` (0: the
exchange's maximum) with ccxt's rate limiter on; no API key is needed.

Every HTTP request goes through this module's guarded fetch instead of ccxt's own session: one wall-clock
deadline per attempt (``ccxt_timeout``; a dripping server is cut off), a size limit on the body (also after
decompression), redirects only to the same host, and timeouts/HTTP 429/5xx retried ``ccxt_retries`` times with
exponential backoff from ``ccxt_pause``. Pages with more rows than asked for, rows out of order or malformed rows
are refused, naming the symbol and the row.

Timestamps are the bars' open times in UTC (tz-naive); the bar still forming is left out. Volume is in base units
(BTC of BTC/USDT). ``amount`` is the quote volume (USDT) where the exchange gives it: Binance's kline rows carry it
(index 7), so spot and USDT-margined markets of binance/binanceus are read from the raw kline endpoint; elsewhere
ccxt's unified ``fetch_ohlcv`` has no quote volume and amount = volume x mean(open, high, low, close), said once.

Fetched bars are cached as CSV per (exchange, symbol, timeframe, since, until) in ``ccxt_cache_dir`` (default
``<dataset_path>/raw_ccxt``), so a rerun fetches only what failed; with an empty ``ccxt_until`` delete the cache
to fetch newer bars.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kronos import io as kio
from kronos.config import Config
from kronos.data.schema import KLINE_COLUMNS, derive_amount

# The guarded HTTP machinery of the Sina client (deadline watchdog, size-limited reads, same-host redirects).
from kronos.data.sources import guarded_http as guarded
from kronos.data.sources.base import BaseDataProcessor
from kronos.errors import ConfigError, DataError, DependencyError
from kronos.paths import safe_filename

logger = logging.getLogger(__name__)

CACHE_COLUMNS = ("timestamps", "open", "high", "low", "close", "volume", "quote_volume")
MARKETS_MAX_BYTES = 64 << 20  # Binance's exchangeInfo of every spot market is tens of MB
DEFAULT_LIMIT = 500  # bars per request when the exchange does not say its maximum
# exchanges whose kline rows carry the quote volume at index 7, and the raw endpoint per market type
BINANCE_RAW_KLINES = {"binance": {"spot": "publicGetKlines"}, "binanceus": {"spot": "publicGetKlines"}}
BINANCE_RAW_KLINES["binance"]["swap"] = "fapiPublicGetKlines"
BINANCE_FAMILY = ("binance", "binanceus")  # exchanges whose market loading can be limited to spot


def default_cache_dir(dataset_path: str) -> Path:
    """Where fetched bars are cached when ``ccxt_cache_dir`` is empty: ``<dataset_path>/raw_ccxt``."""
    return Path(os.path.expanduser(dataset_path)) / "raw_ccxt"


def _plain_url(url: str) -> str:
    """``url`` without user:password (a proxy's credentials are never logged)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _rebase(url: str, base: str) -> str:
    """``url`` sent to ``base`` (scheme, host, port and path prefix), keeping its own path."""
    old, new = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base)
    path = new.path.rstrip("/") + old.path
    return urllib.parse.urlunsplit((new.scheme, new.netloc, path, old.query, old.fragment))


def _rebase_all(value: Any, base: str) -> Any:
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return _rebase(value, base)
    if isinstance(value, dict):
        return {k: _rebase_all(v, base) for k, v in value.items()}
    return value


def _utc_ms(text: str, key: str) -> int:
    try:
        ts = pd.Timestamp(text)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' must be a date such as 2024-01-01, got {text!r}") from None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value // 1_000_000)


def _iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms").strftime("%Y-%m-%dT%H:%M")


class GuardedFetch:
    """Replaces an exchange's ``fetch``: GET only, deadline per attempt, size limits, same-host redirects, retries.

    ``max_bytes`` may be changed between calls (markets are large, kline pages small). Returns parsed JSON.
    """

    def __init__(
        self,
        exchange: Any,
        timeout: float,
        retries: int,
        pause: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.exchange = exchange
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.pause = float(pause)
        self.sleep = sleep
        self.max_bytes = MARKETS_MAX_BYTES
        # (host, "Basic ...") when ccxt_api_url carries user:password: sent to that host only, never logged
        self.auth: tuple[str, str] | None = None
        self._openers: dict[bool, urllib.request.OpenerDirector] = {}

    def _opener(self, url: str) -> urllib.request.OpenerDirector:
        loopback = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
        if loopback not in self._openers:
            handlers: list[Any] = [
                guarded.WatchedHTTPHandler,
                guarded.WatchedHTTPSHandler,
                guarded.SameHostRedirectHandler,
            ]
            if loopback:  # no proxy can reach a loopback server
                handlers.append(urllib.request.ProxyHandler({}))
            self._openers[loopback] = urllib.request.build_opener(*handlers)
        return self._openers[loopback]

    def __call__(self, url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        shown = _plain_url(url)
        if method.upper() != "GET":
            raise DataError(f"ccxt source makes public GET requests only, refused {method} {shown}")
        request_headers = dict(self.exchange.prepare_request_headers(headers))
        request_headers["Accept-Encoding"] = "gzip, deflate"
        request_headers.pop("Connection", None)
        if self.auth is not None and urllib.parse.urlsplit(url).netloc == self.auth[0]:
            request_headers["Authorization"] = self.auth[1]
        request = urllib.request.Request(url, headers=request_headers, method="GET")
        attempts = self.retries + 1
        last: BaseException | None = None
        for attempt in range(attempts):
            watch = guarded.Watchdog(self.timeout)
            guarded.WATCH.current = watch
            try:
                with watch, self._opener(url).open(request, timeout=self.timeout) as response:
                    text = guarded.decode(guarded.read_limited(response, watch, self.max_bytes), response.headers)
                break
            except guarded.Refused as exc:
                raise DataError(f"{exc} from {shown}") from None
            except Exception as exc:  # noqa: BLE001 - classified below, everything else re-raised
                detail = ""
                if isinstance(exc, urllib.error.HTTPError):
                    detail = self._error_detail(exc)
                    exc.close()
                if isinstance(exc, guarded.DeadlineExceeded) or watch.fired:
                    exc = TimeoutError(f"no complete answer within the {self.timeout:g}s deadline")
                elif not isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException)):
                    raise
                if not guarded.is_retryable(exc):
                    raise DataError(f"{guarded.describe(exc)}{detail} from {shown}") from None
                last = exc
                if attempt + 1 < attempts:
                    delay = self.pause * 2**attempt
                    reason = guarded.describe(exc)
                    logger.debug("ccxt %s: %s, retry %d/%d in %.2fs", shown, reason, attempt + 1, self.retries, delay)
                    if delay > 0:
                        self.sleep(delay)
            finally:
                guarded.WATCH.current = None
        else:
            assert last is not None
            raise DataError(f"failed after {attempts} attempt(s): {guarded.describe(last)} from {shown}")
        try:
            return json.loads(text)
        except ValueError:
            start = " ".join(text[:60].split())
            raise DataError(f"answer from {shown} is not JSON (starts {start!r})") from None

    @staticmethod
    def _error_detail(exc: urllib.error.HTTPError) -> str:
        """The exchange's own error message (e.g. Binance's ``{"code":-1121,"msg":"Invalid symbol."}``), one line."""
        try:
            raw = exc.read(2048)
        except Exception:  # noqa: BLE001 - the detail is optional
            return ""
        text = " ".join(raw.decode("utf-8", errors="replace").split())
        return f" ({text[:200]})" if text else ""


def make_exchange(cfg: Config, sleep: Callable[[float], None] = time.sleep) -> Any:
    """A ccxt exchange for ``cfg.ccxt_exchange`` with the rate limiter on and every request guarded."""
    try:
        import ccxt
    except ImportError:
        raise DependencyError(
            "data_source 'ccxt' needs the ccxt package: pip install 'kronos[crypto]' (or pip install ccxt)"
        ) from None
    name = cfg.ccxt_exchange.strip().lower()
    if name not in ccxt.exchanges:
        raise ConfigError(
            f"config key 'ccxt_exchange': unknown exchange '{cfg.ccxt_exchange}'; use a ccxt id such as binance, okx, "
            f"bybit, kraken ({len(ccxt.exchanges)} in ccxt.exchanges)"
        )
    exchange = getattr(ccxt, name)({"enableRateLimit": True, "timeout": int(cfg.ccxt_timeout * 1000)})
    guard = GuardedFetch(exchange, cfg.ccxt_timeout, cfg.ccxt_retries, cfg.ccxt_pause, sleep)
    if cfg.ccxt_api_url:
        base = _plain_url(cfg.ccxt_api_url)
        exchange.urls["api"] = _rebase_all(exchange.urls.get("api"), base)
        parts = urllib.parse.urlsplit(cfg.ccxt_api_url)
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            guard.auth = (urllib.parse.urlsplit(base).netloc, f"Basic {token}")
    if name in BINANCE_FAMILY and all(":" not in s for s in cfg.ccxt_symbols):
        # spot symbols only: load the spot markets alone (no futures endpoints asked)
        fetch_markets = exchange.options.get("fetchMarkets")
        if isinstance(fetch_markets, dict):
            fetch_markets["types"] = ["spot"]
        else:
            exchange.options["fetchMarkets"] = ["spot"]
    exchange.fetch = guard
    return exchange


def _page_rows(rows: Any, symbol: str, since: int, limit: int, width: int) -> list[list[float]]:
    """Rows ``[ts, open, high, low, close, volume(, quote volume)]`` of one page as floats, refusing bad pages."""
    where = f"page from {_iso(since)}"
    if not isinstance(rows, list):
        raise DataError(f"{where}: expected a list of bars, got {type(rows).__name__}")
    if len(rows) > limit:
        raise DataError(f"{where}: {len(rows)} bars in a page asked for at most {limit}; refused")
    out: list[list[float]] = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, (list, tuple)) or len(row) < width:
                raise ValueError
            values = [float(row[0])] + [float(row[k]) for k in (1, 2, 3, 4, 5)]
            if width > 6:
                values.append(float(row[7]) if row[7] is not None else math.nan)
            if not all(math.isfinite(v) for v in values[:6]):
                raise ValueError
        except (TypeError, ValueError):
            shown = " ".join(json.dumps(row, default=str)[:80].split())
            expected = "[time, open, high, low, close, volume, ...]"
            raise DataError(f"{where}: row {i} is malformed ({shown}); expected {expected}") from None
        if out and values[0] <= out[-1][0]:
            raise DataError(f"{where}: row {i} ({_iso(int(values[0]))}) is not after the row before it; refused")
        out.append(values)
    return out


class CcxtDataProcessor(BaseDataProcessor):
    """The ``ccxt`` data source; see the module docstring. Keyword ``exchange`` replaces the one built from config."""

    name = "ccxt"

    def __init__(self, config: Config | None = None, exchange: Any = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.exchange_id = cfg.ccxt_exchange.strip().lower()
        self.symbols: list[str] = list(dict.fromkeys(str(s).strip().upper() for s in cfg.ccxt_symbols))
        self.timeframe = cfg.ccxt_timeframe
        self.since_ms = _utc_ms(cfg.ccxt_since, "ccxt_since")
        self.until_ms = _utc_ms(cfg.ccxt_until, "ccxt_until") if cfg.ccxt_until else None
        if self.until_ms is not None and self.until_ms <= self.since_ms:
            raise ConfigError(
                f"config key 'ccxt_until' ({cfg.ccxt_until}) must be after 'ccxt_since' ({cfg.ccxt_since})"
            )
        self.cache_dir = (
            Path(os.path.expanduser(cfg.ccxt_cache_dir)) if cfg.ccxt_cache_dir else default_cache_dir(cfg.dataset_path)
        )
        self._exchange = exchange
        self.source_info.update(
            {
                "exchange": self.exchange_id,
                "timeframe": self.timeframe,
                "since": cfg.ccxt_since,
                "until": cfg.ccxt_until or "now",
                "requested_symbols": list(self.symbols),
                "cache_dir": str(self.cache_dir),
                "timestamps": "bar open time, UTC",
                "volume_unit": "base currency",
            }
        )
        if cfg.ccxt_api_url:
            self.source_info["api_url"] = _plain_url(cfg.ccxt_api_url)

    @property
    def exchange(self) -> Any:
        if self._exchange is None:
            self._exchange = make_exchange(self.config)
        return self._exchange

    # ------------------------------------------------------------------ cache
    def cache_path(self, symbol: str) -> Path:
        """The cached bars of ``symbol`` (keyed by exchange, symbol, timeframe, since and until)."""
        until = self.config.ccxt_until or "now"
        key = f"{self.exchange_id}_{symbol}_{self.timeframe}_{self.config.ccxt_since}_{until}"
        return self.cache_dir / f"{safe_filename(key)}.csv"

    def _read_cached(self, symbol: str) -> pd.DataFrame | None:
        path = self.cache_path(symbol)
        if not path.is_file():
            return None
        try:
            frame = pd.read_csv(path)
            if tuple(frame.columns) != CACHE_COLUMNS or frame.empty:
                raise ValueError(f"columns {list(frame.columns)}")
            frame["timestamps"] = pd.to_datetime(frame["timestamps"], format="ISO8601")
            for c in CACHE_COLUMNS[1:]:
                frame[c] = pd.to_numeric(frame[c], errors="raise").astype("float64")
        except (OSError, ValueError, TypeError, pd.errors.ParserError) as exc:
            logger.warning("ignoring unreadable ccxt cache file %s (%s); fetching %s again", path, exc, symbol)
            return None
        return frame

    # ------------------------------------------------------------------ fetching
    def page_limit(self) -> int:
        """Bars per request: ``ccxt_limit``, else the exchange's maximum (ccxt ``features``), else 500."""
        if self.config.ccxt_limit > 0:
            return int(self.config.ccxt_limit)
        features = getattr(self.exchange, "features", None) or {}
        for kind in ("spot", "swap"):
            section = features.get(kind) or {}
            if isinstance(section, dict) and "linear" in section and "fetchOHLCV" not in section:
                section = section.get("linear") or {}
            limit = ((section or {}).get("fetchOHLCV") or {}).get("limit") if isinstance(section, dict) else None
            if isinstance(limit, (int, float)) and limit > 0:
                return int(limit)
        return DEFAULT_LIMIT

    def _raw_method(self, market: dict) -> str | None:
        kind = "spot" if market.get("spot") else ("swap" if market.get("linear") else "")
        return BINANCE_RAW_KLINES.get(self.exchange_id, {}).get(kind)

    def fetch_symbol(self, symbol: str) -> pd.DataFrame:
        """Every bar of ``symbol`` in [since, until), paging by the limit; DataError on any failure."""
        ex = self.exchange
        ex.fetch.max_bytes = MARKETS_MAX_BYTES
        try:
            ex.load_markets()
            if symbol not in ex.markets:
                raise DataError(
                    f"symbol '{symbol}' is not a market of {self.exchange_id} (e.g. "
                    f"{', '.join(list(ex.symbols)[:3])}); check config key 'ccxt_symbols'"
                )
            market = ex.market(symbol)
            if self.timeframe not in (ex.timeframes or {}):
                raise ConfigError(
                    f"config key 'ccxt_timeframe': {self.exchange_id} has no timeframe '{self.timeframe}'; it has "
                    f"{', '.join(ex.timeframes or [])}"
                )
            tf_ms = int(ex.parse_timeframe(self.timeframe) * 1000)
        except (DataError, ConfigError):
            raise
        except Exception as exc:  # ccxt's own errors (BadSymbol, ExchangeError, ...)
            raise DataError(f"{self.exchange_id} markets: {type(exc).__name__}: {exc}") from None
        limit = self.page_limit()
        now = int(time.time() * 1000)
        end = min(self.until_ms, now) if self.until_ms is not None else now
        raw = self._raw_method(market)
        width = 8 if raw else 6
        ex.fetch.max_bytes = 65536 + 1024 * limit
        rows: list[list[float]] = []
        since = self.since_ms
        pages = 0
        while since < end:
            try:
                if raw:
                    interval = ex.timeframes[self.timeframe]
                    params = {"symbol": market["id"], "interval": interval, "startTime": since, "endTime": end - 1}
                    params["limit"] = limit
                    page = getattr(ex, raw)(params)
                else:
                    page = ex.fetch_ohlcv(symbol, self.timeframe, since, limit)
            except DataError as exc:
                raise DataError(f"page from {_iso(since)}: {exc}") from None
            except Exception as exc:  # ccxt's own errors
                raise DataError(f"page from {_iso(since)}: {type(exc).__name__}: {exc}") from None
            pages += 1
            got = [r for r in _page_rows(page, symbol, since, limit, width) if since <= r[0] < end]
            if not got:
                break
            rows.extend(got)
            since = int(got[-1][0]) + tf_ms
        rows = [r for r in rows if r[0] + tf_ms <= now]  # the bar still forming is not a bar yet
        if not rows:
            raise DataError(f"no bars of '{symbol}' between {_iso(self.since_ms)} and {_iso(end)} UTC")
        frame = pd.DataFrame(rows, columns=list(CACHE_COLUMNS) if width == 8 else list(CACHE_COLUMNS[:6]))
        if width == 6:
            frame["quote_volume"] = math.nan
        frame["timestamps"] = pd.to_datetime(frame["timestamps"].astype("int64"), unit="ms")
        logger.debug("ccxt %s %s: %d bars in %d page(s)", self.exchange_id, symbol, len(frame), pages)
        return frame

    def download_data(self) -> None:
        """Fetch the symbols missing from the cache; failures are logged and recorded in ``skipped_symbols``."""
        self.skipped_symbols.clear()
        todo = [s for s in self.symbols if self._read_cached(s) is None]
        if len(todo) < len(self.symbols):
            logger.info(
                "ccxt: %d of %d symbol(s) already cached in %s",
                len(self.symbols) - len(todo),
                len(self.symbols),
                self.cache_dir,
            )
        for symbol in tqdm(todo, desc=f"{self.exchange_id} download", unit="symbol", disable=None):
            try:
                frame = self.fetch_symbol(symbol)
            except DataError as exc:
                message = f"ccxt {self.exchange_id} symbol '{symbol}': {exc}"
                logger.warning("%s", message)
                self.skipped_symbols[symbol] = message
                continue
            out = frame.assign(timestamps=frame["timestamps"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
            try:
                kio.write_text(self.cache_path(symbol), out.to_csv(index=False))
            except OSError as exc:
                raise DataError(
                    f"cannot write the ccxt cache file {self.cache_path(symbol)}: {exc.strerror or exc}; "
                    "set config key 'ccxt_cache_dir' to a writable folder"
                ) from None
        failed = [s for s in self.symbols if s in self.skipped_symbols]
        if failed and len(failed) == len(self.symbols):
            first = self.skipped_symbols[failed[0]]
            raise DataError(f"ccxt download failed for every symbol ({', '.join(failed)}); first error: {first}")
        if failed:
            logger.warning(
                "ccxt: %d of %d symbol(s) failed and are left out: %s; rerun to fetch only those",
                len(failed),
                len(self.symbols),
                ", ".join(failed),
            )

    def load_raw(self) -> dict[str, pd.DataFrame]:
        """Canonical frames of the cached symbols: amount = quote volume, else volume x mean(OHLC) (said once)."""
        frames: dict[str, pd.DataFrame] = {}
        derived: list[str] = []
        for symbol in self.symbols:
            cached = self._read_cached(symbol)
            if cached is None:
                self.skipped_symbols.setdefault(symbol, f"no cached ccxt data in {self.cache_path(symbol)}")
                continue
            frame = cached.rename(columns={"quote_volume": "amount"})
            if frame["amount"].isna().all():
                derived.append(symbol)
                frame["amount"] = derive_amount(frame)
            frames[symbol] = frame[list(KLINE_COLUMNS)].reset_index(drop=True)
        if not frames:
            raise DataError(
                f"no ccxt data for {', '.join(self.symbols)} in the cache {self.cache_dir}; "
                "run download_data() first (check the network and config key 'ccxt_exchange')"
            )
        if derived:
            logger.info(
                "ccxt %s: no quote volume from the exchange; derived amount = volume x mean(open, high, low, close) "
                "for %d of %d symbol(s)",
                self.exchange_id,
                len(derived),
                len(frames),
            )
        else:
            logger.info("ccxt %s: amount = the exchange's quote volume for %d symbol(s)", self.exchange_id, len(frames))
        self.source_info["amount"] = "derived: volume x mean(OHLC)" if derived else "quote volume"
        return frames


__all__ = ["CcxtDataProcessor", "GuardedFetch", "default_cache_dir", "make_exchange"]
