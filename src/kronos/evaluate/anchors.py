"""The periods evaluation and backtest forecasts are anchored in: only the test split (history allowed, targets not).

An anchor is the last bar of a forecast's context; its targets are the ``predict_window`` bars after it. The rule:
every target lies after the last validation bar, so an anchor is a bar at or after that bar. The context may reach
back into earlier splits. Which anchors of the period are forecast is :func:`kronos.evaluate.rolling.select_anchors`
(one rule for every split). Periods:

- with ``split_ratios`` set, the test and backtest periods default to the test split's first..last bar (the date
  ranges of the config are used only when the user set them);
- a ``test_time_range`` may start before the end of validation (its first bars are the history of the first
  windows, as in the official configs): evaluation anchors start at the last validation bar;
- a ``backtest_time_range`` that starts before the last validation bar, or a ``test_time_range`` that ends on or
  before it, is a :class:`~kronos.errors.DataError` naming both ranges, unless ``allow_eval_overlap: true``
  (unsafe: such numbers are scored on bars that chose the checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from kronos.data.schema import range_end
from kronos.data.store import SPLITS, load_manifest, load_split
from kronos.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPeriods:
    """Anchor periods (inclusive) for evaluation and backtest, and the last validation bar they follow."""

    test: tuple[pd.Timestamp, pd.Timestamp]
    backtest: tuple[pd.Timestamp, pd.Timestamp]
    last_val: pd.Timestamp | None


def split_bounds(dataset_path: str, split: str) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """First and last timestamp of ``split`` from the dataset's manifest (``first``/``last`` or ``start``/``end``),
    else from the split's rows; None when the split is empty."""
    info = (load_manifest(dataset_path).get("splits") or {}).get(split) or {}
    lo, hi = info.get("first", info.get("start")), info.get("last", info.get("end"))
    if lo and hi:
        return pd.Timestamp(lo), pd.Timestamp(hi)
    ts = load_split(dataset_path, split)["timestamps"]
    return (ts.min(), ts.max()) if len(ts) else None


def split_dates(dataset_path: str) -> dict[str, pd.Timestamp]:
    """First and last own bar of each split (``train_start`` ... ``test_end``, NaT for an empty split)."""
    out = {}
    for split in SPLITS:
        bounds = split_bounds(dataset_path, split)
        out[f"{split}_start"], out[f"{split}_end"] = (pd.Timestamp(b) for b in bounds) if bounds else (pd.NaT, pd.NaT)
    return out


def eval_periods(config, dataset_path: str | None = None) -> EvalPeriods:
    """The evaluation and backtest anchor periods of ``config`` over its processed dataset (see the module doc)."""
    path = dataset_path or config.dataset_path
    val = split_bounds(path, "val")
    last_val = val[1] if val else None
    unsafe = bool(getattr(config, "allow_eval_overlap", False))
    user_set = getattr(config, "is_set", lambda key: True)
    test_split = split_bounds(path, "test") if config.split_ratios is not None else None

    def period(key: str) -> tuple[pd.Timestamp, pd.Timestamp]:
        if test_split is not None and not user_set(key):
            return test_split
        rng = getattr(config, key)
        return pd.Timestamp(rng[0]), range_end(rng[1])

    test, backtest = period("test_time_range"), period("backtest_time_range")
    if last_val is not None and not unsafe and test_split is not None:
        # periods taken from the test split (not set by the user) follow the rule without complaint
        if not user_set("test_time_range"):
            test = (max(test[0], last_val), test[1])
        if not user_set("backtest_time_range"):
            backtest = (max(backtest[0], last_val), backtest[1])
    if last_val is not None and not unsafe:
        split_by = (
            f"split_ratios {config.split_ratios}"
            if config.split_ratios is not None
            else f"val_time_range {config.val_time_range}"
        )
        val_desc = f"the validation split ends at {last_val} ({split_by})"
        if test[1] <= last_val:
            raise DataError(
                f"test_time_range {_show(test)} ends on or before the last validation bar: {val_desc}; every "
                "evaluation target must lie after it: move test_time_range later (or set allow_eval_overlap: true, "
                "unsafe)"
            )
        if backtest[0] < last_val:
            raise DataError(
                f"backtest_time_range {_show(backtest)} starts before the last validation bar: {val_desc}; its "
                "forecasts would target validation bars: start it after that bar (or set allow_eval_overlap: true, "
                "unsafe)"
            )
        if test[0] < last_val:
            log.info(
                "evaluation anchors start at the last validation bar %s (test_time_range %s starts earlier: "
                "those bars are history only)",
                last_val,
                _show(test),
            )
            test = (last_val, test[1])
    elif unsafe:
        log.warning(
            "allow_eval_overlap: true: evaluation/backtest anchors are not limited to the test split; "
            "their targets may be bars that trained or selected the model"
        )
    return EvalPeriods(test, backtest, last_val)


def in_period(anchors: pd.Series, period: tuple[pd.Timestamp, pd.Timestamp]) -> pd.Series:
    """Mask of ``anchors`` inside the inclusive ``period``."""
    return (anchors >= period[0]) & (anchors <= period[1])


def _show(period: tuple[pd.Timestamp, pd.Timestamp]) -> str:
    return f"[{period[0]}, {period[1]}]"


__all__ = ["EvalPeriods", "eval_periods", "in_period", "split_bounds", "split_dates"]
