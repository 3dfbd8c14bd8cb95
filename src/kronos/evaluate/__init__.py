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
from kronos.evaluate.metrics import (
    SIGNAL_KINDS,
    all_signals,
    save_metrics,
    signals_from_records,
)
from kronos.evaluate.plots import (
    frames_from_records,
    plot_backtest,
    plot_backtest_comparison,
    plot_forecast,
    plot_training_curves,
)

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
