"""Forecast records: the long frame of :meth:`kronos.inference.KronosPredictor.predict_df`, the package's one
record schema: one row per (symbol, anchor, step) with ``symbol``, ``anchor`` (the last context bar, i.e. the
signal date), ``step`` (1..P), ``timestamps`` (the forecast bar), the mean forecast ``close`` (and the other value
columns), ``close_q{q}`` quantile columns (:func:`kronos.inference.bands.quantile_column`), ``last_close`` (close
at the anchor), ``close_scale`` and ``true_close`` (the realised close, NaN when not known yet).

Here: the checks every reader of records shares, and the model's IC by anchor date (the report's IC, for the
IC-over-time figure).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kronos.errors import InputError
from kronos.evaluate.metrics import daily_ic

REQUIRED_COLUMNS = ("symbol", "anchor", "step", "last_close", "close")


def check_records(records: pd.DataFrame, required: Sequence[str] = REQUIRED_COLUMNS) -> pd.DataFrame:
    """``records`` with ``required`` columns, numeric value columns and an ``anchor`` of dates (one-line
    :class:`~kronos.errors.InputError` naming the column and row otherwise)."""
    if not isinstance(records, pd.DataFrame):
        raise InputError(f"forecast records must be a pandas DataFrame, got {type(records).__name__}")
    missing = [c for c in required if c not in records.columns]
    if missing:
        raise InputError(
            f"forecast records lack column(s) {missing}; expected {list(required)} (got {list(records.columns)[:12]})"
        )
    df = records.reset_index(drop=True)
    numeric = [c for c in df.columns if c in ("step", "last_close", "true_close", "close", "close_scale")]
    for col in numeric:
        if not pd.api.types.is_numeric_dtype(df[col]):
            converted = pd.to_numeric(df[col], errors="coerce")
            bad = converted.isna() & df[col].notna()
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise InputError(
                    f"forecast records column '{col}' must be numeric; row {row} holds {df[col].iloc[row]!r}"
                )
            df[col] = converted
    if not pd.api.types.is_datetime64_any_dtype(df["anchor"]):
        try:
            df["anchor"] = pd.to_datetime(df["anchor"])
        except (ValueError, TypeError):
            raise InputError(
                "forecast records column 'anchor' must hold dates (the last context bar of each forecast)"
            ) from None
    return df


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (symbol, anchor): the last step of the horizon."""
    df = df.sort_values(["symbol", "anchor", "step"], kind="mergesort")
    return df.groupby(["symbol", "anchor"], sort=False).tail(1).reset_index(drop=True)


def ic_by_date(records: pd.DataFrame) -> pd.DataFrame:
    """The model's per-anchor-date IC and RankIC (forecast vs realised return to the horizon's last step, as the
    report's IC), for :func:`kronos.evaluate.plots.plot_ic_over_time`."""
    fin = final_rows(check_records(records, (*REQUIRED_COLUMNS, "true_close")))
    fin = fin.assign(
        pred_ret=fin["close"] / fin["last_close"] - 1.0, true_ret=fin["true_close"] / fin["last_close"] - 1.0
    ).replace([np.inf, -np.inf], np.nan)
    return daily_ic(fin, "pred_ret", "true_ret")


__all__ = ["REQUIRED_COLUMNS", "check_records", "final_rows", "ic_by_date"]
