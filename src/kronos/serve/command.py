"""The ``kronos serve`` and ``kronos mcp`` commands (arguments and entry points; cli.py stays thin)."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

from kronos.errors import ConfigError, DependencyError

log = logging.getLogger("kronos")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="", help="tokenizer checkpoint folder (or hub id)")
    p.add_argument("--model", default="", help="predictor checkpoint folder (or hub id)")
    p.add_argument(
        "--run",
        default="",
        help="a pipeline run folder (holding pipeline_config.json): serve its finetuned models, dataset and results",
    )
    p.add_argument("--dataset", default="", help="processed dataset folder: enables /symbols and symbol forecasts")
    p.add_argument("--calibration", default="", help="calibration file (JSON, from `kronos calibrate`) for the bands")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--max-bars", type=int, default=4096, help="limit: bars per series")
    p.add_argument("--max-horizon", type=int, default=256, help="limit: forecast steps")
    p.add_argument("--max-samples", type=int, default=64, help="limit: sample paths per forecast")
    p.add_argument("--max-batch-series", type=int, default=32, help="limit: series per /forecast/batch request")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="limit: request body size in MiB")
    p.add_argument(
        "--max-request-seconds",
        type=float,
        default=4.0,
        help="limit: a request's estimated compute time on this machine (measured at start; 0 = no limit)",
    )


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token",
        default="",
        help="API token required on every route but /health; prefer --token-file or $KRONOS_API_TOKEN (a flag's "
        "value is visible in the process list); required to bind a non-local host",
    )
    p.add_argument("--token-file", default="", help="read the API token from this file (its first line)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a Host name clients may use besides the bound address (repeatable; e.g. the machine's DNS name)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds a running forecast may take to finish before it is stopped (a second SIGTERM "
        "exits at once)",
    )
    p.add_argument("--no-batching", action="store_true", help="run requests one at a time (for comparison)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="how long to gather concurrent requests into one batch (default 20 ms)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="limit: unfinished requests (503 beyond)")
    p.add_argument(
        "--client-timeout",
        type=float,
        default=10.0,
        help="seconds a client may take to send its request headers, and again its body (408 / closed beyond)",
    )


def build_engine(args: argparse.Namespace):
    try:
        from kronos.serve.engine import ForecastEngine
        from kronos.serve.inputs import Limits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            f"`kronos serve` needs the serve extra: pip install 'kronos-kline[serve]' ({exc})"
        ) from None
    run = None
    tokenizer, model, dataset = args.tokenizer, args.model, args.dataset
    if args.run:
        from kronos.serve.run import RunFolder

        run = RunFolder(args.run)
        tokenizer, model = tokenizer or run.tokenizer, model or run.predictor
        dataset = dataset or run.dataset
        if not args.calibration and run.calibration:
            args.calibration = run.calibration
    if not tokenizer or not model:
        raise ConfigError("give --tokenizer and --model (checkpoint folders or hub ids), or --run DIR")
    limits = Limits(
        max_bars=args.max_bars,
        max_horizon=args.max_horizon,
        max_samples=args.max_samples,
        max_batch_series=args.max_batch_series,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_queue=getattr(args, "max_queue", 256),
        max_request_seconds=getattr(args, "max_request_seconds", 4.0),
        body_timeout_s=getattr(args, "client_timeout", 10.0),
    )
    engine = ForecastEngine.load(
        tokenizer,
        model,
        device=args.device,
        max_context=args.max_context,
        calibration=args.calibration,
        dataset=dataset,
        limits=limits,
        batching=not getattr(args, "no_batching", False),
        batch_wait_ms=getattr(args, "batch_wait_ms", 20.0),
        run_dir=str(run.dir) if run else None,
    )
    return engine, run


def resolve_token(host: str, token: str, token_file: str = "") -> str | None:
    """The API token (``--token-file``, else ``--token``, else $KRONOS_API_TOKEN); binding a non-local address
    without one is refused."""
    if token_file:
        try:
            lines = Path(token_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --token-file '{token_file}' ({exc.__class__.__name__}); give a readable "
                              "text file whose first line is the token") from None  # fmt: skip
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"--token-file '{token_file}' is empty; put the token on its first line")
    elif token:
        log.warning("--token is visible in the process list; prefer --token-file or $KRONOS_API_TOKEN")
    token = token or os.environ.get("KRONOS_API_TOKEN", "")
    if host not in LOCAL_HOSTS and not token:
        raise ConfigError(
            f"binding --host {host} exposes the service beyond this machine; set --token-file, KRONOS_API_TOKEN "
            "or --token (or keep the default --host 127.0.0.1)"
        )
    return token or None


def serve_app(app, engine, host: str, port: int, grace: float, header_timeout: float) -> None:
    """Run ``app`` under uvicorn with bounded waits: idle keep-alive connections close after 5 s, a client that has
    not sent its request headers within ``header_timeout`` is cut off, and SIGTERM/SIGINT stop accepting, drop
    queued forecasts, give a running one ``grace`` seconds and then stop it; a second signal exits at once."""
    import asyncio
    import signal

    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose first request's headers are not in on time."""

        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request within %g s", header_timeout)
                self.transport.close()

        def connection_lost(self, exc):
            self._header_deadline.cancel()
            super().connection_lost(exc)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                log.warning("second stop signal: exiting now")
                os._exit(128 + int(sig))
            super().handle_exit(sig, frame)
            loop = engine._loop
            if loop is not None and loop.is_running():
                loop.call_soon_threadsafe(engine.begin_shutdown)
            else:
                engine.begin_shutdown()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=TimedH11,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(0, math.ceil(grace)),
        h11_max_incomplete_event_size=16 * 1024,
    )
    server = Server(config)
    try:
        asyncio.run(server.serve())
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_serve(args: argparse.Namespace) -> int:
    token = resolve_token(args.host, args.token, getattr(args, "token_file", ""))
    engine, run = build_engine(args)

    from kronos.serve.app import create_app

    app = create_app(engine, token=token, run=run, host=args.host, hosts=getattr(args, "allowed_host", []))
    log.info(
        "serving on http://%s:%d (docs at /docs, MCP at /mcp)%s",
        args.host,
        args.port,
        ", token required" if token else "",
    )
    serve_app(app, engine, args.host, args.port, getattr(args, "shutdown_grace", 10.0), engine.limits.body_timeout_s)
    engine.shutdown()
    return 0


def run_mcp(args: argparse.Namespace) -> int:
    engine, _ = build_engine(args)
    from kronos.serve.mcp import run_stdio

    run_stdio(engine)
    engine.shutdown()
    return 0
