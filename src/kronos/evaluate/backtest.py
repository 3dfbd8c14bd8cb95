"""Top-k long-only backtests of a forecast signal: Qlib's TopkDropoutStrategy, and a built-in twin.

``run_qlib_backtest`` drives pyqlib exactly as the official ``finetune/qlib_test.py`` does (TopkDropoutStrategy,
a daily SimulatorExecutor, ``qlib.backtest.backtest``, ``risk_analysis`` of the excess return with and without
cost). ``run_simple_backtest`` replays the same trading rule on a wide close-price frame, for data that is not a
Qlib provider (CSV files, Sina downloads, other markets and bar frequencies).

Timing, shared by both engines: the signal dated ``d`` (the forecast's anchor, known at the close of ``d``) is
traded on the next bar at the fill price ``backtest_deal_price`` (default ``open``, as the official script: the
next bar's open; ``close``: its close); positions are valued at each bar's close, so a name bought at the open
earns open-to-close on its first bar and close-to-close afterwards. Daily columns follow
Qlib's report: ``return`` is the portfolio's return before costs, ``cost`` the costs as a fraction of the
previous value, ``bench`` the benchmark's return. Summary statistics use Qlib's convention (``risk_analysis``,
mode "sum": annualised return = mean · N, information ratio = mean / std · sqrt(N), max drawdown of the summed
curve, N = 238 trading days a year); total returns compound.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from kronos import io as kio
from kronos.config import Config
from kronos.errors import DataError, DependencyError, InputError
from kronos.paths import path_in, safe_filename

logger = logging.getLogger(__name__)

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
        from kronos.evaluate.plots import plot_backtest

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
        from kronos.evaluate.plots import plot_backtest_comparison

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
    out["start"] = _fmt_time(daily.index[0]) if len(daily) else None
    out["end"] = _fmt_time(daily.index[-1]) if len(daily) else None
    out["periods_per_year"] = float(periods_per_year)
    if extra:
        out.update(extra)
    return out


def _compound(r: pd.Series) -> float:
    r = pd.Series(r, dtype=float).fillna(0.0)
    return float((1.0 + r).prod() - 1.0) if len(r) else float("nan")


# ---------------------------------------------------------------------- inputs
def normalize_signal(signal: pd.Series | pd.DataFrame) -> pd.Series:
    """Return the signal as a float Series on a sorted (datetime, instrument) MultiIndex, NaNs dropped.

    Accepts a Series on a two-level index in either order (as Qlib does), a one-column DataFrame on such an
    index, or a wide DataFrame (index dates, columns instruments; the official script's format).
    """
    if isinstance(signal, pd.DataFrame):
        if isinstance(signal.index, pd.MultiIndex):
            if signal.shape[1] < 1:
                raise InputError("signal DataFrame has no columns; pass a Series of scores")
            signal = signal.iloc[:, 0]
        else:
            try:
                dates = _naive(pd.DatetimeIndex(pd.to_datetime(signal.index)))
            except (ValueError, TypeError):
                raise InputError(
                    "a wide signal DataFrame needs dates as its index and instruments as columns"
                ) from None
            index = pd.MultiIndex.from_product(
                [dates, [str(c) for c in signal.columns]], names=["datetime", "instrument"]
            )
            values = signal.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float).ravel()
            signal = pd.Series(values, index=index)
    if not isinstance(signal, pd.Series):
        raise InputError(f"signal must be a pandas Series or DataFrame, got {type(signal).__name__}")
    if not isinstance(signal.index, pd.MultiIndex) or signal.index.nlevels != 2:
        raise InputError(
            "signal must be indexed by a (datetime, instrument) MultiIndex; "
            "use kronos.evaluate.signals_from_records to build one"
        )
    names = list(signal.index.names)
    if "datetime" in names and "instrument" in names:
        dt_level = names.index("datetime")
    else:
        dt_level = 0 if _looks_like_dates(signal.index.get_level_values(0)) else 1
    dates = signal.index.get_level_values(dt_level)
    insts = signal.index.get_level_values(1 - dt_level)
    try:
        dates = _naive(pd.DatetimeIndex(pd.to_datetime(dates)))
    except (ValueError, TypeError):
        raise InputError("signal index has no level of dates; expected (datetime, instrument)") from None
    values = pd.to_numeric(pd.Series(signal.to_numpy()), errors="coerce").to_numpy(dtype=float)
    out = pd.Series(
        values,
        index=pd.MultiIndex.from_arrays([dates, insts.astype(str)], names=["datetime", "instrument"]),
        name="score",
    )
    out = out[np.isfinite(out.to_numpy())]
    out = out[~out.index.duplicated(keep="last")].sort_index()
    if out.empty:
        raise InputError("signal has no finite scores")
    return out


def _naive(index: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Drop a time zone (keeping local wall time) so dates compare with plain config dates."""
    return index.tz_localize(None) if index.tz is not None else index


def _fmt_time(ts: pd.Timestamp) -> str:
    return str(ts.date()) if ts == ts.normalize() else ts.isoformat()


def _looks_like_dates(values: pd.Index) -> bool:
    if pd.api.types.is_datetime64_any_dtype(values):
        return True
    try:
        pd.to_datetime(values[:5])
        return True
    except (ValueError, TypeError):
        return False


def _clip_range(time_range: Sequence, first: pd.Timestamp, last_trade: pd.Timestamp, what: str) -> tuple:
    if len(time_range) != 2:
        raise InputError(f"backtest time range must be [start, end], got {list(time_range)}")
    try:
        lo = pd.Timestamp(time_range[0]) if time_range[0] else first
        hi = pd.Timestamp(time_range[1]) if time_range[1] else last_trade
    except (ValueError, TypeError):
        raise InputError(f"backtest time range {list(time_range)} does not hold dates") from None
    start, end = max(lo, first), min(hi, last_trade)
    if start > end:
        raise DataError(
            f"the signal's dates ({_fmt_time(first)}..{_fmt_time(last_trade)}) and {what} [{_fmt_time(lo)}, "
            f"{_fmt_time(hi)}] do "
            "not overlap; set 'backtest_time_range' to a period the forecasts cover"
        )
    return start, end


def _risk_degree_check(risk_degree: float) -> None:
    if not 0 < risk_degree <= 1:
        raise InputError(f"risk_degree must be in (0, 1], got {risk_degree}")


def _strategy_params(config: Config, engine: str, benchmark: str, risk_degree: float, **more: Any) -> dict:
    params = {
        "engine": engine,
        "benchmark": benchmark,
        "topk": config.backtest_n_symbol_hold,
        "n_drop": config.backtest_n_symbol_drop,
        "hold_thresh": config.backtest_hold_thresh,
        "risk_degree": risk_degree,
        "open_cost": config.backtest_open_cost,
        "close_cost": config.backtest_close_cost,
        "min_cost": config.backtest_min_cost,
        "account": config.backtest_account,
    }
    params.update(more)
    return params


def _check_strategy(config: Config) -> None:
    if config.backtest_n_symbol_hold < 1:
        raise InputError(f"config key 'backtest_n_symbol_hold' must be >= 1, got {config.backtest_n_symbol_hold}")
    if config.backtest_n_symbol_drop < 0:
        raise InputError(f"config key 'backtest_n_symbol_drop' must be >= 0, got {config.backtest_n_symbol_drop}")


# ---------------------------------------------------------------------- the TopkDropout rule
def topk_dropout_orders(scores: pd.Series, held: Sequence[str], topk: int, n_drop: int) -> tuple[list, list]:
    """TopkDropoutStrategy's choice (method_sell "bottom", method_buy "top"): which held names to sell and
    which new names to buy, given today's ``scores`` (index instrument). Held names without a score rank last.

    The buy list has ``len(sell) + topk - len(held)`` names even when a sale is later blocked (hold_thresh,
    suspension), as in Qlib, so the book may briefly exceed ``topk``.
    """
    last = scores.reindex(pd.Index(list(held), dtype=object)).sort_values(ascending=False, na_position="last").index
    candidates = scores[~scores.index.isin(last)].sort_values(ascending=False).index
    n_new = max(n_drop + topk - len(last), 0)
    today = list(candidates[:n_new])
    comb = (
        scores.reindex(last.union(pd.Index(today, dtype=object))).sort_values(ascending=False, na_position="last").index
    )
    worst = set(comb[-n_drop:]) if n_drop > 0 else set()
    sell = [code for code in last if code in worst]
    buy = today[: max(len(sell) + topk - len(last), 0)]
    return sell, buy


# ---------------------------------------------------------------------- built-in engine
def run_simple_backtest(
    signal: pd.Series | pd.DataFrame,
    close: pd.DataFrame,
    config: Config,
    benchmark: pd.Series | None = None,
    *,
    time_range: Sequence | None = None,
    risk_degree: float = 0.95,
    limit_threshold: float | None = None,
    periods_per_year: float | None = None,
    benchmark_name: str | None = None,
    open_prices: pd.DataFrame | None = None,
    deal_price: str | None = None,
) -> BacktestReport:
    """Top-k long-only backtest on a wide close-price frame (index times, columns symbols).

    The trading rule is Qlib's TopkDropoutStrategy (see :func:`topk_dropout_orders`): keep the book, sell up to
    ``backtest_n_symbol_drop`` of the worst-ranked held names once held ``backtest_hold_thresh`` bars, and spend
    ``risk_degree`` of the cash equally on the best-ranked names not held, up to ``backtest_n_symbol_hold``
    names. Orders fill on the bar after the signal's date at ``deal_price`` (default ``backtest_deal_price``:
    ``open`` fills at that bar's open from ``open_prices``, a wide frame shaped like ``close``; ``close`` at its
    close), in fractional shares; a bar with no price (suspension) blocks trading that name. Costs:
    ``backtest_open_cost`` of the value bought,
    ``backtest_close_cost`` of the value sold, at least ``backtest_min_cost`` (currency; the book starts with
    ``backtest_account``). ``limit_threshold`` (e.g. 0.095) optionally blocks trading a name whose bar return
    reaches ±threshold, like Qlib's ``forbid_all_trade_at_limit``.

    ``benchmark``: benchmark *prices* (index times); by default the equal-weight average return of all
    columns of ``close``. ``time_range`` defaults to ``config.backtest_time_range`` and is clipped to the
    signal's dates (through the bar after the last signal). ``periods_per_year`` is inferred from the bar
    spacing when not given (238 for daily bars).
    """
    _check_strategy(config)
    _risk_degree_check(risk_degree)
    deal_price = deal_price or config.backtest_deal_price
    if deal_price not in ("open", "close"):
        raise InputError(f"deal_price must be 'open' or 'close' (config key 'backtest_deal_price'), got {deal_price!r}")
    if deal_price == "open" and open_prices is None:
        raise InputError(
            "backtest_deal_price 'open' needs open prices (open_prices=wide DataFrame like close); "
            "pass them or set backtest_deal_price: close"
        )
    sig = normalize_signal(signal)
    prices = _prepare_close(close)
    symbols = list(prices.columns)
    known = sig.index.get_level_values("instrument").unique()
    overlap = [s for s in known if s in set(symbols)]
    if not overlap:
        raise DataError(
            f"none of the signal's instruments ({list(known[:5])}...) is a column of the close-price frame "
            f"({symbols[:5]}...); pass prices for the forecast symbols"
        )
    missing = len(known) - len(overlap)
    if missing:
        logger.warning("%d signal instrument(s) have no prices and are ignored", missing)

    calendar = prices.index
    sig_dates = sig.index.get_level_values("datetime").unique().sort_values()
    if not sig_dates.isin(calendar).any():
        raise DataError(
            f"no signal date (e.g. {sig_dates[0]}) is a bar of the close-price frame ({calendar[0]}..{calendar[-1]}); "
            "signals must be dated with the bar times of the prices"
        )
    first = sig_dates[0]
    after_last = calendar[calendar > sig_dates[-1]]
    last_trade = after_last[0] if len(after_last) else calendar[-1]
    start, end = _clip_range(
        time_range if time_range is not None else config.backtest_time_range, first, last_trade, "backtest_time_range"
    )
    pos = np.flatnonzero((calendar >= start) & (calendar <= end))
    if len(pos) == 0:
        raise DataError(f"the close-price frame has no bars between {start} and {end}")
    if periods_per_year is None:
        periods_per_year = infer_periods_per_year(calendar)

    px = prices.to_numpy(dtype=float)
    px_ff = prices.ffill().to_numpy(dtype=float)
    if deal_price == "open":
        opens = _prepare_close(open_prices).reindex(index=calendar, columns=symbols)
        fill = np.where(np.isfinite(px), opens.to_numpy(dtype=float), np.nan)  # no close: no bar, no trade
    else:
        fill = px
    bar_ret = prices.ffill().pct_change(fill_method=None).to_numpy(dtype=float)
    if benchmark is not None:
        bench_ret = _benchmark_returns(benchmark, calendar)
        bench_label = benchmark_name or (str(benchmark.name) if benchmark.name is not None else "benchmark")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN first bar
            raw = prices.pct_change(fill_method=None)
            bench_ret = raw.mean(axis=1, skipna=True).fillna(0.0).to_numpy(dtype=float)
        bench_label = benchmark_name or "equal_weight"

    col = {s: j for j, s in enumerate(symbols)}
    priced = list(col)
    by_date = {d: g.droplevel("datetime") for d, g in sig.groupby(level="datetime")}
    topk, n_drop, hold_thresh = (
        config.backtest_n_symbol_hold,
        config.backtest_n_symbol_drop,
        config.backtest_hold_thresh,
    )
    open_cost, close_cost, min_cost = (config.backtest_open_cost, config.backtest_close_cost, config.backtest_min_cost)

    cash = float(config.backtest_account)
    shares = np.zeros(len(symbols))
    held_days: dict[str, int] = {}
    prev_value = cash
    rows = []
    held_value: list[np.ndarray] = []
    for i in pos:
        t = calendar[i]
        price_ff = np.nan_to_num(px_ff[i], nan=0.0)
        tradable = np.isfinite(fill[i])
        if limit_threshold is not None:
            with np.errstate(invalid="ignore"):
                tradable &= ~(np.abs(bar_ret[i]) >= limit_threshold)
        cost_today = 0.0
        traded = 0.0
        scores = by_date.get(calendar[i - 1]) if i > 0 else None
        if scores is not None:
            scores = scores[scores.index.isin(priced)]
        if scores is not None and len(scores):
            held = [s for s in symbols if shares[col[s]] > 0]
            sell, buy = topk_dropout_orders(scores, held, topk, n_drop)
            for code in sell:
                j = col[code]
                if not tradable[j] or held_days.get(code, 0) < hold_thresh:
                    continue
                value = shares[j] * fill[i, j]
                fee = max(value * close_cost, min_cost)
                cash += value - fee
                cost_today += fee
                traded += value
                shares[j] = 0.0
                held_days.pop(code, None)
            per_name = cash * risk_degree / len(buy) if buy else 0.0
            for code in buy:
                j = col[code]
                if not tradable[j] or per_name <= 0:
                    continue
                value = min(per_name, (cash - min_cost) / (1.0 + open_cost))
                if value <= 0:
                    continue
                fee = max(value * open_cost, min_cost)
                cash -= value + fee
                cost_today += fee
                traded += value
                shares[j] += value / fill[i, j]
                held_days[code] = 0
        value_now = cash + float(shares @ price_ff)
        held_value.append(shares * price_ff / value_now if value_now > 0 else shares * 0.0)
        base = prev_value if prev_value > 0 else float("nan")
        rows.append(
            (
                t,
                (value_now - prev_value + cost_today) / base,
                cost_today / base,
                float(bench_ret[i]),
                traded / base,
                value_now,
            )
        )
        prev_value = value_now
        for code in held_days:  # Qlib counts a bar of holding at each bar's end
            held_days[code] += 1

    daily = pd.DataFrame(rows, columns=["datetime", "return", "cost", "bench", "turnover", "account"])
    daily = daily.set_index("datetime")
    daily["bench"] = daily["bench"].fillna(0.0)
    daily = _finish_daily(daily)
    extra = _strategy_params(
        config, "simple", bench_label, risk_degree, limit_threshold=limit_threshold, deal_price=deal_price
    )
    holdings = pd.DataFrame(np.array(held_value).reshape(len(pos), len(symbols)), index=daily.index, columns=symbols)
    return BacktestReport(
        daily=daily, summary=summarize(daily, periods_per_year, extra), holdings=holdings.loc[:, (holdings > 0).any()]
    )


def _finish_daily(daily: pd.DataFrame) -> pd.DataFrame:
    daily = daily.copy()
    daily["excess_return_without_cost"] = daily["return"] - daily["bench"]
    daily["excess_return_with_cost"] = daily["return"] - daily["bench"] - daily["cost"]
    daily.index = pd.DatetimeIndex(daily.index, name="datetime")
    return daily[DAILY_COLUMNS]


def _prepare_close(close: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(close, pd.DataFrame):
        raise InputError(
            f"close prices must be a wide DataFrame (index times, columns symbols), got {type(close).__name__}"
        )
    if close.empty:
        raise DataError("the close-price frame is empty")
    prices = close.copy()
    try:
        prices.index = _naive(pd.DatetimeIndex(pd.to_datetime(prices.index)))
    except (ValueError, TypeError):
        raise InputError("the close-price frame's index must hold dates/times") from None
    prices.columns = [str(c) for c in prices.columns]
    prices = prices.apply(pd.to_numeric, errors="coerce")
    prices = prices.where(prices > 0)  # non-positive prices are missing data
    prices = prices[~prices.index.duplicated(keep="last")].sort_index()
    return prices.dropna(how="all")


def _benchmark_returns(benchmark: pd.Series, calendar: pd.DatetimeIndex) -> np.ndarray:
    if not isinstance(benchmark, pd.Series):
        raise InputError(f"benchmark must be a Series of prices indexed by time, got {type(benchmark).__name__}")
    b = pd.to_numeric(benchmark, errors="coerce")
    try:
        b.index = _naive(pd.DatetimeIndex(pd.to_datetime(b.index)))
    except (ValueError, TypeError):
        raise InputError("the benchmark series' index must hold dates/times") from None
    b = b[~b.index.duplicated(keep="last")].sort_index()
    b = b.reindex(b.index.union(calendar)).ffill().reindex(calendar)
    return b.pct_change(fill_method=None).fillna(0.0).to_numpy(dtype=float)


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


# ---------------------------------------------------------------------- Qlib engine
def _import_qlib() -> SimpleNamespace:
    """pyqlib's backtest pieces, imported on first use (its optional gym dependency prints a notice to
    stderr on import; that notice is swallowed)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import qlib
            from qlib.backtest import backtest
            from qlib.backtest.executor import SimulatorExecutor
            from qlib.config import REG_CN
            from qlib.contrib.evaluate import risk_analysis
            from qlib.contrib.strategy import TopkDropoutStrategy
            from qlib.data import D
    except ImportError:
        raise DependencyError(
            "the Qlib backtest needs pyqlib: pip install pyqlib (or pass close prices to use the built-in backtest)"
        ) from None
    return SimpleNamespace(
        qlib=qlib,
        backtest=backtest,
        SimulatorExecutor=SimulatorExecutor,
        REG_CN=REG_CN,
        risk_analysis=risk_analysis,
        TopkDropoutStrategy=TopkDropoutStrategy,
        D=D,
    )


def init_qlib(provider_uri: PathLike) -> None:
    """Initialise Qlib once per provider folder (shared with the Qlib data source)."""
    _import_qlib()  # the backtest's own pieces, with its DependencyError
    from kronos.data.sources.qlib import init_qlib as _init

    _init(str(provider_uri))


def run_qlib_backtest(
    signal: pd.Series | pd.DataFrame,
    config: Config,
    provider_uri: PathLike | None = None,
    *,
    time_range: Sequence | None = None,
    risk_degree: float = 0.95,
    limit_threshold: float | None = 0.095,
    deal_price: str | None = None,
) -> BacktestReport:
    """Backtest ``signal`` with Qlib's TopkDropoutStrategy over ``config.backtest_time_range`` (clipped to the
    signal's dates), benchmark ``config.benchmark``, costs, account and fill price (``backtest_deal_price``,
    default the open as the official script) from the config.

    ``$change`` caveat: Qlib's float ``limit_threshold`` compares the provider's ``$change`` field with a ratio,
    but some providers (e.g. the bundled sample data) store ``$change`` in percent, which would flag most bars
    as limit-up/down and block trading. The limit rule is therefore passed as Qlib expressions on the adjusted
    close's bar return, ``$close / Ref($close, 1) - 1 >= limit_threshold`` (and ``<= -limit_threshold``),
    correct whatever unit ``$change`` uses. ``limit_threshold=None`` disables limits (Qlib alone would fall
    back to its CN default of 0.095 on ``$change``).
    """
    _check_strategy(config)
    _risk_degree_check(risk_degree)
    sig = normalize_signal(signal)
    provider = str(Path(os.path.expanduser(str(provider_uri or config.qlib_data_path))).resolve())
    init_qlib(provider)
    q = _import_qlib()
    D, risk_analysis = q.D, q.risk_analysis

    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    sig_dates = sig.index.get_level_values("datetime").unique().sort_values()
    after_last = calendar[calendar > sig_dates[-1]]
    # Qlib's last step reads the calendar day after it, so the provider's final day cannot be traded
    last_trade = min(after_last[0] if len(after_last) else calendar[-1], calendar[-2])
    start, end = _clip_range(
        time_range if time_range is not None else config.backtest_time_range,
        max(sig_dates[0], calendar[0]),
        last_trade,
        "backtest_time_range",
    )
    days = calendar[(calendar >= start) & (calendar <= end)]
    if len(days) < 2:
        raise DataError(
            f"the Qlib calendar has fewer than 2 trading days between {_fmt_time(start)} and "
            f"{_fmt_time(end)}; widen 'backtest_time_range'"
        )
    start, end = days[0], days[-1]

    bench = config.benchmark
    bench_px = D.features([bench], ["$close"], start, end, freq="day")
    if bench_px.empty or bench_px["$close"].notna().sum() == 0:
        raise DataError(
            f"benchmark '{bench}' has no data in '{provider}' between {_fmt_time(start)} and "
            f"{_fmt_time(end)}; set 'backtest_benchmark' to an instrument the provider holds"
        )
    codes = sorted(sig.index.get_level_values("instrument").unique())
    if limit_threshold is None:
        limit: Any = float("inf")  # a float avoids Qlib's CN default on the percent-valued $change
    else:
        thr = float(limit_threshold)
        limit = (f"$close / Ref($close, 1) - 1 >= {thr!r}", f"$close / Ref($close, 1) - 1 <= {-thr!r}")

    strategy = q.TopkDropoutStrategy(
        signal=sig,
        topk=config.backtest_n_symbol_hold,
        n_drop=config.backtest_n_symbol_drop,
        hold_thresh=config.backtest_hold_thresh,
        risk_degree=risk_degree,
    )
    deal_price = deal_price or config.backtest_deal_price
    executor = q.SimulatorExecutor(time_per_step="day", generate_portfolio_metrics=True, verbose=False)
    exchange_kwargs = {
        "freq": "day",
        "codes": codes,
        "limit_threshold": limit,
        "deal_price": deal_price,
        "open_cost": config.backtest_open_cost,
        "close_cost": config.backtest_close_cost,
        "min_cost": config.backtest_min_cost,
    }
    logger.info("Qlib backtest %s..%s on %d instruments, benchmark %s", start.date(), end.date(), len(codes), bench)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Qlib averages empty slices on idle days
        try:
            portfolio, _ = q.backtest(
                start_time=start,
                end_time=end,
                strategy=strategy,
                executor=executor,
                benchmark=bench,
                account=config.backtest_account,
                exchange_kwargs=exchange_kwargs,
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise DataError(
                f"Qlib backtest failed on '{provider}' ({type(exc).__name__}: {exc}); check "
                "that the signal's instruments and dates exist in the provider"
            ) from None
    report, positions = portfolio["1day"]
    daily = pd.DataFrame(
        {
            "return": report["return"].astype(float),
            "cost": report["cost"].astype(float),
            "bench": report["bench"].astype(float),
            "turnover": report["turnover"].astype(float),
            "account": report["account"].astype(float),
        }
    )
    daily = _finish_daily(daily)
    summary = summarize(
        daily,
        TRADING_DAYS_PER_YEAR,
        _strategy_params(
            config,
            "qlib",
            bench,
            risk_degree,
            limit_threshold=limit_threshold,
            deal_price=deal_price,
            provider_uri=provider,
        ),
    )
    # the headline figures straight from Qlib's own risk_analysis, as the official script prints them
    for name, series in (
        ("excess_return_without_cost", daily["excess_return_without_cost"]),
        ("excess_return_with_cost", daily["excess_return_with_cost"]),
        ("benchmark", daily["bench"]),
    ):
        qlib_risk = risk_analysis(series, freq="day")["risk"]
        for key in ("mean", "std", "annualized_return", "information_ratio", "max_drawdown"):
            summary[f"{name}/{key}"] = float(qlib_risk[key])
    return BacktestReport(daily=daily, summary=summary, holdings=_qlib_holdings(positions, daily.index))


def _qlib_holdings(positions: Any, index: pd.DatetimeIndex) -> pd.DataFrame:
    """Share of the account in each name after each day's close, from Qlib's daily positions."""
    rows = {}
    for t, position in dict(positions).items():
        weights = position.get_stock_weight_dict(only_stock=False)
        rows[pd.Timestamp(t)] = {str(k): float(v) for k, v in weights.items()}
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(index).fillna(0.0)
    frame.index.name = "datetime"
    return frame.loc[:, (frame > 0).any()] if len(frame.columns) else frame


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


# ---------------------------------------------------------------------- files
