"""The built-in engine: Qlib's TopkDropout rule replayed on a wide close-price frame.

``run_simple_backtest`` trades the same rule as ``run_qlib_backtest`` for data that is not a Qlib provider (CSV
files, Sina downloads, other markets and bar frequencies), in fractional shares.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kronos.config import Config
from kronos.errors import DataError, InputError
from kronos.evaluate.backtest.inputs import (
    check_risk_degree,
    check_strategy,
    clip_range,
    normalize_signal,
    strategy_params,
    tz_naive,
)
from kronos.evaluate.backtest.report import BacktestReport, finish_daily, infer_periods_per_year, summarize

logger = logging.getLogger(__name__)


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
    check_strategy(config)
    check_risk_degree(risk_degree)
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
    start, end = clip_range(
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
    daily = finish_daily(daily)
    extra = strategy_params(
        config, "simple", bench_label, risk_degree, limit_threshold=limit_threshold, deal_price=deal_price
    )
    holdings = pd.DataFrame(np.array(held_value).reshape(len(pos), len(symbols)), index=daily.index, columns=symbols)
    return BacktestReport(
        daily=daily, summary=summarize(daily, periods_per_year, extra), holdings=holdings.loc[:, (holdings > 0).any()]
    )


def _prepare_close(close: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(close, pd.DataFrame):
        raise InputError(
            f"close prices must be a wide DataFrame (index times, columns symbols), got {type(close).__name__}"
        )
    if close.empty:
        raise DataError("the close-price frame is empty")
    prices = close.copy()
    try:
        prices.index = tz_naive(pd.DatetimeIndex(pd.to_datetime(prices.index)))
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
        b.index = tz_naive(pd.DatetimeIndex(pd.to_datetime(b.index)))
    except (ValueError, TypeError):
        raise InputError("the benchmark series' index must hold dates/times") from None
    b = b[~b.index.duplicated(keep="last")].sort_index()
    b = b.reindex(b.index.union(calendar)).ffill().reindex(calendar)
    return b.pct_change(fill_method=None).fillna(0.0).to_numpy(dtype=float)
