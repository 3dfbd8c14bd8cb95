"""Cleaning, derived fields, calendar features and train/val/test splits, shared by every data source.

``process_frames`` takes the per-symbol raw frames a source loaded (see :mod:`kronos.data.schema`) and returns
the three split frames plus the dataset manifest that :func:`kronos.data.store.save_dataset` writes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
    spikes: int = 0  # prices far from the surrounding bars' median close (dropped or kept: price_spike_action)
    amount_derived: int = 0  # NaN amount filled with mean(OHLC) x volume
    rows_out: int = 0

    def __add__(self, other: CleaningStats) -> CleaningStats:
        return CleaningStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


SPIKE_WINDOW = 21  # bars around each bar whose median close is the reference of the spike check


def find_price_spikes(frame: pd.DataFrame, factor: float) -> np.ndarray:
    """Boolean mask of bars with an open/high/low/close above ``factor`` x (or below 1/``factor`` x) the median
    close of the :data:`SPIKE_WINDOW` bars centred on them (a robust bound: one wild bar cannot move the median)."""
    if factor <= 0 or len(frame) < 3:
        return np.zeros(len(frame), dtype=bool)
    log_close = np.log(frame["close"].to_numpy(dtype="float64"))
    ref = pd.Series(log_close).rolling(SPIKE_WINDOW, center=True, min_periods=1).median().to_numpy()
    prices = np.log(frame[["open", "high", "low", "close"]].to_numpy(dtype="float64"))
    return (np.abs(prices - ref[:, None]) > np.log(factor)).any(axis=1)


def clean_kline_frame(
    df: pd.DataFrame, symbol: str = "", spike_factor: float = 10.0, drop_spikes: bool = True
) -> tuple[pd.DataFrame, CleaningStats]:
    """Sort by time, drop duplicate timestamps (keep last), fill a missing amount, drop bad bars.

    Bad bars are rows with a NaN/inf value or an impossible price/volume (see :data:`BAR_TOLERANCE`). Price
    spikes (see :func:`find_price_spikes`; ``spike_factor`` 0 = off) are counted, logged with their first time,
    and dropped unless ``drop_spikes`` is False. Returns the clean frame (RangeIndex, canonical columns) and the
    counts of what was removed.
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
    spikes = find_price_spikes(frame, spike_factor)
    stats.spikes = int(spikes.sum())
    if stats.spikes:
        first = int(np.flatnonzero(spikes)[0])
        logger.warning(
            "%s: %d price spike(s) more than %gx away from the surrounding bars' median close, first at %s "
            "(close %r); %s (config keys price_spike_factor, price_spike_action)",
            symbol or "frame",
            stats.spikes,
            spike_factor,
            frame["timestamps"].iloc[first],
            float(frame["close"].iloc[first]),
            "dropped" if drop_spikes else "kept",
        )
        if drop_spikes:
            frame = frame[~spikes].reset_index(drop=True)
    stats.rows_out = len(frame)
    if stats.duplicates or stats.missing or stats.impossible:
        logger.debug(
            "%s: dropped %d duplicate, %d NaN/inf and %d impossible bar(s) of %d",
            symbol or "frame",
            stats.duplicates,
            stats.missing,
            stats.impossible,
            stats.rows_in,
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


def _ratio_cuts(frames: Mapping[str, pd.DataFrame], ratios: list[float]) -> tuple[pd.Timestamp | None, ...]:
    """Global cut dates ``(train_last, val_last)`` of a ratio split, shared by every symbol.

    All symbols' bars are pooled and sorted by time; the cuts sit at the bars that close the first ``ratios[0]``
    and ``ratios[0] + ratios[1]`` of the pooled rows. ``None`` = nothing falls before that cut.
    """
    pooled = np.sort(np.concatenate([f["timestamps"].to_numpy(dtype="datetime64[ns]") for f in frames.values()]))
    n = len(pooled)
    cuts = []
    for share in (ratios[0], ratios[0] + ratios[1]):
        k = min(int(round(n * share)), n)
        cuts.append(pd.Timestamp(pooled[k - 1]) if k > 0 else None)
    return tuple(cuts)


def _window_count(n_rows: int, own_start: int, window: int, lookback: int) -> int:
    """Windows of a piece whose target rows (after the lookback) all lie at/after row ``own_start``."""
    lo = max(0, own_start - lookback)
    return max(0, n_rows - window - lo + 1)


def split_frames(
    frames: Mapping[str, pd.DataFrame], config: Config
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, Any]]]:
    """Split clean per-symbol frames into the long train/val/test frames, without leaks between splits.

    Each split owns the bars after the previous split's last bar (global calendar dates, shared by all symbols):

    * ``split_ratios``: the cut dates are where the pooled bars of all symbols reach the ratios (one date per
      cut for every symbol, so one stock's training bars never cover another's test dates);
    * ``train/val/test_time_range`` (inclusive; they may overlap, as in the official config): the val split owns
      its range's bars after the last training bar, the test split its range's bars after the last val bar.

    The val and test frames also hold the ``lookback_window`` bars before their first own bar as history, so
    their first window has context; :class:`~kronos.data.windows.WindowDataset` only samples windows whose
    target bars (those after the lookback) lie in the split's own ``first .. last`` dates, which the returned
    info (and the manifest) records. A symbol with no such window in a split is left out of it.
    Returns the split frames and per-split info for the manifest; an empty split raises DataError.
    """
    window = config.window
    lookback = config.lookback_window
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    dropped: dict[str, dict[str, str]] = {s: {} for s in SPLITS}
    if config.split_ratios is not None:
        ratios = [float(r) for r in config.split_ratios]
        selection: dict[str, Any] = {s: {"ratio": r} for s, r in zip(SPLITS, ratios)}
        cuts = dict(zip(SPLITS, _ratio_cuts(frames, ratios) + (None,)))  # last own bar of each split
        own: dict[str, Callable[..., np.ndarray]] = {
            s: (lambda ts, c=cuts[s]: np.ones(len(ts), bool) if c is None else (ts <= c).to_numpy()) for s in SPLITS
        }
        if cuts["train"] is None:
            own["train"] = lambda ts: np.zeros(len(ts), bool)
    else:
        bounds = {s: parse_time_range(getattr(config, f"{s}_time_range"), f"{s}_time_range") for s in SPLITS}
        selection = {s: {"time_range": list(getattr(config, f"{s}_time_range"))} for s in SPLITS}
        own = {s: (lambda ts, b=bounds[s]: _time_mask(ts, b)) for s in SPLITS}

    info: dict[str, dict[str, Any]] = {}
    splits: dict[str, pd.DataFrame] = {}
    data_start = min((f["timestamps"].iloc[0] for f in frames.values() if len(f)), default=None)
    data_end = max((f["timestamps"].iloc[-1] for f in frames.values() if len(f)), default=None)
    after: pd.Timestamp | None = None  # last bar of the previous split: this split owns only later bars
    for split in SPLITS:
        first_own: list[pd.Timestamp] = []
        target_rows = 0
        for symbol in sorted(frames):
            frame = frames[symbol]
            ts = frame["timestamps"]
            mask = own[split](ts)
            if after is not None:
                mask = mask & (ts > after).to_numpy()
            rows = np.flatnonzero(mask)
            if len(rows) == 0:
                continue
            start, stop = int(rows[0]), int(rows[-1]) + 1  # own rows are contiguous (one time interval)
            begin = start if split == "train" else max(start - lookback, 0)
            piece = frame.iloc[begin:stop]
            if _window_count(len(piece), start - begin, window, lookback) < 1:
                dropped[split][symbol] = (
                    f"{stop - start} rows in the split (+{start - begin} history), fewer than one window of "
                    f"{window} whose {config.predict_window + 1} target bars lie in the split"
                )
                continue
            piece = piece.reset_index(drop=True)
            piece.insert(0, "symbol", symbol)
            parts[split].append(piece)
            first_own.append(ts.iloc[start])
            target_rows += stop - start

        if not parts[split]:
            if config.split_ratios is not None:
                how = f"split_ratios {config.split_ratios}"
                fix = "raise its share in 'split_ratios'"
            else:
                how = f"{split}_time_range {getattr(config, f'{split}_time_range')}"
                if after is not None:
                    how += f" after the previous split's last bar {after}"
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
        first = min(first_own)
        last = frame["timestamps"].max()
        info[split] = {
            **selection[split],
            "first": first.isoformat(),
            "last": last.isoformat(),
            "rows": int(len(frame)),
            "target_rows": int(target_rows),
            "history_from": frame["timestamps"].min().isoformat(),
            "n_symbols": int(frame["symbol"].nunique()),
            "dropped_symbols": dropped[split],
        }
        # The next split owns only later bars: after the ratio cut date (the same for every symbol), or after the
        # last bar this split holds (time ranges, which may overlap).
        after = cuts[split] if config.split_ratios is not None and cuts[split] is not None else last
    return splits, info


def _median_bar_seconds(frames: Mapping[str, pd.DataFrame]) -> float | None:
    gaps = [f["timestamps"].diff().dropna().dt.total_seconds().to_numpy() for f in frames.values() if len(f) > 1]
    gaps = [g for g in gaps if len(g)]
    return float(np.median(np.concatenate(gaps))) if gaps else None


def process_frames(
    raw: Mapping[str, pd.DataFrame],
    config: Config,
    source_name: str,
    *,
    skipped: Mapping[str, str] | None = None,
    source_info: Mapping[str, Any] | None = None,
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
        frame, stats = clean_kline_frame(
            raw[symbol],
            str(symbol),
            spike_factor=config.price_spike_factor,
            drop_spikes=config.price_spike_action == "drop",
        )
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
        "%s: %d rows in, dropped %d duplicate, %d NaN/inf and %d impossible bar(s); %d price spike(s)%s",
        source_name,
        total.rows_in,
        total.duplicates,
        total.missing,
        total.impossible,
        total.spikes,
        f"; derived {total.amount_derived} missing amount(s)" if total.amount_derived else "",
    )
    if not clean:
        raise DataError(
            f"data source '{source_name}': no symbol has {window} clean rows (lookback_window + predict_window + 1) "
            f"after cleaning ({total.rows_in} rows in, {total.rows_in - total.rows_out} removed); "
            "check the data or lower lookback_window/predict_window"
        )
    splits, split_info = split_frames(clean, config)
    for split, info in split_info.items():
        logger.info(
            "%s split: %d symbols, target bars %s .. %s (%d rows, %d of them history)",
            split,
            info["n_symbols"],
            info["first"],
            info["last"],
            info["rows"],
            info["rows"] - info["target_rows"],
        )
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
        "config": config.to_dict(redact=True),
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
