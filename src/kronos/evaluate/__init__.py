"""Evaluation: forecast metrics, trading signals, backtests (Qlib and built-in) and figures."""

from kronos.evaluate.backtest import (
    BacktestComparison,
    BacktestReport,
    init_qlib,
    normalize_signal,
    risk_stats,
    run_backtests,
    run_qlib_backtest,
    run_simple_backtest,
)
from kronos.evaluate.metrics import save_metrics
from kronos.evaluate.plots import (
    frames_from_records,
    plot_backtest,
    plot_backtest_comparison,
    plot_forecast,
    plot_training_curves,
)
from kronos.evaluate.signals import SIGNAL_KINDS, all_signals, signals_from_records

__all__ = [
    "BacktestComparison",
    "BacktestReport",
    "init_qlib",
    "normalize_signal",
    "risk_stats",
    "run_backtests",
    "run_qlib_backtest",
    "run_simple_backtest",
    "SIGNAL_KINDS",
    "all_signals",
    "save_metrics",
    "signals_from_records",
    "frames_from_records",
    "plot_backtest",
    "plot_backtest_comparison",
    "plot_forecast",
    "plot_training_curves",
]
