"""The ``kronos serve`` and ``kronos mcp`` commands (arguments and entry points; cli.py stays thin)."""

from __future__ import annotations

import argparse
import logging
import os

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


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token",
        default="",
        help="API token required on every route but /health "
        "(default: $KRONOS_API_TOKEN); required to bind a non-local host",
    )
    p.add_argument("--no-batching", action="store_true", help="run requests one at a time (for comparison)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="how long to gather concurrent requests into one batch (default 20 ms)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="limit: requests waiting (503 beyond)")


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


def resolve_token(host: str, token: str) -> str | None:
    """The API token (flag, else $KRONOS_API_TOKEN); binding a non-local address without one is refused."""
    token = token or os.environ.get("KRONOS_API_TOKEN", "")
    if host not in LOCAL_HOSTS and not token:
        raise ConfigError(
            f"binding --host {host} exposes the service beyond this machine; set --token or "
            "KRONOS_API_TOKEN (or keep the default --host 127.0.0.1)"
        )
    return token or None


def run_serve(args: argparse.Namespace) -> int:
    token = resolve_token(args.host, args.token)
    engine, run = build_engine(args)
    import uvicorn

    from kronos.serve.app import create_app

    app = create_app(engine, token=token, run=run, host=args.host)
    log.info(
        "serving on http://%s:%d (docs at /docs, MCP at /mcp)%s",
        args.host,
        args.port,
        ", token required" if token else "",
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    engine.shutdown()
    return 0


def run_mcp(args: argparse.Namespace) -> int:
    engine, _ = build_engine(args)
    from kronos.serve.mcp import run_stdio

    run_stdio(engine)
    engine.shutdown()
    return 0
