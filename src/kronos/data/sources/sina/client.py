"""HTTP client for Sina's K-line endpoints: retries with backoff, and bounds against hostile or broken servers.

Both endpoints take the same query ``?symbol=sh600000&scale=240&ma=no&datalen=1023``: the JSONP one
(``SINA_JSONP_URL``, the default ``sina_base_url``) and its plain-JSON twin (``SINA_JSON_URL``). Each attempt has
one wall-clock deadline, bodies are size-limited (also after decompression), redirects stay on the same host,
and failures are retried with exponential backoff (see :class:`SinaClient`).
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from kronos.data.sources.sina.parser import normalize_symbol, parse_kline_body
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
