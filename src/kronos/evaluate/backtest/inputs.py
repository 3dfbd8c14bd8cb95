"""What both engines share: the signal's normal form, the traded period and the strategy's settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kronos.config import Config
from kronos.errors import DataError, InputError
from kronos.evaluate.backtest.report import fmt_time


# ---------------------------------------------------------------------- signal
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
                dates = tz_naive(pd.DatetimeIndex(pd.to_datetime(signal.index)))
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
        dates = tz_naive(pd.DatetimeIndex(pd.to_datetime(dates)))
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


def tz_naive(index: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Drop a time zone (keeping local wall time) so dates compare with plain config dates."""
    return index.tz_localize(None) if index.tz is not None else index


def _looks_like_dates(values: pd.Index) -> bool:
    if pd.api.types.is_datetime64_any_dtype(values):
        return True
    try:
        pd.to_datetime(values[:5])
        return True
    except (ValueError, TypeError):
        return False


# ---------------------------------------------------------------------- period and strategy
def clip_range(time_range: Sequence, first: pd.Timestamp, last_trade: pd.Timestamp, what: str) -> tuple:
    """The traded period: ``time_range`` (empty ends: ``first``/``last_trade``) clipped to ``first..last_trade``."""
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
            f"the signal's dates ({fmt_time(first)}..{fmt_time(last_trade)}) and {what} [{fmt_time(lo)}, "
            f"{fmt_time(hi)}] do "
            "not overlap; set 'backtest_time_range' to a period the forecasts cover"
        )
    return start, end


def check_risk_degree(risk_degree: float) -> None:
    """Raise InputError unless ``risk_degree`` (the share of cash to invest) is in (0, 1]."""
    if not 0 < risk_degree <= 1:
        raise InputError(f"risk_degree must be in (0, 1], got {risk_degree}")


def strategy_params(config: Config, engine: str, benchmark: str, risk_degree: float, **more: Any) -> dict:
    """The strategy's settings as summary fields (engine, benchmark, TopkDropout and cost keys, plus ``more``)."""
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


def check_strategy(config: Config) -> None:
    """Raise InputError for a TopkDropout setting no engine can trade (hold < 1 or drop < 0 names)."""
    if config.backtest_n_symbol_hold < 1:
        raise InputError(f"config key 'backtest_n_symbol_hold' must be >= 1, got {config.backtest_n_symbol_hold}")
    if config.backtest_n_symbol_drop < 0:
        raise InputError(f"config key 'backtest_n_symbol_drop' must be >= 0, got {config.backtest_n_symbol_drop}")
