"""A loopback HTTP server that speaks Binance's public spot API (klines and exchangeInfo), for the ccxt source's tests.

Usage (``tests/conftest.py`` puts ``tests/`` on ``sys.path``)::

    from _support.binance_server import BinanceTestServer

    with BinanceTestServer() as server:
        cfg = Config(data_source="ccxt", ccxt_api_url=server.root, ccxt_symbols=server.symbols, ...)

``ccxt_api_url`` replaces the host of every Binance API URL in ccxt, so ccxt's binance calls
``GET /api/v3/exchangeInfo`` (load_markets; a minimal valid answer for the served symbols) and
``GET /api/v3/klines?symbol=BTCUSDT&interval=1h&startTime=..&endTime=..&limit=..`` here. Kline rows are Binance's:
``[openTime, "open", "high", "low", "close", "volume", closeTime, "quoteAssetVolume", trades, "takerBase",
"takerQuote", "0"]``; at most ``limit`` rows (Binance's cap 1000), open times in [startTime, endTime].

The bars are real: ``tests/fixtures/kline_5min.csv`` (2,500 five-minute A-share bars) relabelled as consecutive
hourly bars from 2024-01-01 00:00 UTC, every day of the week (a 24/7 market). Prices are scaled per symbol (BTC
x 4000, ETH x 200); base volume is the CSV's turnover divided by the new price level, so the quote volume (index 7)
is the CSV's amount. Failures are injected per exchange symbol id (``BTCUSDT``) with :meth:`fail`; see
``FAILURE_MODES``.
"""

from __future__ import annotations

import collections
import json
import time
import urllib.parse
from pathlib import Path

import pandas as pd

from .loopback import LoopbackServer, QuietHandler

DATA_CSV = Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv"
START = pd.Timestamp("2024-01-01 00:00")
# unified symbol -> (base, quote, price factor)
DEFAULT_SYMBOLS = {"BTC/USDT": ("BTC", "USDT", 4000.0), "ETH/USDT": ("ETH", "USDT", 200.0)}
INTERVAL_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}

FAILURE_MODES = {
    "429": "HTTP 429 with Binance's JSON error",
    "500": "HTTP 500",
    "503": "HTTP 503",
    "400": "HTTP 400 with Binance's {code, msg} error (not retried)",
    "slow": "sleeps `delay` seconds before answering",
    "drip": "normal rows, the body sent one byte every `delay` seconds",
    "oversize": "HTTP 200 with valid rows padded with whitespace to `size` bytes (no Content-Length)",
    "redirect_other_host": "HTTP 302 to the same path on host 'localhost' (must not be followed)",
    "malformed": "one row with a non-numeric price",
    "short_row": "one row with only 4 fields",
    "too_many": "ignores limit and sends limit + 5 rows",
    "html": "HTTP 200 with an HTML page",
}


def build_bars(csv_path: Path = DATA_CSV) -> pd.DataFrame:
    """The fixture's bars as hourly bars from START (open times), quote volume = the CSV's amount."""
    five = pd.read_csv(csv_path)
    return pd.DataFrame(
        {
            "open_time": START + pd.to_timedelta(range(len(five)), unit="h"),
            "open": five["open"],
            "high": five["high"],
            "low": five["low"],
            "close": five["close"],
            "quote": five["amount"],
            "trades": (five["volume"] // 3 + 1).astype(int),
        }
    )


class BinanceTestServer(LoopbackServer):
    """Binance's public spot API on 127.0.0.1 (random port) in a background thread; use as a context manager.

    ``requests``: Counter of requests per path and exchange symbol id (``"klines BTCUSDT"``, ``"exchangeInfo"``).
    """

    NAME = "binance-test-server"
    FAILURE_MODES = FAILURE_MODES

    def __init__(self, symbols: dict[str, tuple[str, str, float]] | None = None, csv_path: Path = DATA_CSV) -> None:
        self.markets = dict(DEFAULT_SYMBOLS if symbols is None else symbols)
        self.bars = build_bars(csv_path)
        self.requests: collections.Counter = collections.Counter()
        self.kline_queries: list[dict[str, str]] = []
        super().__init__()

    @property
    def symbols(self) -> list[str]:
        return list(self.markets)

    @staticmethod
    def market_id(symbol: str) -> str:
        return symbol.replace("/", "")

    # ------------------------------------------------------------------ data and failures
    def frame(self, symbol: str, interval: str = "1h") -> pd.DataFrame:
        """The bars served for ``symbol`` (the 1h bars; other intervals reuse them at that spacing)."""
        factor = self.markets[symbol][2]
        bars = self.bars.copy()
        step = pd.Timedelta(milliseconds=INTERVAL_MS[interval])
        bars["open_time"] = START + step * pd.RangeIndex(len(bars))
        for c in ("open", "high", "low", "close"):
            bars[c] = bars[c] * factor
        mid = bars[["open", "high", "low", "close"]].mean(axis=1)
        bars["volume"] = bars["quote"] / mid
        return bars

    def rows(self, symbol: str, interval: str, start: int | None, end: int | None, limit: int) -> list[list]:
        bars = self.frame(symbol, interval)
        ms = (bars["open_time"] - pd.Timestamp("1970-01-01")) // pd.Timedelta(milliseconds=1)
        keep = pd.Series(True, index=bars.index)
        if start is not None:
            keep &= ms >= start
        if end is not None:
            keep &= ms <= end
        bars, ms = bars[keep].head(limit), ms[keep].head(limit)
        step = INTERVAL_MS[interval]
        out = []
        for t, r in zip(ms, bars.itertuples(index=False)):
            out.append(
                [
                    int(t),
                    f"{r.open:.8f}",
                    f"{r.high:.8f}",
                    f"{r.low:.8f}",
                    f"{r.close:.8f}",
                    f"{r.volume:.8f}",
                    int(t) + step - 1,
                    f"{r.quote:.8f}",
                    int(r.trades),
                    f"{r.volume / 2:.8f}",
                    f"{r.quote / 2:.8f}",
                    "0",
                ]
            )
        return out

    def exchange_info(self) -> dict:
        symbols = []
        for unified, (base, quote, _) in self.markets.items():
            symbols.append(
                {
                    "symbol": self.market_id(unified),
                    "status": "TRADING",
                    "baseAsset": base,
                    "baseAssetPrecision": 8,
                    "quoteAsset": quote,
                    "quotePrecision": 8,
                    "quoteAssetPrecision": 8,
                    "baseCommissionPrecision": 8,
                    "quoteCommissionPrecision": 8,
                    "orderTypes": ["LIMIT", "MARKET"],
                    "icebergAllowed": True,
                    "ocoAllowed": True,
                    "isSpotTradingAllowed": True,
                    "isMarginTradingAllowed": False,
                    "filters": [
                        {
                            "filterType": "PRICE_FILTER",
                            "minPrice": "0.01",
                            "maxPrice": "1000000.00",
                            "tickSize": "0.01",
                        },
                        {"filterType": "LOT_SIZE", "minQty": "0.00001", "maxQty": "9000.0", "stepSize": "0.00001"},
                    ],
                    "permissions": ["SPOT"],
                    "permissionSets": [["SPOT"]],
                }
            )
        return {
            "timezone": "UTC",
            "serverTime": int(time.time() * 1000),
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000}],
            "exchangeFilters": [],
            "symbols": symbols,
        }

    def fail(
        self, symbol_id: str, mode: str, times: int | None = None, delay: float = 1.0, size: int = 4 << 20
    ) -> None:
        """Make kline requests for ``symbol_id`` (e.g. ``BTCUSDT``) fail with ``mode``; ``times`` then OK."""
        self._set_failure(symbol_id, mode, times, delay=delay, size=size)

    def clear(self) -> None:
        """Forget failures, request counts and queries."""
        with self._lock:
            self._failures.clear()
            self.requests.clear()
            self.kline_queries.clear()

    def request_count(self, key: str) -> int:
        with self._lock:
            return self.requests[key]


class _BinanceHandler(QuietHandler):
    app: BinanceTestServer
    CONTENT_TYPE = "application/json;charset=UTF-8"

    def _send(self, status: int, payload: object, content_type: str = "application/json;charset=UTF-8") -> None:
        body = (payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        app = self.app
        parts = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()}
        if parts.path == "/api/v3/exchangeInfo":
            with app._lock:
                app.requests["exchangeInfo"] += 1
            return self._send(200, app.exchange_info())
        if parts.path != "/api/v3/klines":
            with app._lock:
                app.requests[parts.path] += 1
            return self._send(404, {"code": -1, "msg": f"unknown path {parts.path}"})
        symbol_id = query.get("symbol", "")
        with app._lock:
            app.requests[f"klines {symbol_id}"] += 1
            app.kline_queries.append(query)
        unified = {app.market_id(s): s for s in app.markets}.get(symbol_id)
        interval = query.get("interval", "")
        if unified is None:
            return self._send(400, {"code": -1121, "msg": "Invalid symbol."})
        if interval not in INTERVAL_MS:
            return self._send(400, {"code": -1120, "msg": "Invalid interval."})
        try:
            limit = min(int(query.get("limit", "500")), 1000)
            start = int(query["startTime"]) if "startTime" in query else None
            end = int(query["endTime"]) if "endTime" in query else None
        except ValueError:
            return self._send(400, {"code": -1100, "msg": "Illegal characters found in a parameter."})
        failure = app._take_failure(symbol_id)
        mode = failure["mode"] if failure else None
        if mode == "slow":
            self._stall(failure["delay"])
            mode = None
        if mode == "429":
            return self._send(429, {"code": -1003, "msg": "Too many requests; current limit is 6000 request weight."})
        if mode in ("500", "503"):
            return self._send(int(mode), "<html><body>Service Unavailable</body></html>", "text/html")
        if mode == "400":
            return self._send(400, {"code": -1121, "msg": "Invalid symbol."})
        if mode == "html":
            return self._send(200, "<!DOCTYPE html><html><body>maintenance</body></html>", "text/html")
        if mode == "redirect_other_host":
            return self._redirect(f"http://localhost:{app.port}{self.path}")
        rows = app.rows(unified, interval, start, end, limit + 5 if mode == "too_many" else limit)
        if mode == "malformed" and rows:
            rows[len(rows) // 2][2] = "NaN-ish"
        if mode == "short_row" and rows:
            rows[0] = rows[0][:4]
        text = json.dumps(rows, separators=(",", ":"))
        if mode == "oversize":
            return self._send_padded(text.encode(), failure["size"])
        if mode == "drip":
            return self._drip(text.encode(), failure["delay"])
        self._send(200, text)

    def _send_padded(self, body: bytes, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        pad = max(size - len(body), 0)
        block = b" " * (1 << 16)
        try:
            self.wfile.write(body[:-1])
            while pad > 0 and not self.app._stop.is_set():
                self.wfile.write(block[: min(pad, len(block))])
                pad -= len(block)
            self.wfile.write(body[-1:])
        except OSError:  # the client hung up (it refused the body): expected
            return


BinanceTestServer.HANDLER = _BinanceHandler
