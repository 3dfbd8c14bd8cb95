"""HTTP client for Sina's K-line endpoints: retries with backoff, and bounds against hostile or broken servers.

Both endpoints take the same query ``?symbol=sh600000&scale=240&ma=no&datalen=1023``: the JSONP one
(``SINA_JSONP_URL``, the default ``sina_base_url``) and its plain-JSON twin (``SINA_JSON_URL``). Each attempt has
one wall-clock deadline, bodies are size-limited (also after decompression), redirects stay on the same host,
and failures are retried with exponential backoff (see :class:`SinaClient`).
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from kronos.data.sources.guarded_http import (
    WATCH,
    DeadlineExceeded,
    Refused,
    SameHostRedirectHandler,
    Watchdog,
    WatchedHTTPHandler,
    WatchedHTTPSHandler,
    decode,
    describe,
    is_retryable,
    read_limited,
)
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
        handlers: list[Any] = [WatchedHTTPHandler, WatchedHTTPSHandler, SameHostRedirectHandler]
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
            watch = Watchdog(self.timeout)
            WATCH.current = watch
            try:
                with watch, self.opener.open(request, timeout=self.timeout) as response:
                    body = read_limited(response, watch, limit)
                    return decode(body, response.headers)
            except Refused as exc:
                raise DataError(f"Sina request for symbol '{symbol}' failed: {exc} from {url}") from None
            except Exception as exc:  # noqa: BLE001 - classified below, everything else re-raised
                if isinstance(exc, urllib.error.HTTPError):
                    exc.close()  # an HTTPError holds the open error response
                if isinstance(exc, DeadlineExceeded) or watch.fired:
                    exc = TimeoutError(f"no complete answer within the {self.timeout:g}s deadline")
                elif not isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException)):
                    raise
                if not is_retryable(exc):
                    raise DataError(f"Sina request for symbol '{symbol}' failed: {describe(exc)} from {url}") from None
                last = exc
                if attempt + 1 < attempts:
                    delay = self.pause * 2**attempt
                    logger.debug(
                        "Sina %s: %s, retry %d/%d in %.2fs", symbol, describe(exc), attempt + 1, self.retries, delay
                    )
                    if delay > 0:
                        self.sleep(delay)
            finally:
                WATCH.current = None
        assert last is not None  # attempts >= 1 (retries >= 0) and every failed attempt sets it
        raise DataError(
            f"Sina request for symbol '{symbol}' failed after {attempts} attempt(s): {describe(last)} from {url}"
        )

    def fetch(self, symbol: str, scale: int = 240, datalen: int = 1023) -> pd.DataFrame:
        """Fetch and parse one symbol's bars (see :func:`parse_kline_body`; amount NaN where absent)."""
        symbol = normalize_symbol(symbol)
        return parse_kline_body(
            self.fetch_body(symbol, scale, datalen), symbol, self.url(symbol, scale, datalen), max_bars=datalen
        )
