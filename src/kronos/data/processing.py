"""Cleaning, derived fields, calendar features and train/val/test splits, shared by every data source.

``process_frames`` takes the per-symbol raw frames a source loaded (see :mod:`kronos.data.schema`) and returns
the three split frames plus the dataset manifest that :func:`kronos.data.store.save_dataset` writes.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kronos.config import Config
from kronos.data.schema import (
    KLINE_COLUMNS,
    SPLIT_COLUMNS,
    TIME_FEATURES,
    VALUE_COLUMNS,
    derive_amount,
    time_features,
)
from kronos.data.store import FORMAT_VERSION, SPLITS
from kronos.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Relative slack for the high/low consistency checks: float32 storage (Qlib) and vendor rounding put a close a
# hair above the high now and then; such bars are kept, only clearly impossible ones are dropped.
BAR_TOLERANCE = 1e-4


@dataclass
class CleaningStats:
    """Row counts of one cleaning pass (summed over symbols for the manifest)."""

    rows_in: int = 0
    duplicates: int = 0  # same timestamp seen again; the last one is kept
    missing: int = 0  # NaN / infinite values (e.g. suspended days in Qlib)
    impossible: int = 0  # high < low, close above high, non-positive price, negative volume/amount, ...
    amount_derived: int = 0  # NaN amount filled with mean(OHLC) x volume
    rows_out: int = 0

    def __add__(self, other: "CleaningStats") -> "CleaningStats":
        return CleaningStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def clean_kline_frame(df: pd.DataFrame, symbol: str = "") -> tuple[pd.DataFrame, CleaningStats]:
    """Sort by time, drop duplicate timestamps (keep last), fill a missing amount, drop bad bars.

    Bad bars are rows with a NaN/inf value or an impossible price/volume (see :data:`BAR_TOLERANCE`).
    Returns the clean frame (RangeIndex, canonical columns) and the counts of what was removed.
    """
    stats = CleaningStats(rows_in=len(df))
    frame = df[list(KLINE_COLUMNS)].copy()
    frame = frame[frame["timestamps"].notna()]
    stats.missing += stats.rows_in - len(frame)
    frame = frame.sort_values("timestamps", kind="mergesort")
    dup = frame["timestamps"].duplicated(keep="last").to_numpy()
    stats.duplicates = int(dup.sum())
    frame = frame[~dup].reset_index(drop=True)

    fill = frame["amount"].isna() & frame[["open", "high", "low", "close", "volume"]].notna().all(axis=1)
    if fill.any():
        frame["amount"] = frame["amount"].where(~fill, derive_amount(frame))
        stats.amount_derived = int(fill.sum())

    values = frame[list(VALUE_COLUMNS)].to_numpy(dtype="float64")
    finite = np.isfinite(values).all(axis=1)
    stats.missing += int((~finite).sum())
    o, h, lo, c, v, a = (values[:, i] for i in range(6))
    with np.errstate(invalid="ignore"):
        top = np.maximum(o, c)
        bottom = np.minimum(o, c)
        impossible = (
            (values[:, :4] <= 0).any(axis=1)
            | (v < 0)
            | (a < 0)
            | (h < lo * (1 - BAR_TOLERANCE))
            | (h < top * (1 - BAR_TOLERANCE))
            | (lo > bottom * (1 + BAR_TOLERANCE))
        )
    impossible &= finite
    stats.impossible = int(impossible.sum())
    frame = frame[finite & ~impossible].reset_index(drop=True)
    stats.rows_out = len(frame)
    if stats.duplicates or stats.missing or stats.impossible:
        logger.debug(
            "%s: dropped %d duplicate, %d NaN/inf and %d impossible bar(s) of %d",
            symbol or "frame", stats.duplicates, stats.missing, stats.impossible, stats.rows_in,
        )
    return frame, stats


def add_time_features(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with ``minute, hour, weekday (Mon=0), day, month`` (int64) from ``timestamps``.

    Daily bars carry midnight timestamps, so their minute and hour are 0, as in the official pipeline.
    """
    out = df.copy()
    feats = time_features(out["timestamps"])
    for name in TIME_FEATURES:
        out[name] = feats[name].to_numpy()
    return out


def parse_time_range(value: Any, key: str) -> tuple[pd.Timestamp, pd.Timestamp, bool]:
    """``[start, end]`` of config key ``key`` as timestamps plus whether ``end`` covers its whole day.

    Both ends are inclusive; an end given as a plain date (no time of day) includes that day's intraday bars.
    """
    try:
        start, end = (pd.Timestamp(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key '{key}' must be [start, end] dates, got {value!r} ({exc})") from None
    if start.tzinfo is not None or end.tzinfo is not None:
        start, end = start.tz_localize(None), end.tz_localize(None)
    if start > end:
        raise ConfigError(f"config key '{key}' starts after it ends: {value!r}")
    whole_day = end == end.normalize()
    return start, end, whole_day


def _time_mask(ts: pd.Series, bounds: tuple[pd.Timestamp, pd.Timestamp, bool]) -> np.ndarray:
    start, end, whole_day = bounds
    if whole_day:
        return ((ts >= start) & (ts < end + pd.Timedelta(days=1))).to_numpy()
    return ((ts >= start) & (ts <= end)).to_numpy()


def split_frames(
    frames: Mapping[str, pd.DataFrame], config: Config
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, Any]]]:
    """Split clean per-symbol frames into the long train/val/test frames.

    By ``train/val/test_time_range`` (inclusive; ranges may overlap, as in the seed's config, so that the
    first val/test windows have history) or, when ``split_ratios`` is set, chronologically per symbol with
    val and test reaching ``lookback_window`` rows back into the previous part for the same reason. A symbol
    with fewer than one window (``lookback_window + predict_window + 1`` rows) in a split is left out of it.
    Returns the split frames and per-split info for the manifest; an empty split raises DataError.
    """
    window = config.window
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    dropped: dict[str, dict[str, str]] = {s: {} for s in SPLITS}
    if config.split_ratios is not None:
        ratios = [float(r) for r in config.split_ratios]
        selection: dict[str, Any] = {s: {"ratio": r} for s, r in zip(SPLITS, ratios)}
    else:
        bounds = {s: parse_time_range(getattr(config, f"{s}_time_range"), f"{s}_time_range") for s in SPLITS}
        selection = {s: {"time_range": list(getattr(config, f"{s}_time_range"))} for s in SPLITS}

    for symbol in sorted(frames):
        frame = frames[symbol]
        n = len(frame)
        if config.split_ratios is not None:
            cut1 = int(round(n * ratios[0]))
            cut2 = int(round(n * (ratios[0] + ratios[1])))
            history = config.lookback_window  # val/test reach back for context, like the seed's overlapping ranges
            val_start = max(cut1 - history, 0) if cut2 > cut1 else cut2
            test_start = max(cut2 - history, 0) if n > cut2 else n
            pieces = {"train": frame.iloc[:cut1], "val": frame.iloc[val_start:cut2], "test": frame.iloc[test_start:]}
        else:
            pieces = {s: frame[_time_mask(frame["timestamps"], bounds[s])] for s in SPLITS}
        for split, piece in pieces.items():
            if len(piece) >= window:
                piece = piece.reset_index(drop=True)
                piece.insert(0, "symbol", symbol)
                parts[split].append(piece)
            elif len(piece) > 0:
                dropped[split][symbol] = f"{len(piece)} rows in the split, fewer than one window of {window}"

    data_start = min((f["timestamps"].iloc[0] for f in frames.values() if len(f)), default=None)
    data_end = max((f["timestamps"].iloc[-1] for f in frames.values() if len(f)), default=None)
    splits: dict[str, pd.DataFrame] = {}
    info: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        if not parts[split]:
            if config.split_ratios is not None:
                how = f"split_ratios {config.split_ratios}"
                fix = "raise its share in 'split_ratios'"
            else:
                how = f"{split}_time_range {getattr(config, f'{split}_time_range')}"
                fix = f"change config key '{split}_time_range'"
            coverage = f"the data covers {data_start} .. {data_end}" if data_start is not None else "no data"
            raise DataError(
                f"split '{split}' is empty: no symbol has {window} rows (lookback_window + predict_window + 1) "
                f"in {how}; {coverage}; {fix} or lower lookback_window/predict_window"
            )
        frame = pd.concat(parts[split], ignore_index=True)
        frame["symbol"] = frame["symbol"].astype(str)
        frame = frame[list(SPLIT_COLUMNS)]
        splits[split] = frame
        info[split] = {
            **selection[split],
            "rows": int(len(frame)),
            "n_symbols": int(frame["symbol"].nunique()),
            "start": frame["timestamps"].min().isoformat(),
            "end": frame["timestamps"].max().isoformat(),
            "dropped_symbols": dropped[split],
        }
    return splits, info


def _redacted_config(config: Config) -> dict[str, Any]:
    data = config.to_dict()
    comet = dict(data.get("comet_config") or {})
    if comet.get("api_key"):
        comet["api_key"] = "***"  # never write secrets into a dataset folder
    data["comet_config"] = comet
    return data


def _median_bar_seconds(frames: Mapping[str, pd.DataFrame]) -> Optional[float]:
    gaps = [f["timestamps"].diff().dropna().dt.total_seconds().to_numpy() for f in frames.values() if len(f) > 1]
    gaps = [g for g in gaps if len(g)]
    return float(np.median(np.concatenate(gaps))) if gaps else None


def process_frames(
    raw: Mapping[str, pd.DataFrame],
    config: Config,
    source_name: str,
    *,
    skipped: Optional[Mapping[str, str]] = None,
    source_info: Optional[Mapping[str, Any]] = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Clean every symbol, add calendar features, split; returns ``(splits, manifest)``.

    ``skipped`` lists symbols the source already left out (with reasons); symbols with fewer clean rows than
    one window are added to it. ``source_info`` is stored in the manifest as is (JSON-serialisable values).
    """
    if not raw:
        raise DataError(f"data source '{source_name}' returned no symbols; check its config keys")
    skipped_out: dict[str, str] = dict(skipped or {})
    window = config.window
    total = CleaningStats()
    clean: dict[str, pd.DataFrame] = {}
    for symbol in tqdm(sorted(raw, key=str), desc=f"cleaning {source_name}", unit="symbol", disable=None):
        frame, stats = clean_kline_frame(raw[symbol], str(symbol))
        total = total + stats
        if len(frame) < window:
            reason = (
                f"{len(frame)} clean rows (of {stats.rows_in}), fewer than one window of {window} "
                "(lookback_window + predict_window + 1)"
            )
            skipped_out[str(symbol)] = reason
            logger.warning("skipping symbol %s: %s", symbol, reason)
            continue
        clean[str(symbol)] = add_time_features(frame)
    logger.info(
        "%s: %d rows in, dropped %d duplicate, %d NaN/inf and %d impossible bar(s); derived %d amount(s)",
        source_name, total.rows_in, total.duplicates, total.missing, total.impossible, total.amount_derived,
    )
    if not clean:
        raise DataError(
            f"data source '{source_name}': no symbol has {window} clean rows (lookback_window + predict_window + 1) "
            f"after cleaning ({total.rows_in} rows in, {total.rows_in - total.rows_out} removed); "
            "check the data or lower lookback_window/predict_window"
        )
    splits, split_info = split_frames(clean, config)
    for split, info in split_info.items():
        logger.info("%s split: %d rows, %d symbols, %s .. %s", split, info["rows"], info["n_symbols"],
                    info["start"], info["end"])
    symbols = sorted(set().union(*(set(f["symbol"].unique()) for f in splits.values())))
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": source_name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "columns": list(SPLIT_COLUMNS),
        "feature_columns": list(VALUE_COLUMNS),
        "time_feature_columns": list(TIME_FEATURES),
        "window": window,
        "symbols": symbols,
        "splits": split_info,
        "skipped_symbols": dict(sorted(skipped_out.items())),
        "cleaning": dataclasses.asdict(total),
        "median_bar_seconds": _median_bar_seconds(clean),
        "source_info": dict(source_info or {}),
        "config": _redacted_config(config),
    }
    return splits, manifest


__all__ = [
    "BAR_TOLERANCE",
    "CleaningStats",
    "clean_kline_frame",
    "add_time_features",
    "parse_time_range",
    "split_frames",
    "process_frames",
]
