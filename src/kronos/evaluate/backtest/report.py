"""What a backtest produces: the daily table, its summary statistics and the files written from them.

Daily columns follow Qlib's report: ``return`` is the portfolio's return before costs, ``cost`` the costs as a
fraction of the previous value, ``bench`` the benchmark's return. Summary statistics use Qlib's convention
(``risk_analysis``, mode "sum": annualised return = mean · N, information ratio = mean / std · sqrt(N), max
drawdown of the summed curve, N = 238 trading days a year); total returns compound.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kronos import io as kio
from kronos.evaluate.plots import plot_backtest, plot_backtest_comparison
from kronos.paths import path_in, safe_filename

PathLike = str | os.PathLike
DAILY_COLUMNS = [
    "return",
    "cost",
    "bench",
    "excess_return_without_cost",
    "excess_return_with_cost",
    "turnover",
    "account",
]
# Below this many trading days an annualised return mostly scales noise: the summary marks it (``annualised``
# false) and the CLI shows the period's excess return instead.
MIN_DAYS_TO_ANNUALISE = 120
TRADING_DAYS_PER_YEAR = 238  # Qlib's risk_analysis scaler for daily data


# ---------------------------------------------------------------------- report
@dataclass
class BacktestReport:
    """A backtest's daily series and summary.

    ``daily``: DatetimeIndex; columns ``return`` (before cost), ``cost``, ``bench``,
    ``excess_return_without_cost`` (= return - bench), ``excess_return_with_cost`` (= return - bench - cost),
    ``turnover`` (traded value / previous value), ``account`` (portfolio value at the close).
    ``summary``: flat dict of risk statistics and the strategy's parameters (see :func:`summarize`).
    ``holdings``: per bar (rows) the share of the account held in each name (columns) after the bar's close.
    """

    daily: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    holdings: pd.DataFrame | None = None

    def save(self, out_dir: PathLike, title: str | None = None) -> dict[str, Path]:
        """Write ``report.json`` (strict JSON, atomic), ``daily.csv`` and ``cumulative_return.png`` to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"report": out / "report.json", "daily": out / "daily.csv", "plot": out / "cumulative_return.png"}
        kio.write_json(paths["report"], self.summary)
        kio.write_file(paths["daily"], self.daily.to_csv)
        if title is None:
            title = f"{self.summary.get('engine', '')} backtest vs {self.summary.get('benchmark', 'benchmark')}"
        plot_backtest(self.daily, paths["plot"], title=title)
        return paths


@dataclass
class BacktestComparison:
    """Backtests of several signals (e.g. last/mean/max/min) over the same period, side by side."""

    reports: dict[str, BacktestReport]
    table: pd.DataFrame  # one row per signal, the summary fields as columns
    plots: list = field(default_factory=list)  # the PNG files written by save()

    # read-only mapping access to the reports: comparison["mean"], comparison.items(), ...
    def __getitem__(self, name: str) -> BacktestReport:
        return self.reports[name]

    def __iter__(self):
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def keys(self):
        return self.reports.keys()

    def values(self):
        return self.reports.values()

    def items(self):
        return self.reports.items()

    def save(self, out_dir: PathLike) -> dict[str, Path]:
        """Write ``comparison.json``/``.csv``/``.png`` and each report under ``out_dir/<signal>/``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.plots = []
        for name, report in self.reports.items():
            saved = report.save(path_in(out, safe_filename(name, "signal")), title=f"signal '{name}'")
            self.plots.append(saved["plot"])
        paths = {"json": out / "comparison.json", "csv": out / "comparison.csv", "plot": out / "comparison.png"}
        kio.write_json(paths["json"], {name: report.summary for name, report in self.reports.items()})
        kio.write_file(paths["csv"], self.table.to_csv)
        bench_name = next(iter(self.reports.values())).summary.get("benchmark", "benchmark") if self.reports else ""
        plot_backtest_comparison(
            {k: r.daily for k, r in self.reports.items()}, paths["plot"], benchmark_label=str(bench_name)
        )
        self.plots.append(paths["plot"])
        return paths


# ---------------------------------------------------------------------- statistics
def risk_stats(r: pd.Series, periods_per_year: float = TRADING_DAYS_PER_YEAR) -> dict[str, float]:
    """Qlib's ``risk_analysis`` (mode "sum") as a dict: mean, std, annualized_return, information_ratio,
    max_drawdown. NaN where undefined (fewer than two values, zero volatility)."""
    r = pd.Series(r, dtype=float).dropna()
    if len(r) == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "annualized_return": nan, "information_ratio": nan, "max_drawdown": nan}
    mean = float(r.mean())
    std = float(r.std(ddof=1)) if len(r) > 1 else float("nan")
    curve = r.cumsum()
    ir = mean / std * math.sqrt(periods_per_year) if (std > 0 and math.isfinite(std)) else float("nan")
    return {
        "mean": mean,
        "std": std,
        "annualized_return": mean * periods_per_year,
        "information_ratio": ir,
        "max_drawdown": float((curve - curve.cummax()).min()),
    }


def summarize(
    daily: pd.DataFrame, periods_per_year: float = TRADING_DAYS_PER_YEAR, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Flat summary of a daily frame: ``<series>/<stat>`` for the excess returns (with/without cost), the
    strategy's net return and the benchmark, compounded total returns, turnover and ``n_days``."""
    out: dict[str, Any] = {}
    series = {
        "excess_return_without_cost": daily["excess_return_without_cost"],
        "excess_return_with_cost": daily["excess_return_with_cost"],
        "return_with_cost": daily["return"] - daily["cost"],
        "benchmark": daily["bench"],
    }
    for name, s in series.items():
        for key, value in risk_stats(s, periods_per_year).items():
            out[f"{name}/{key}"] = value
    out["total_return_without_cost"] = _compound(daily["return"])
    out["total_return_with_cost"] = _compound(daily["return"] - daily["cost"])
    out["benchmark_total_return"] = _compound(daily["bench"])
    out["excess_total_return_with_cost"] = out["total_return_with_cost"] - out["benchmark_total_return"]
    out["mean_turnover"] = float(daily["turnover"].mean()) if len(daily) else float("nan")
    out["total_cost"] = float(daily["cost"].sum())
    out["n_days"] = int(len(daily))
    out["start"] = fmt_time(daily.index[0]) if len(daily) else None
    out["end"] = fmt_time(daily.index[-1]) if len(daily) else None
    out["periods_per_year"] = float(periods_per_year)
    out["annualised"] = bool(len(daily) >= MIN_DAYS_TO_ANNUALISE * periods_per_year / TRADING_DAYS_PER_YEAR)
    out["excess_total_return_without_cost"] = out["total_return_without_cost"] - out["benchmark_total_return"]
    if extra:
        out.update(extra)
    return out


def _compound(r: pd.Series) -> float:
    r = pd.Series(r, dtype=float).fillna(0.0)
    return float((1.0 + r).prod() - 1.0) if len(r) else float("nan")


def infer_periods_per_year(index: pd.DatetimeIndex) -> float:
    """Bars per year for annualising: 238 for daily bars (Qlib), 50 weekly, 12 monthly, 238 · bars-per-day
    intraday."""
    if len(index) < 2:
        return float(TRADING_DAYS_PER_YEAR)
    step = pd.Series(index).diff().dropna().median()
    if step >= pd.Timedelta(days=20):
        return 12.0
    if step >= pd.Timedelta(days=5):
        return 50.0
    if step >= pd.Timedelta(hours=20):
        return float(TRADING_DAYS_PER_YEAR)
    per_day = pd.Series(1, index=index).groupby(index.normalize()).size().median()
    return float(TRADING_DAYS_PER_YEAR * max(per_day, 1))


# ---------------------------------------------------------------------- daily table
def finish_daily(daily: pd.DataFrame) -> pd.DataFrame:
    """Add the excess-return columns to an engine's daily frame and order its columns as ``DAILY_COLUMNS``."""
    daily = daily.copy()
    daily["excess_return_without_cost"] = daily["return"] - daily["bench"]
    daily["excess_return_with_cost"] = daily["return"] - daily["bench"] - daily["cost"]
    daily.index = pd.DatetimeIndex(daily.index, name="datetime")
    return daily[DAILY_COLUMNS]


def fmt_time(ts: pd.Timestamp) -> str:
    """A bar time as text: the date alone for midnight, else ISO 8601 with the clock."""
    return str(ts.date()) if ts == ts.normalize() else ts.isoformat()
