"""Sina Finance K-line source: a small HTTP client and the ``sina`` data processor.

Sina serves A-share K-lines (``sh``/``sz``/``bj`` symbols) from two twin endpoints that take the same query
``?symbol=sh600000&scale=240&ma=no&datalen=1023``:

* JSONP (default, ``sina_base_url``): ``.../jsonp_v2.php/=/CN_MarketDataService.getKLineData``. The body is an
  optional ``/*<script>location.href='//sina.com';</script>*/`` prefix, then ``=(`` JSON ``);`` — the callback
  name is whatever sits before ``=`` in the URL path (empty here, ``var _x`` for ``.../var%20_x=/...``).
* plain JSON: ``.../json_v2.php/CN_MarketData.getKLineData`` returns the bare array.

The array holds objects whose values are strings: ``day`` (``2024-01-10`` for daily bars, ``2024-01-10 14:55:00``
for minute bars, the bar's end time), ``open``, ``high``, ``low``, ``close``, ``volume`` and, usually, ``amount``.
Unknown symbols give ``null`` (or ``=(null);``). Numbers are kept as Sina gives them: volume is in shares (not
the 100-share lots of some other feeds) and amount in yuan; a missing ``amount`` is derived later as
``volume * mean(open, high, low, close)`` (the spec's rule for an absent amount).

Raw bodies are cached on disk per (symbol, scale, datalen) so that a rerun after a failure only fetches what is
missing. The cache lives in ``sina_cache_dir``, by default ``<dataset_path>/raw_sina`` (the dataset store carries
non-dataset entries over when it rebuilds the folder, so the cache survives). Delete it to fetch fresh bars.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kronos import io as kio
from kronos.config import Config
from kronos.data.schema import KLINE_COLUMNS, PRICE_COLUMNS, VALUE_COLUMNS, derive_amount
from kronos.data.sources.base import BaseDataProcessor
from kronos.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SINA_JSONP_URL = "https://quotes.sina.cn/cn/api/jsonp_v2.php/=/CN_MarketDataService.getKLineData"
SINA_JSON_URL = "https://money.finance.sina.com.cn/quotes_service/api/json_v2.php/CN_MarketData.getKLineData"
SINA_SCALES = (5, 15, 30, 60, 240)

# Sina answers bare clients (no browser User-Agent, no Referer) with 403 or an empty page.
DEFAULT_HEADERS = {
    "User-Agent": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
    ),
    "Referer": "https://finance.sina.com.cn",
    "Accept": "*/*",
}

_SYMBOL_RE = re.compile(r"^(sh|sz|bj)(\d{6})$")
_SUFFIX_SYMBOL_RE = re.compile(r"^(\d{6})\.(sh|sz|bj)$")  # 600000.SH, the other common spelling
_COMMENT_RE = re.compile(r"^\s*/\*.*?\*/", re.S)
# JSONP wrapper: optional "var", optional callback name, optional "=", then "( payload )" and an optional ";".
_JSONP_RE = re.compile(r"^(?:var\s+)?(?:[A-Za-z_$][\w$.]*)?\s*=?\s*\((?P<payload>.*)\)\s*;?\s*$", re.S)
_ASSIGN_RE = re.compile(r"^(?:var\s+)?[A-Za-z_$][\w$.]*\s*=\s*(?P<payload>.*?)\s*;?\s*$", re.S)
_BARE_KEY_RE = re.compile(r"([{,]\s*)([A-Za-z_]\w*)(\s*:)")  # {day:"..."}: older Sina bodies are JS literals


# ---------------------------------------------------------------------------------------------- symbols
def normalize_symbol(symbol: Any) -> str:
    """Return ``symbol`` as Sina spells it (``sh600000``); accepts ``SH600000`` and ``600000.SH`` too.

    Raises ConfigError naming the symbol when it is not an exchange prefix (sh, sz, bj) plus six digits.
    """
    if not isinstance(symbol, str):
        raise ConfigError(f"config key 'sina_symbols': symbol {symbol!r} must be a string like 'sh600000'")
    s = symbol.strip().lower()
    m = _SUFFIX_SYMBOL_RE.match(s)
    if m:
        s = m.group(2) + m.group(1)
    if not _SYMBOL_RE.match(s):
        raise ConfigError(
            f"config key 'sina_symbols': invalid symbol '{symbol}'; use an exchange prefix (sh, sz, bj) and six "
            "digits, e.g. sh600000, sz000001, bj430047"
        )
    return s


def normalize_symbols(symbols: Iterable[Any]) -> list[str]:
    """Validate, lower-case and de-duplicate ``symbols`` keeping their order."""
    if isinstance(symbols, str):
        symbols = [s for s in re.split(r"[,\s]+", symbols) if s]
    out: list[str] = []
    for sym in symbols:
        s = normalize_symbol(sym)
        if s not in out:
            out.append(s)
    if not out:
        raise ConfigError("config key 'sina_symbols' is empty; list at least one symbol, e.g. [\"sh600000\"]")
    return out


# ---------------------------------------------------------------------------------------------- parsing
def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Older Sina bodies are JavaScript literals with unquoted keys: {day:"2024-01-10",open:"6.57"}.
        return json.loads(_BARE_KEY_RE.sub(r'\1"\2"\3', text))


def _extract_payload(text: str) -> str:
    """Strip the anti-embedding comment and a JSONP wrapper, returning the JSON text inside."""
    s = text.lstrip("\ufeff").strip()
    while True:  # the /*<script>location.href='//sina.com';</script>*/ prefix (possibly repeated)
        m = _COMMENT_RE.match(s)
        if not m:
            break
        s = s[m.end() :].strip()
    if not s or s[0] in '[{"' or s.startswith("null"):
        return s.rstrip(";").strip()
    m = _JSONP_RE.match(s)
    if m:
        return m.group("payload").strip()
    m = _ASSIGN_RE.match(s)  # var _x=[...]; without parentheses
    if m:
        return m.group("payload").strip()
    return s


def parse_kline_body(text: str, symbol: str, url: str = "", max_bars: int | None = None) -> pd.DataFrame:
    """Parse one Sina response body (JSONP or plain JSON) into a canonical K-line frame.

    Columns: ``timestamps`` (datetime64[ns], sorted, unique) and ``open, high, low, close, volume, amount``
    (float64; ``amount`` is NaN where Sina omitted it). Raises DataError naming ``symbol`` for HTML pages,
    malformed bodies, ``null`` (unknown symbol), empty arrays and more than ``max_bars`` bars (the requested
    ``datalen``: a server that ignores it is not trusted).
    """
    where = f" from {url}" if url else ""
    s = _extract_payload(text)
    if not s:
        raise DataError(f"Sina returned an empty body for symbol '{symbol}'{where}")
    if s.startswith("<"):
        title = re.search(r"<title[^>]*>(.*?)</title>", s, re.S | re.I)
        hint = f" ('{title.group(1).strip()[:60]}')" if title else ""
        raise DataError(
            f"Sina returned an HTML page{hint} instead of K-line data for symbol '{symbol}'{where}; "
            "the request was probably blocked or the URL (sina_base_url) is wrong"
        )
    try:
        data = _load_json(s)
    except (json.JSONDecodeError, ValueError):
        snippet = " ".join(s.split())[:80]
        raise DataError(f"Sina returned a malformed body for symbol '{symbol}'{where}: '{snippet}'") from None
    if data is None:
        raise DataError(
            f"Sina has no data for symbol '{symbol}' (body 'null'){where}; check that the symbol exists and is listed"
        )
    if not isinstance(data, list):
        raise DataError(f"Sina returned a {type(data).__name__} instead of a list of bars for symbol '{symbol}'{where}")
    if not data:
        raise DataError(f"Sina returned no bars (empty list) for symbol '{symbol}'{where}")
    if max_bars is not None and len(data) > max_bars:
        raise DataError(
            f"Sina returned {len(data)} bars for symbol '{symbol}', more than the {max_bars} requested "
            f"(config key 'sina_datalen'){where}; the server ignores datalen and its answer is not used"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"Sina bar {i} for symbol '{symbol}' is not an object but {row!r:.60}{where}")
    raw = pd.DataFrame.from_records(data)
    missing = [c for c in ("day",) + PRICE_COLUMNS + ("volume",) if c not in raw.columns]
    if missing:
        raise DataError(f"Sina bars for symbol '{symbol}' lack field(s) {', '.join(missing)}{where}")

    out = {}
    try:
        ts = pd.to_datetime(raw["day"].astype(str), format="ISO8601")
    except (ValueError, TypeError):
        bad = next((i for i, v in enumerate(raw["day"]) if pd.isna(pd.to_datetime(str(v), errors="coerce"))), 0)
        raise DataError(
            f"Sina bar {bad} for symbol '{symbol}' has an unreadable day {raw['day'].iloc[bad]!r}{where}"
        ) from None
    out["timestamps"] = ts.astype("datetime64[ns]")
    for col in VALUE_COLUMNS:
        if col not in raw.columns:
            out[col] = pd.Series(np.nan, index=raw.index, dtype="float64")
            continue
        values = pd.to_numeric(raw[col], errors="coerce").astype("float64")
        # amount may be missing or empty on some rows; the other fields must all be numbers.
        given = raw[col].notna() & (raw[col].astype(str).str.strip() != "") if col == "amount" else True
        bad_rows = values.isna() & given
        if bad_rows.any():
            i = int(np.flatnonzero(bad_rows.to_numpy())[0])
            raise DataError(
                f"Sina bar {i} ({raw['day'].iloc[i]}) for symbol '{symbol}' has a non-numeric {col} "
                f"{raw[col].iloc[i]!r}{where}"
            )
        out[col] = values
    frame = pd.DataFrame(out, columns=list(KLINE_COLUMNS))
    frame = frame.sort_values("timestamps", kind="stable").drop_duplicates("timestamps", keep="last")
    return frame.reset_index(drop=True)


def fill_missing_amount(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with NaN ``amount`` set to ``volume * mean(open, high, low, close)`` (spec step 2)."""
    missing = frame["amount"].isna()
    if not missing.any():
        return frame
    derived = derive_amount(frame)
    return frame.assign(amount=frame["amount"].where(~missing, derived))


# ---------------------------------------------------------------------------------------------- client
def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    return isinstance(
        exc, (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)
    )


def _describe(exc: BaseException) -> str:
    return " ".join(_describe_lines(exc).split())  # one line, whatever the server's reason phrase holds


def _describe_lines(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}".strip()
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return "timed out"
        return f"connection failed ({reason})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out ({exc})" if str(exc) and str(exc) != "timed out" else "timed out"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class _Refused(Exception):
    """A response the client will not accept (cross-host redirect, over the size limits); never retried."""


class _DeadlineExceeded(Exception):
    """The request's wall-clock deadline passed (a dripping or silent server); retried like a timeout."""


class _Watchdog:
    """Shuts down every socket of one request attempt when its wall-clock deadline passes.

    A socket timeout bounds each read, not the request: a server dripping one byte per second never trips it.
    The watchdog aborts any read in progress (connect, headers, body, redirects) at the deadline.
    """

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.fired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            fired = self.fired
        if fired:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._sockets)
        for sock in socks:
            self._shutdown(sock)

    def check(self) -> None:
        if self.fired or self.remaining() <= 0:
            raise _DeadlineExceeded()

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


_WATCH = threading.local()  # the attempt's watchdog, seen by the connections the handlers below create


def _watched(cls: type) -> type[http.client.HTTPConnection]:
    class Watched(cls):
        _create_connection: Callable[..., socket.socket]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            watch = getattr(_WATCH, "current", None)
            create = self._create_connection

            def create_and_watch(*a: Any, **kw: Any) -> socket.socket:
                sock = create(*a, **kw)
                if watch is not None:
                    watch.add(sock)
                return sock

            self._create_connection = create_and_watch

    Watched.__name__ = f"Watched{cls.__name__}"
    return Watched


_WatchedHTTPConnection = _watched(http.client.HTTPConnection)
_WatchedHTTPSConnection = _watched(http.client.HTTPSConnection)


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_WatchedHTTPConnection, req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context)  # type: ignore[attr-defined]


class _SameHostRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same host (and never from https down to http)."""

    max_redirections = 5

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        old, new = (
            urllib.parse.urlsplit(req.full_url),
            urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl)),
        )
        if (new.hostname or "").lower() != (old.hostname or "").lower() or (
            old.scheme == "https" and new.scheme != "https"
        ):
            raise _Refused(f"refused a redirect (HTTP {code}) to another host: {new.scheme}://{new.netloc}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_limited(response: Any, watch: _Watchdog, max_bytes: int) -> bytes:
    """Read the body in small steps, stopping at the deadline or past ``max_bytes`` (raw and decompressed)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _Refused(f"response of {int(declared):,} bytes exceeds the limit of {max_bytes:,} bytes")
    encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        inflater: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    elif encoding in ("", "identity"):
        inflater = None
    else:
        raise _Refused(f"unsupported Content-Encoding {encoding!r}")
    raw = 0
    out = bytearray()
    while True:
        watch.check()
        try:
            chunk = response.read1(65536)
        except OSError:
            watch.check()  # a read aborted by the watchdog is a deadline, not a connection error
            raise
        watch.check()
        if not chunk:
            break
        raw += len(chunk)
        if raw > max_bytes:
            raise _Refused(f"response exceeds the limit of {max_bytes:,} bytes")
        if inflater is None:
            out += chunk
            continue
        try:
            data = inflater.decompress(chunk, max_bytes + 1 - len(out))
        except zlib.error as exc:
            raise _Refused(f"undecodable {encoding} body ({exc})") from None
        out += data
        if len(out) > max_bytes or inflater.unconsumed_tail:
            raise _Refused(f"decompressed response exceeds the limit of {max_bytes:,} bytes")
    if inflater is not None:
        out += inflater.flush(max_bytes + 1 - len(out))
        if len(out) > max_bytes:
            raise _Refused(f"decompressed response exceeds the limit of {max_bytes:,} bytes")
    return bytes(out)


def _decode(body: bytes, headers: Mapping[str, str]) -> str:
    """Text of an (already decompressed) body, in the charset the headers name (GBK fallback)."""
    charset = "utf-8"
    m = re.search(r"charset=([\w-]+)", headers.get("Content-Type") or "", re.I)
    if m:
        charset = m.group(1)
    try:
        return body.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return body.decode("gbk", errors="replace")  # Sina's legacy pages are GBK


class SinaClient:
    """Fetch K-lines from Sina over HTTP with retries and exponential backoff.

    Connection errors, timeouts and HTTP 5xx/429 are retried ``retries`` times, sleeping
    ``pause * 2**attempt`` seconds before retry ``attempt`` (0-based); other HTTP errors fail at once.
    ``opener`` defaults to ``urllib.request.build_opener()`` (honours proxy environment variables, except for
    loopback hosts, which no proxy can reach). ``sleep`` is the function used for backoff and pauses.

    Hostile or broken servers are bounded: ``timeout`` is one wall-clock deadline for each attempt (connect,
    redirects, headers and body together; a server that drips bytes is cut off), the body may hold at most
    ``max_bytes`` bytes both as sent and after gzip/deflate decompression (read in small steps, so an
    oversize body or a gzip bomb is dropped early; default 64 KiB + 1 KiB per requested bar), a redirect is
    followed only to the same host, and a body with more bars than ``datalen`` is rejected. Refused
    responses are not retried.
    """

    def __init__(
        self,
        base_url: str = SINA_JSONP_URL,
        timeout: float = 10.0,
        retries: int = 3,
        pause: float = 0.5,
        opener: urllib.request.OpenerDirector | None = None,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_bytes: int | None = None,
    ) -> None:
        if not base_url or not urllib.parse.urlsplit(base_url).scheme.startswith("http"):
            raise ConfigError(f"config key 'sina_base_url' must be an http(s) URL, got {base_url!r}")
        if timeout <= 0:
            raise ConfigError(f"config key 'sina_timeout' must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ConfigError(f"config key 'sina_retries' must be >= 0, got {retries}")
        if pause < 0:
            raise ConfigError(f"config key 'sina_pause' must be >= 0 seconds, got {pause}")
        self.base_url = base_url
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.pause = float(pause)
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"SinaClient max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        handlers: list[Any] = [_WatchedHTTPHandler, _WatchedHTTPSHandler, _SameHostRedirectHandler]
        loopback = urllib.parse.urlsplit(base_url).hostname in ("127.0.0.1", "localhost", "::1")
        if loopback:
            handlers.append(urllib.request.ProxyHandler({}))
        self.opener = opener or urllib.request.build_opener(*handlers)
        self.headers = dict(DEFAULT_HEADERS)
        self.headers.update(headers or {})
        self.sleep = sleep

    def url(self, symbol: str, scale: int = 240, datalen: int = 1023) -> str:
        """The request URL for one symbol: ``{base_url}?symbol=..&scale=..&ma=no&datalen=..``."""
        if scale not in SINA_SCALES:
            raise ConfigError(f"config key 'sina_scale' must be one of 5, 15, 30, 60, 240, got {scale}")
        if datalen < 1:
            raise ConfigError(f"config key 'sina_datalen' must be >= 1, got {datalen}")
        query = urllib.parse.urlencode({"symbol": symbol, "scale": int(scale), "ma": "no", "datalen": int(datalen)})
        return f"{self.base_url}{'&' if '?' in self.base_url else '?'}{query}"

    def fetch_body(self, symbol: str, scale: int = 240, datalen: int = 1023) -> str:
        """Return the raw response text for ``symbol``; DataError (naming symbol, URL, status) on failure."""
        symbol = normalize_symbol(symbol)
        url = self.url(symbol, scale, datalen)
        request = urllib.request.Request(url, headers=self.headers, method="GET")
        attempts = self.retries + 1
        limit = self.max_bytes if self.max_bytes is not None else 65536 + 1024 * int(datalen)
        last: BaseException | None = None
        for attempt in range(attempts):
            watch = _Watchdog(self.timeout)
            _WATCH.current = watch
            try:
                with watch, self.opener.open(request, timeout=self.timeout) as response:
                    body = _read_limited(response, watch, limit)
                    return _decode(body, response.headers)
            except _Refused as exc:
                raise DataError(f"Sina request for symbol '{symbol}' failed: {exc} from {url}") from None
            except Exception as exc:  # noqa: BLE001 - classified below, everything else re-raised
                if isinstance(exc, urllib.error.HTTPError):
                    exc.close()  # an HTTPError holds the open error response
                if isinstance(exc, _DeadlineExceeded) or watch.fired:
                    exc = TimeoutError(f"no complete answer within the {self.timeout:g}s deadline")
                elif not isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException)):
                    raise
                if not _is_retryable(exc):
                    raise DataError(f"Sina request for symbol '{symbol}' failed: {_describe(exc)} from {url}") from None
                last = exc
                if attempt + 1 < attempts:
                    delay = self.pause * 2**attempt
                    logger.debug(
                        "Sina %s: %s, retry %d/%d in %.2fs", symbol, _describe(exc), attempt + 1, self.retries, delay
                    )
                    if delay > 0:
                        self.sleep(delay)
            finally:
                _WATCH.current = None
        assert last is not None  # attempts >= 1 (retries >= 0) and every failed attempt sets it
        raise DataError(
            f"Sina request for symbol '{symbol}' failed after {attempts} attempt(s): {_describe(last)} from {url}"
        )

    def fetch(self, symbol: str, scale: int = 240, datalen: int = 1023) -> pd.DataFrame:
        """Fetch and parse one symbol's bars (see :func:`parse_kline_body`; amount NaN where absent)."""
        symbol = normalize_symbol(symbol)
        return parse_kline_body(
            self.fetch_body(symbol, scale, datalen), symbol, self.url(symbol, scale, datalen), max_bars=datalen
        )


# ---------------------------------------------------------------------------------------------- processor
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


__all__ = [
    "SINA_JSONP_URL",
    "SINA_JSON_URL",
    "SinaClient",
    "SinaDataProcessor",
    "default_cache_dir",
    "fill_missing_amount",
    "normalize_symbol",
    "normalize_symbols",
    "parse_kline_body",
]
