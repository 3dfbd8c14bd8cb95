"""Guarded HTTP for the data sources that download bars (Sina, ccxt exchanges): one wall-clock deadline per
attempt (a :class:`Watchdog` the connections see through :data:`WATCH`), bodies read up to a size limit (also after
decompression), redirects kept on the same host, and the errors worth a retry told apart from the rest.
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

logger = logging.getLogger(__name__)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    return isinstance(
        exc, (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)
    )


def describe(exc: BaseException) -> str:
    return " ".join(describe_lines(exc).split())  # one line, whatever the server's reason phrase holds


def describe_lines(exc: BaseException) -> str:
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


class Refused(Exception):
    """A response the client will not accept (cross-host redirect, over the size limits); never retried."""


class DeadlineExceeded(Exception):
    """The request's wall-clock deadline passed (a dripping or silent server); retried like a timeout."""


class Watchdog:
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
            raise DeadlineExceeded()

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


WATCH = threading.local()  # the attempt's watchdog, seen by the connections the handlers below create


def watched(cls: type) -> type[http.client.HTTPConnection]:
    class Watched(cls):
        _create_connection: Callable[..., socket.socket]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            watch = getattr(WATCH, "current", None)
            create = self._create_connection

            def create_and_watch(*a: Any, **kw: Any) -> socket.socket:
                sock = create(*a, **kw)
                if watch is not None:
                    watch.add(sock)
                return sock

            self._create_connection = create_and_watch

    Watched.__name__ = f"Watched{cls.__name__}"
    return Watched


_WatchedHTTPConnection = watched(http.client.HTTPConnection)
_WatchedHTTPSConnection = watched(http.client.HTTPSConnection)


class WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_WatchedHTTPConnection, req)


class WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context)  # type: ignore[attr-defined]


class SameHostRedirectHandler(urllib.request.HTTPRedirectHandler):
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
            raise Refused(f"refused a redirect (HTTP {code}) to another host: {new.scheme}://{new.netloc}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def read_limited(response: Any, watch: Watchdog, max_bytes: int) -> bytes:
    """Read the body in small steps, stopping at the deadline or past ``max_bytes`` (raw and decompressed)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise Refused(f"response of {int(declared):,} bytes exceeds the limit of {max_bytes:,} bytes")
    encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        inflater: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    elif encoding in ("", "identity"):
        inflater = None
    else:
        raise Refused(f"unsupported Content-Encoding {encoding!r}")
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
            raise Refused(f"response exceeds the limit of {max_bytes:,} bytes")
        if inflater is None:
            out += chunk
            continue
        try:
            data = inflater.decompress(chunk, max_bytes + 1 - len(out))
        except zlib.error as exc:
            raise Refused(f"undecodable {encoding} body ({exc})") from None
        out += data
        if len(out) > max_bytes or inflater.unconsumed_tail:
            raise Refused(f"decompressed response exceeds the limit of {max_bytes:,} bytes")
    if inflater is not None:
        out += inflater.flush(max_bytes + 1 - len(out))
        if len(out) > max_bytes:
            raise Refused(f"decompressed response exceeds the limit of {max_bytes:,} bytes")
    return bytes(out)


def decode(body: bytes, headers: Mapping[str, str]) -> str:
    """Text of an (already decompressed) body, in the charset the headers name (GBK fallback)."""
    charset = "utf-8"
    m = re.search(r"charset=([\w-]+)", headers.get("Content-Type") or "", re.I)
    if m:
        charset = m.group(1)
    try:
        return body.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return body.decode("gbk", errors="replace")  # Sina's legacy pages are GBK
