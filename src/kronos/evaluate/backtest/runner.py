"""Backtest several signals over the same period with one engine, and tabulate them side by side."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd

from kronos.config import Config
from kronos.errors import InputError
from kronos.evaluate.backtest.qlib_engine import run_qlib_backtest
from kronos.evaluate.backtest.report import BacktestComparison, BacktestReport, PathLike
from kronos.evaluate.backtest.simple import run_simple_backtest

logger = logging.getLogger(__name__)


def run_backtests(
    signals: dict[str, pd.Series | pd.DataFrame],
    config: Config,
    *,
    close: pd.DataFrame | None = None,
    benchmark: pd.Series | None = None,
    provider_uri: PathLike | None = None,
    time_range: Sequence | None = None,
    out_dir: PathLike | None = None,
    engine: str = "auto",
    **kwargs: Any,
) -> BacktestComparison:
    """Backtest each named signal (e.g. the last/mean/max/min signals) and tabulate their summaries.

    ``engine``: "simple" (the built-in engine on ``close``; ``benchmark`` = benchmark prices, optional),
    "qlib" (Qlib on ``provider_uri``, default ``config.qlib_data_path``) or "auto" (simple when ``close`` is
    given, else qlib). ``out_dir``: also save everything there (see :meth:`BacktestComparison.save`). Extra
    keyword arguments go to the engine. The result maps signal name -> :class:`BacktestReport`.
    """
    if not signals:
        raise InputError("run_backtests needs at least one signal")
    if engine not in ("auto", "simple", "qlib"):
        raise InputError(f"backtest engine '{engine}' is unknown; use 'qlib', 'simple' or 'auto'")
    use_simple = engine == "simple" or (engine == "auto" and close is not None)
    if use_simple and close is None:
        raise InputError("the simple backtest engine needs close prices (close=wide DataFrame of closes)")
    reports: dict[str, BacktestReport] = {}
    for name, signal in signals.items():
        logger.info("backtesting signal '%s'", name)
        if use_simple:
            reports[name] = run_simple_backtest(signal, close, config, benchmark, time_range=time_range, **kwargs)
        else:
            reports[name] = run_qlib_backtest(signal, config, provider_uri, time_range=time_range, **kwargs)
    table = pd.DataFrame({name: r.summary for name, r in reports.items()}).T
    table.index.name = "signal"
    comparison = BacktestComparison(reports=reports, table=table)
    if out_dir is not None:
        comparison.save(out_dir)
    return comparison
