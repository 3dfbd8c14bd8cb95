"""Trading signals from forecast records (:mod:`kronos.evaluate.records`), as the official ``qlib_test.py`` builds
them: one score per (date, instrument) from the forecast close path."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kronos.errors import InputError
from kronos.evaluate.records import check_records

SIGNAL_KINDS = ("last", "mean", "max", "min")


def signals_from_records(records: pd.DataFrame, kind: str = "mean", scale: str = "price") -> pd.Series:
    """Trading signal per (datetime, instrument) from the forecast close path, as the official qlib_test.py (the
    anchor is the signal's date; the index uses Qlib's level names).

    ``kind`` picks the last / mean / max / min forecast close over the horizon, minus ``last_close``. The official
    script takes that difference in normalised space, i.e. divided by the lookback's close std (``scale="std"``,
    needs a ``close_scale`` column holding ``std + 1e-5``); ``scale="price"`` divides by ``last_close`` instead, so
    the score is a return. The index is a (datetime, instrument) MultiIndex, the format Qlib's strategies take;
    NaN scores are dropped.
    """
    if scale not in ("price", "std"):
        raise InputError(f"signal scale '{scale}' is unknown; use 'price' or 'std'")
    if kind not in SIGNAL_KINDS:
        raise InputError(f"signal kind '{kind}' is unknown; use one of {list(SIGNAL_KINDS)}")
    df = check_records(records)
    df = df.sort_values(["anchor", "symbol", "step"], kind="mergesort")
    g = df.groupby(["anchor", "symbol"], sort=True)
    agg = g["close"].agg(kind if kind != "last" else "last")
    last_close = g["last_close"].last()
    if scale == "std":
        if "close_scale" not in df.columns:
            raise InputError("signal scale 'std' needs a 'close_scale' column (lookback close std + 1e-5)")
        score = (agg - last_close) / g["close_scale"].last()
    else:
        score = agg / last_close - 1.0
    score = score.replace([np.inf, -np.inf], np.nan).dropna()
    score.index = score.index.set_names(["datetime", "instrument"])
    score.name = "score"
    return score.astype(float)


def all_signals(records: pd.DataFrame) -> dict[str, pd.Series]:
    """The four official signals (last, mean, max, min) keyed by kind."""
    return {kind: signals_from_records(records, kind) for kind in SIGNAL_KINDS}


__all__ = ["SIGNAL_KINDS", "all_signals", "signals_from_records"]
