"""A loopback HTTP server that speaks Sina Finance's K-line API, for tests.

Usage (from any test; ``tests/conftest.py`` puts ``tests/`` on ``sys.path``)::

    from _support.sina_server import SinaTestServer

    with SinaTestServer() as server:
        cfg = Config(data_source="sina", sina_base_url=server.jsonp_url, sina_symbols=server.symbols, ...)
        ...
        assert server.request_count("sh600000") == 1

The bars are real: ``tests/fixtures/kline_5min.csv`` (2,500 five-minute A-share bars, 2024-06-18..2024-08-29),
aggregated to 15/30/60-minute bars on the exchange's session clock and to daily bars. Each symbol serves the
same bars shifted by a price offset so that symbols differ. Volume is served in shares (the CSV's 100-share
lots x 100), like Sina. ``scale`` and ``datalen`` (last N bars) are honoured; both the JSONP path
(``/cn/api/jsonp_v2.php/<callback>=/CN_MarketDataService.getKLineData``, callback taken from the path as Sina
does) and the plain-JSON path (``/quotes_service/api/json_v2.php/CN_MarketData.getKLineData``) are served.
Unknown symbols get ``null`` (wrapped for JSONP). Requests without a browser User-Agent and a Referer get 403,
as Sina's anti-scraping front end does.

Failures are injected per symbol with :meth:`SinaTestServer.fail`; see ``FAILURE_MODES``.
"""

from __future__ import annotations

import collections
import json
import urllib.parse
import zlib
from pathlib import Path

import pandas as pd

from .loopback import LoopbackServer, QuietHandler

DATA_CSV = Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv"
DEFAULT_SYMBOLS = {"sh600000": 0.0, "sz000001": 5.0, "bj430047": 2.5}

JSONP_PATH_PREFIX = "/cn/api/jsonp_v2.php/"
JSONP_PATH_SUFFIX = "/CN_MarketDataService.getKLineData"
JSON_PATH = "/quotes_service/api/json_v2.php/CN_MarketData.getKLineData"
ANTI_EMBED_PREFIX = "/*<script>location.href='//sina.com';</script>*/\n"

FAILURE_MODES = {
    "500": "HTTP 500 Internal Server Error",
    "503": "HTTP 503 Service Unavailable",
    "429": "HTTP 429 Too Many Requests",
    "404": "HTTP 404 Not Found",
    "403": "HTTP 403 Forbidden",
    "html": "HTTP 200 with an HTML error page",
    "malformed": "HTTP 200 with truncated JSON",
    "empty": "HTTP 200 with an empty array []",
    "null": "HTTP 200 with null (Sina's answer for unknown symbols)",
    "slow": "sleeps `delay` seconds before answering (client timeouts)",
    "no_amount": "normal bars without the amount field",
    "drip": "normal bars, the body sent one byte every `delay` seconds (a wall-clock deadline must cut it off)",
    "redirect_other_host": "HTTP 302 to the same path on host 'localhost' asking for symbol `target` (never follow)",
    "redirect_same_host": "HTTP 302 to the plain-JSON path on the same host and port (followed)",
    "oversize": "HTTP 200 with a valid body padded to `size` bytes",
    "gzip_bomb": "HTTP 200, Content-Encoding gzip, a valid body padded to `size` bytes once decompressed",
    "too_many": "ignores datalen and serves every bar",
}


def _session_minute(ts: pd.Series) -> pd.Series:
    """Minutes of trading since 09:30 at each bar's end (morning 0..120, afternoon 120..240)."""
    minute = ts.dt.hour * 60 + ts.dt.minute
    return (minute - 570).where(minute <= 690, minute - 780 + 120)


def _clock_from_session_minute(dates: pd.Series, m: pd.Series) -> pd.Series:
    minute = (m + 570).where(m <= 120, m - 120 + 780)
    return dates + pd.to_timedelta(minute, unit="min")


def build_bars(csv_path: Path = DATA_CSV) -> dict[int, pd.DataFrame]:
    """Real bars for every Sina scale (5, 15, 30, 60, 240), volume in shares, ``day`` as Sina formats it."""
    five = pd.read_csv(csv_path)
    five["timestamps"] = pd.to_datetime(five["timestamps"])
    five["volume"] = five["volume"] * 100.0  # the CSV counts 100-share lots; Sina counts shares
    agg = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum", "amount": "sum"}
    dates = five["timestamps"].dt.normalize()
    out: dict[int, pd.DataFrame] = {5: five.reset_index(drop=True)}
    sm = _session_minute(five["timestamps"])
    for scale in (15, 30, 60):
        end = -(-sm // scale) * scale  # ceil to the bar's end on the session clock (60-min bars end 10:30, 11:30, ...)
        label = _clock_from_session_minute(dates, end)
        bars = five.groupby(label.rename("timestamps"), sort=True).agg(agg).reset_index()
        out[scale] = bars
    daily = five.groupby(dates.rename("timestamps"), sort=True).agg(agg).reset_index()
    out[240] = daily
    return out


class SinaTestServer(LoopbackServer):
    """Sina K-line API on 127.0.0.1 (random port) in a background thread; use as a context manager.

    Attributes: ``jsonp_url`` (the default-style URL with an empty callback), ``json_url`` (plain JSON twin),
    ``symbols`` (served symbols), ``requests`` (Counter of requests per symbol, every attempt counted),
    ``last_headers`` (headers of the latest request).
    """

    NAME = "sina-test-server"
    FAILURE_MODES = FAILURE_MODES

    def __init__(
        self, symbols: dict[str, float] | None = None, csv_path: Path = DATA_CSV, require_browser_headers: bool = True
    ) -> None:
        self.offsets = dict(DEFAULT_SYMBOLS if symbols is None else symbols)
        self.bars = build_bars(csv_path)
        self.require_browser_headers = require_browser_headers
        self.requests: collections.Counter = collections.Counter()
        self.last_headers: dict[str, str] = {}
        super().__init__()

    def jsonp_base(self, callback: str = "") -> str:
        """JSONP endpoint whose responses use ``callback`` (e.g. ``var _x``; empty gives ``=(...)``)."""
        return f"{self.root}{JSONP_PATH_PREFIX}{urllib.parse.quote(callback)}={JSONP_PATH_SUFFIX}"

    @property
    def jsonp_url(self) -> str:
        return self.jsonp_base("")

    @property
    def json_url(self) -> str:
        return f"{self.root}{JSON_PATH}"

    @property
    def symbols(self) -> list[str]:
        return list(self.offsets)

    # ------------------------------------------------------------------ data and failures
    def frame(self, symbol: str, scale: int = 240, datalen: int | None = None) -> pd.DataFrame:
        """The bars served for ``symbol`` at ``scale`` (last ``datalen``), volume in shares, float columns."""
        bars = self.bars[scale]
        if datalen is not None:
            bars = bars.tail(datalen)
        offset = self.offsets[symbol]
        shifted = bars.assign(**{c: bars[c] + offset for c in ("open", "high", "low", "close")})
        return shifted.reset_index(drop=True)

    def fail(
        self,
        symbol: str,
        mode: str,
        times: int | None = None,
        delay: float = 1.0,
        size: int = 4 << 20,
        target: str = "sz000001",
    ) -> None:
        """Make requests for ``symbol`` fail with ``mode`` (a FAILURE_MODES key); ``times`` then OK (None = always).

        ``delay``: seconds of "slow" or per byte of "drip"; ``size``: bytes of "oversize"/"gzip_bomb" bodies;
        ``target``: the symbol a cross-host redirect asks for.
        """
        self._set_failure(symbol, mode, times, delay=delay, size=size, target=target)

    def clear_failures(self, symbol: str | None = None) -> None:
        with self._lock:
            if symbol is None:
                self._failures.clear()
            else:
                self._failures.pop(symbol, None)

    def request_count(self, symbol: str | None = None) -> int:
        with self._lock:
            return sum(self.requests.values()) if symbol is None else self.requests[symbol]

    def body_array(self, symbol: str, scale: int, datalen: int, with_amount: bool = True) -> list[dict]:
        bars = self.frame(symbol, scale, datalen)
        fmt = "%Y-%m-%d" if scale == 240 else "%Y-%m-%d %H:%M:%S"
        rows = []
        for r in bars.itertuples(index=False):
            row = {
                "day": r.timestamps.strftime(fmt),
                "open": f"{r.open:.3f}",
                "high": f"{r.high:.3f}",
                "low": f"{r.low:.3f}",
                "close": f"{r.close:.3f}",
                "volume": f"{r.volume:.0f}",
            }
            if with_amount:
                row["amount"] = f"{r.amount:.4f}"
            rows.append(row)
        return rows


class _SinaHandler(QuietHandler):
    app: SinaTestServer
    CONTENT_TYPE = "application/javascript; charset=utf-8"

    def _send(self, status: int, text: str, content_type: str = "application/javascript; charset=utf-8") -> None:
        body = text.encode("utf-8")
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
        path = urllib.parse.unquote(parts.path)
        query = urllib.parse.parse_qs(parts.query)
        symbol = (query.get("symbol") or [""])[0].lower()
        with app._lock:
            app.last_headers = dict(self.headers.items())
            app.requests[symbol] += 1  # every attempt counts, whatever the answer
        if path == JSON_PATH:
            callback = None
        elif path.startswith(JSONP_PATH_PREFIX) and path.endswith(JSONP_PATH_SUFFIX):
            middle = path[len(JSONP_PATH_PREFIX) : -len(JSONP_PATH_SUFFIX)]
            if not middle.endswith("="):
                return self._send(404, "<html><body>404 Not Found</body></html>", "text/html")
            callback = middle[:-1]
        else:
            return self._send(
                404, "<html><head><title>404 Not Found</title></head><body>Not Found</body></html>", "text/html"
            )
        ua = self.headers.get("User-Agent", "")
        if app.require_browser_headers and (not ua.startswith("Mozilla/") or not self.headers.get("Referer")):
            return self._send(
                403, "<html><head><title>403 Forbidden</title></head><body>Forbidden</body></html>", "text/html"
            )
        try:
            scale = int((query.get("scale") or ["240"])[0])
            datalen = int((query.get("datalen") or ["1023"])[0])
        except ValueError:
            return self._send(200, self._wrap(callback, "null"))
        failure = app._take_failure(symbol)
        mode = failure["mode"] if failure else None
        if mode == "slow":
            self._stall(failure["delay"])
            mode = None
        if mode in ("500", "503", "429", "404", "403"):
            status = int(mode)
            return self._send(
                status, f"<html><head><title>{status} Error</title></head><body>{status}</body></html>", "text/html"
            )
        if mode == "html":
            return self._send(
                200,
                "<!DOCTYPE html><html><head><title>新浪财经-页面没有找到</title></head>"
                "<body>Sorry, the page was not found.</body></html>",
                "text/html; charset=utf-8",
            )
        if mode == "malformed":
            full = json.dumps(app.body_array(symbol, scale, datalen) if symbol in app.offsets else [])
            return self._send(200, self._wrap(callback, full[: max(len(full) // 2, 5)]))
        if mode == "empty":
            return self._send(200, self._wrap(callback, "[]"))
        if mode == "null" or symbol not in app.offsets or scale not in app.bars:
            return self._send(200, self._wrap(callback, "null"))
        if mode == "redirect_other_host":
            query = urllib.parse.urlencode({**{k: v[0] for k, v in query.items()}, "symbol": failure["target"]})
            return self._redirect(f"http://localhost:{app.port}{parts.path}?{query}")
        if mode == "redirect_same_host":
            return self._redirect(f"{JSON_PATH}?{parts.query}")
        if mode == "too_many":
            datalen = len(app.bars[scale])
        rows = app.body_array(symbol, scale, datalen, with_amount=mode != "no_amount")
        text = self._wrap(callback, json.dumps(rows, separators=(",", ":")))
        if mode in ("oversize", "gzip_bomb"):
            return self._send_padded(text.encode("utf-8"), failure["size"], gzipped=mode == "gzip_bomb")
        if mode == "drip":
            return self._drip(text.encode("utf-8"), failure["delay"])
        self._send(200, text)

    def _send_padded(self, body: bytes, size: int, gzipped: bool) -> None:
        """``body`` padded with whitespace inside its JSONP parentheses to ``size`` bytes (valid, only too big).

        Streamed without a Content-Length (the body ends when the connection closes), so a client has to count
        what it reads; the gzip variant sends the compressed stream (about 1/1000 of ``size``). The server never
        holds the padded body in memory.
        """
        head, tail = body[:-2], body[-2:]
        pad = max(size - len(body), 0)
        self.send_response(200)
        self.send_header("Content-Type", "application/javascript; charset=utf-8")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        deflater = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzipped else None
        block = b" " * (1 << 16)

        def pieces():
            yield head
            left = pad
            while left > 0:
                yield block[: min(left, len(block))]
                left -= len(block)
            yield tail

        try:
            for piece in pieces():
                if self.app._stop.is_set():
                    return
                data = deflater.compress(piece) if deflater else piece
                if data:
                    self.wfile.write(data)
            if deflater:
                self.wfile.write(deflater.flush())
        except OSError:  # the client hung up (it refused the body): expected
            return

    @staticmethod
    def _wrap(callback: str | None, payload: str) -> str:
        if callback is None:  # plain JSON twin
            return payload
        return f"{ANTI_EMBED_PREFIX}{callback}=({payload});"


SinaTestServer.HANDLER = _SinaHandler
