"""Top-k long-only backtests of a forecast signal: Qlib's TopkDropoutStrategy, and a built-in twin.

``run_qlib_backtest`` (:mod:`.qlib_engine`) drives pyqlib exactly as the official ``finetune/qlib_test.py`` does
(TopkDropoutStrategy, a daily SimulatorExecutor, ``qlib.backtest.backtest``, ``risk_analysis`` of the excess
return with and without cost). ``run_simple_backtest`` (:mod:`.simple`) replays the same trading rule on a wide
close-price frame, for data that is not a Qlib provider (CSV files, Sina downloads, other markets and bar
frequencies). ``run_backtests`` (:mod:`.runner`) backtests several signals side by side; :mod:`.report` holds
the results and their statistics, :mod:`.inputs` what both engines share.

Timing, shared by both engines: the signal dated ``d`` (the forecast's anchor, known at the close of ``d``) is
traded on the next bar at the fill price ``backtest_deal_price`` (default ``open``, as the official script: the
next bar's open; ``close``: its close); positions are valued at each bar's close, so a name bought at the open
earns open-to-close on its first bar and close-to-close afterwards.
"""

from kronos.evaluate.backtest.inputs import normalize_signal
from kronos.evaluate.backtest.qlib_engine import init_qlib, run_qlib_backtest
from kronos.evaluate.backtest.report import (
    DAILY_COLUMNS,
    TRADING_DAYS_PER_YEAR,
    BacktestComparison,
    BacktestReport,
    infer_periods_per_year,
    risk_stats,
    summarize,
)
from kronos.evaluate.backtest.runner import run_backtests
from kronos.evaluate.backtest.simple import run_simple_backtest, topk_dropout_orders

__all__ = [
    "DAILY_COLUMNS",
    "TRADING_DAYS_PER_YEAR",
    "BacktestComparison",
    "BacktestReport",
    "infer_periods_per_year",
    "init_qlib",
    "normalize_signal",
    "risk_stats",
    "run_backtests",
    "run_qlib_backtest",
    "run_simple_backtest",
    "summarize",
    "topk_dropout_orders",
]
