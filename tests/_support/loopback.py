"""The part every loopback test server shares (Sina, Binance): a threaded HTTP server on 127.0.0.1 with a random
port, started and stopped as a context manager, failures injected per key (``times`` then OK), and a handler base
that stays quiet, survives clients that hang up, and can redirect, drip a body or stall.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoopbackServer:
    """Base of the test servers: subclasses set ``HANDLER`` (a :class:`QuietHandler` subclass), ``NAME`` (the thread's
    name) and ``FAILURE_MODES``, and call ``super().__init__()``."""

    HANDLER: type[QuietHandler]
    NAME = "loopback-test-server"
    FAILURE_MODES: dict[str, str] = {}

    def __init__(self) -> None:
        self._failures: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Any:
        handler = type("_Handler", (self.HANDLER,), {"app": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=self.NAME, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ failures
    def _set_failure(self, key: str, mode: str, times: int | None, **details: Any) -> None:
        if mode not in self.FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; choose from {sorted(self.FAILURE_MODES)}")
        with self._lock:
            self._failures[key] = {"mode": mode, "left": times, **details}

    def _take_failure(self, key: str) -> dict | None:
        with self._lock:
            f = self._failures.get(key)
            if f is None:
                return None
            if f["left"] is not None:
                if f["left"] <= 0:
                    return None
                f["left"] -= 1
            return dict(f)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler base: no log lines, a client hanging up is not an error."""

    app: Any
    protocol_version = "HTTP/1.1"
    CONTENT_TYPE = "application/json"

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout tests)
            self.close_connection = True

    def _stall(self, seconds: float) -> None:
        """Sleep in small steps so that closing the server never waits for a sleeping handler."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.app._stop.is_set():
            time.sleep(0.01)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _drip(self, body: bytes, interval: float) -> None:
        """Headers at once, then the body one byte per ``interval`` seconds (until the client hangs up)."""
        self.send_response(200)
        self.send_header("Content-Type", self.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for i in range(len(body)):
            if self.app._stop.is_set():
                return
            try:
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(interval)
