"""Cleaning, derived fields, calendar features and train/val/test splits, shared by every data source.

``process_frames`` takes the per-symbol raw frames a source loaded (see :mod:`kronos.data.schema`) and returns
the three split frames plus the dataset manifest that :func:`kronos.data.store.save_dataset` writes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kronos import io as kio
from kronos.config import Config
from kronos.data.schema import (
    KLINE_COLUMNS,
    SPLIT_COLUMNS,
    TIME_FEATURES,
    VALUE_COLUMNS,
    derive_amount,
    time_features,
)
from kronos.data.store import FORMAT_VERSION, MANIFEST_NAME, SPLITS, load_manifest, part_name, split_parts, write_part
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


def _ratio_cuts_from_counts(times: np.ndarray, counts: np.ndarray, ratios: list[float]) -> tuple[Any, ...]:
    """Global cut dates ``(train_last, val_last)`` of a ratio split, shared by every symbol.

    All symbols' bars are pooled and sorted by time (here: the sorted distinct times and how many bars each has);
    the cuts sit at the bars that close the first ``ratios[0]`` and ``ratios[0] + ratios[1]`` of the pooled rows.
    ``None`` = nothing falls before that cut.
    """
    ends = np.cumsum(counts)
    n = int(ends[-1]) if len(ends) else 0
    cuts = []
    for share in (ratios[0], ratios[0] + ratios[1]):
        k = min(int(round(n * share)), n)
        cuts.append(pd.Timestamp(times[int(np.searchsorted(ends, k))]) if k > 0 else None)
    return tuple(cuts)


def _time_counts(frames: Mapping[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct bar times (int64 ns) of ``frames`` and how many bars each has."""
    if not frames:
        return np.zeros(0, "int64"), np.zeros(0, "int64")
    stamps = np.concatenate([f["timestamps"].to_numpy(dtype="datetime64[ns]").view("int64") for f in frames.values()])
    return np.unique(stamps, return_counts=True)


def _gap_counts(frames: Mapping[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct gaps (int64 ns) between consecutive bars of each frame and how often each occurs."""
    gaps = [np.diff(f["timestamps"].to_numpy(dtype="datetime64[ns]").view("int64")) for f in frames.values()]
    gaps = [g for g in gaps if len(g)]
    if not gaps:
        return np.zeros(0, "int64"), np.zeros(0, "int64")
    return np.unique(np.concatenate(gaps), return_counts=True)


def _add_counts(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The union of two (distinct values, counts) pairs, counts of equal values summed."""
    uniq, where = np.unique(np.concatenate([a[0], b[0]]).astype("int64"), return_inverse=True)
    counts = np.zeros(len(uniq), "int64")
    np.add.at(counts, where, np.concatenate([a[1], b[1]]).astype("int64"))
    return uniq, counts


def _median_from_counts(gaps: np.ndarray, counts: np.ndarray) -> float | None:
    """The median bar gap in seconds, as ``np.median`` of all gaps pooled (the mean of the two middle ones)."""
    n = int(counts.sum())
    if n == 0:
        return None
    seconds = pd.to_timedelta(gaps, unit="ns").total_seconds().to_numpy(dtype="float64")
    ends = np.cumsum(counts)
    lo = seconds[int(np.searchsorted(ends, (n - 1) // 2 + 1))]
    hi = seconds[int(np.searchsorted(ends, n // 2 + 1))]
    return float(np.median(np.array([lo, hi])))


def _window_count(n_rows: int, own_start: int, window: int, lookback: int) -> int:
    """Windows of a piece whose target rows (after the lookback) all lie at/after row ``own_start``."""
    lo = max(0, own_start - lookback)
    return max(0, n_rows - window - lo + 1)


@dataclass
class SplitPlan:
    """How each split picks its own bars: the ratio cut dates, or the configured time ranges."""

    selection: dict[str, dict[str, Any]]
    cuts: dict[str, pd.Timestamp | None] | None = None  # ratio split: the last own bar of each split
    bounds: dict[str, tuple[pd.Timestamp, pd.Timestamp, bool]] | None = None  # time ranges

    @classmethod
    def from_config(cls, config: Config, times: np.ndarray, counts: np.ndarray) -> SplitPlan:
        """The plan for ``config``; ``times``/``counts``: the distinct bar times of all symbols (ratio cuts)."""
        if config.split_ratios is not None:
            ratios = [float(r) for r in config.split_ratios]
            cuts = dict(zip(SPLITS, _ratio_cuts_from_counts(times, counts, ratios) + (None,)))
            return cls({s: {"ratio": r} for s, r in zip(SPLITS, ratios)}, cuts=cuts)
        bounds = {s: parse_time_range(getattr(config, f"{s}_time_range"), f"{s}_time_range") for s in SPLITS}
        return cls({s: {"time_range": list(getattr(config, f"{s}_time_range"))} for s in SPLITS}, bounds=bounds)

    def own(self, split: str, ts: pd.Series) -> np.ndarray:
        """Mask of the bars at times ``ts`` that ``split`` may own (before the previous split's bars are cut)."""
        if self.cuts is not None:
            if self.cuts["train"] is None and split == "train":
                return np.zeros(len(ts), bool)
            cut = self.cuts[split]
            return np.ones(len(ts), bool) if cut is None else (ts <= cut).to_numpy()
        assert self.bounds is not None
        return _time_mask(ts, self.bounds[split])

    def after(self, split: str, last: pd.Timestamp) -> pd.Timestamp:
        """The last bar of ``split`` that the next split must start after: the ratio cut date (the same for every
        symbol), or the last bar ``split`` holds (time ranges, which may overlap)."""
        if self.cuts is not None and self.cuts[split] is not None:
            return self.cuts[split]
        return last

    def known_afters(self) -> bool:
        """Whether every split's start is known before any split is made (ratio cuts), so one pass makes all."""
        return self.cuts is not None and all(self.cuts[s] is not None for s in SPLITS[:-1])


@dataclass
class SplitTally:
    """What one chunk of symbols adds to a split's manifest entry (merged over chunks and ranks in order)."""

    rows: int = 0
    target_rows: int = 0
    n_symbols: int = 0
    first: pd.Timestamp | None = None  # first own bar
    last: pd.Timestamp | None = None
    history_from: pd.Timestamp | None = None
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)

    def merge(self, other: SplitTally) -> SplitTally:
        def pick(a, b, fn):
            return b if a is None else a if b is None else fn(a, b)

        return SplitTally(
            self.rows + other.rows,
            self.target_rows + other.target_rows,
            self.n_symbols + other.n_symbols,
            pick(self.first, other.first, min),
            pick(self.last, other.last, max),
            pick(self.history_from, other.history_from, min),
            {**self.dropped, **other.dropped},
        )

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("first", "last", "history_from"):
            out[key] = None if out[key] is None else out[key].isoformat()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SplitTally:
        stamps = {k: None if data[k] is None else pd.Timestamp(data[k]) for k in ("first", "last", "history_from")}
        return cls(
            int(data["rows"]), int(data["target_rows"]), int(data["n_symbols"]), **stamps, dropped=dict(data["dropped"])
        )


def split_chunk(
    frames: Mapping[str, pd.DataFrame], split: str, plan: SplitPlan, after: pd.Timestamp | None, config: Config
) -> tuple[pd.DataFrame | None, SplitTally]:
    """The part of ``split`` that the clean frames of one chunk of symbols give (None: no symbol has a window in
    it) and its tally; ``after``: the previous split's last bar (this split owns only later bars)."""
    window, lookback = config.window, config.lookback_window
    tally = SplitTally()
    pieces: list[pd.DataFrame] = []
    for symbol in sorted(frames):
        frame = frames[symbol]
        ts = frame["timestamps"]
        mask = plan.own(split, ts)
        if after is not None:
            mask = mask & (ts > after).to_numpy()
        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            continue
        start, stop = int(rows[0]), int(rows[-1]) + 1  # own rows are contiguous (one time interval)
        begin = start if split == "train" else max(start - lookback, 0)
        piece = frame.iloc[begin:stop]
        if _window_count(len(piece), start - begin, window, lookback) < 1:
            tally.dropped[symbol] = (
                f"{stop - start} rows in the split (+{start - begin} history), fewer than one window of "
                f"{window} whose {config.predict_window + 1} target bars lie in the split"
            )
            continue
        piece = piece.reset_index(drop=True)
        piece.insert(0, "symbol", symbol)
        pieces.append(piece)
        first = ts.iloc[start]
        hist, last = piece["timestamps"].iloc[0], piece["timestamps"].iloc[-1]
        tally = tally.merge(SplitTally(len(piece), stop - start, 1, first, last, hist))
    if not pieces:
        return None, tally
    part = pd.concat(pieces, ignore_index=True)
    part["symbol"] = part["symbol"].astype(str)
    return part[list(SPLIT_COLUMNS)], tally


def split_info(
    split: str,
    tally: SplitTally,
    plan: SplitPlan,
    config: Config,
    after: pd.Timestamp | None,
    span: tuple[pd.Timestamp | None, pd.Timestamp | None],
) -> dict[str, Any]:
    """The manifest entry of ``split`` from its merged tally; DataError when the split is empty."""
    if tally.n_symbols == 0 or tally.first is None or tally.last is None or tally.history_from is None:
        window = config.window
        if config.split_ratios is not None:
            how = f"split_ratios {config.split_ratios}"
            fix = "raise its share in 'split_ratios'"
        else:
            how = f"{split}_time_range {getattr(config, f'{split}_time_range')}"
            if after is not None:
                how += f" after the previous split's last bar {after}"
            fix = f"change config key '{split}_time_range'"
        coverage = f"the data covers {span[0]} .. {span[1]}" if span[0] is not None else "no data"
        raise DataError(
            f"split '{split}' is empty: no symbol has {window} rows (lookback_window + predict_window + 1) "
            f"in {how}; {coverage}; {fix} or lower lookback_window/predict_window"
        )
    return {
        **plan.selection[split],
        "first": tally.first.isoformat(),
        "last": tally.last.isoformat(),
        "rows": int(tally.rows),
        "target_rows": int(tally.target_rows),
        "history_from": tally.history_from.isoformat(),
        "n_symbols": int(tally.n_symbols),
        "dropped_symbols": tally.dropped,
    }


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
    The streaming data step (:func:`stream_dataset`) makes the same splits a chunk of symbols at a time.
    """
    plan = SplitPlan.from_config(config, *_time_counts(frames))
    starts = [f["timestamps"].iloc[0] for f in frames.values() if len(f)]
    ends = [f["timestamps"].iloc[-1] for f in frames.values() if len(f)]
    span = (min(starts, default=None), max(ends, default=None))
    info: dict[str, dict[str, Any]] = {}
    splits: dict[str, pd.DataFrame] = {}
    after: pd.Timestamp | None = None  # last bar of the previous split: this split owns only later bars
    for split in SPLITS:
        part, tally = split_chunk(frames, split, plan, after, config)
        info[split] = split_info(split, tally, plan, config, after, span)
        assert part is not None and tally.last is not None
        splits[split] = part
        after = plan.after(split, tally.last)
    return splits, info


def _median_bar_seconds(frames: Mapping[str, pd.DataFrame]) -> float | None:
    return _median_from_counts(*_gap_counts(frames))


def clean_chunk(
    raw: Mapping[str, pd.DataFrame], config: Config, source_name: str, progress: bool = True
) -> tuple[dict[str, pd.DataFrame], CleaningStats, dict[str, str]]:
    """Clean the raw frames of some symbols and add calendar features; returns the clean frames of the symbols
    with at least one window of rows, the summed cleaning counts, and the symbols left out (with reasons)."""
    window = config.window
    total = CleaningStats()
    clean: dict[str, pd.DataFrame] = {}
    skipped: dict[str, str] = {}
    symbols = sorted(raw, key=str)
    for symbol in tqdm(symbols, desc=f"cleaning {source_name}", unit="symbol", disable=None if progress else True):
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
            skipped[str(symbol)] = reason
            logger.warning("skipping symbol %s: %s", symbol, reason)
            continue
        clean[str(symbol)] = add_time_features(frame)
    return clean, total, skipped


def _log_cleaning(source_name: str, total: CleaningStats) -> None:
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


def _no_clean_symbol(source_name: str, config: Config, total: CleaningStats) -> DataError:
    return DataError(
        f"data source '{source_name}': no symbol has {config.window} clean rows (lookback_window + predict_window + "
        f"1) after cleaning ({total.rows_in} rows in, {total.rows_in - total.rows_out} removed); "
        "check the data or lower lookback_window/predict_window"
    )


def build_manifest(
    config: Config,
    source_name: str,
    split_info: Mapping[str, dict[str, Any]],
    symbols: list[str],
    skipped: Mapping[str, str],
    total: CleaningStats,
    median_bar_seconds: float | None,
    source_info: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The dataset manifest (see :mod:`kronos.data.store`); logs one line per split."""
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
    return {
        "format_version": FORMAT_VERSION,
        "source": source_name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "columns": list(SPLIT_COLUMNS),
        "feature_columns": list(VALUE_COLUMNS),
        "time_feature_columns": list(TIME_FEATURES),
        "window": config.window,
        "symbols": sorted(symbols),
        "splits": dict(split_info),
        "skipped_symbols": dict(sorted(skipped.items())),
        "cleaning": dataclasses.asdict(total),
        "median_bar_seconds": median_bar_seconds,
        "source_info": dict(source_info or {}),
        "config": config.to_dict(redact=True),
    }


def process_frames(
    raw: Mapping[str, pd.DataFrame],
    config: Config,
    source_name: str,
    *,
    skipped: Mapping[str, str] | None = None,
    source_info: Mapping[str, Any] | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Clean every symbol, add calendar features, split; returns ``(splits, manifest)`` (all in memory at once;
    :func:`stream_dataset` makes the same dataset a chunk of symbols at a time).

    ``skipped`` lists symbols the source already left out (with reasons); symbols with fewer clean rows than
    one window are added to it. ``source_info`` is stored in the manifest as is (JSON-serialisable values).
    """
    if not raw:
        raise DataError(f"data source '{source_name}' returned no symbols; check its config keys")
    clean, total, short = clean_chunk(raw, config, source_name)
    _log_cleaning(source_name, total)
    if not clean:
        raise _no_clean_symbol(source_name, config, total)
    splits, info = split_frames(clean, config)
    symbols = sorted(set().union(*(set(f["symbol"].unique()) for f in splits.values())))
    manifest = build_manifest(
        config, source_name, info, symbols, {**(skipped or {}), **short}, total, _median_bar_seconds(clean), source_info
    )
    return splits, manifest


# ---------------------------------------------------------------------------------------------- streaming
class ChunkSource(Protocol):
    """What :func:`stream_dataset` needs of a data source (:class:`~kronos.data.sources.BaseDataProcessor`)."""

    name: str
    streams: bool
    skipped_symbols: dict[str, str]
    source_info: dict[str, Any]

    def download_data(self) -> None: ...

    def list_symbols(self) -> list[str]: ...

    def load_symbols(self, symbols: list[str]) -> dict[str, pd.DataFrame]: ...


def _same(action: Callable[[], str]) -> str:
    return action()


def _alone(ok: bool) -> bool:
    return ok


@dataclass
class Shard:
    """This process among the ranks of one data step (a plain process: rank 0 of 1).

    ``share(action)`` runs ``action`` on rank 0 and gives every rank its text (or rank 0's error);
    ``agree(ok)`` is a barrier of every rank that returns True when every rank passed True. Under torchrun the
    pipeline builds them on the process group (:func:`kronos.train.distributed.data_shard`).
    """

    rank: int = 0
    world_size: int = 1
    share: Callable[[Callable[[], str]], str] = _same
    agree: Callable[[bool], bool] = _alone


def _together(shard: Shard, what: str, action: Callable[[], Any]) -> Any:
    """``action()`` on every rank, then a barrier; every rank raises when one of them failed."""
    try:
        result = action()
    except BaseException:
        shard.agree(False)
        raise
    if not shard.agree(True):
        raise DataError(f"the data step failed on another rank while {what}; see that rank's error")
    return result


SPOOL = "spool"
STATS = "stats"


def _staging_folder(target: Path) -> Path:
    """A new folder beside ``target`` for the parts of every rank: ``.<name>-parts.tmp-<host>-<pid>-<token>``.
    Such folders of killed data steps on this host (their process is gone) are removed first."""
    if target.exists() and not target.is_dir():
        raise DataError(f"dataset path '{target}' is a file; set config key 'dataset_path' to a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")[:40] or "host"
    for stale in target.parent.glob(f".{target.name}-parts.tmp-{host}-*"):
        pid = stale.name[len(f".{target.name}-parts.tmp-{host}-") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, left by a killed data step", stale)
            shutil.rmtree(stale, ignore_errors=True)
    folder = target.with_name(f".{target.name}-parts.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    folder.mkdir()
    (folder / SPOOL).mkdir()
    (folder / STATS).mkdir()
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _chunk_plan(shard: Shard, source: ChunkSource, size: int) -> tuple[list[list[str]], list[int]]:
    """Every chunk of symbols (in symbol order) and the indexes of those this rank loads. A source that cannot
    read a chunk at a time (``streams`` False) is loaded by rank 0 alone."""
    if not source.streams and shard.rank != 0:
        return [], []
    symbols = sorted(source.list_symbols(), key=str)
    chunks = [symbols[i : i + size] for i in range(0, len(symbols), size)]
    if not source.streams:
        return chunks, list(range(len(chunks)))
    return chunks, [i for i in range(len(chunks)) if i % shard.world_size == shard.rank]


def _first_pass(
    shard: Shard, source: ChunkSource, config: Config, staging: Path, chunks: list[list[str]], mine: list[int]
) -> None:
    """Load, clean and spool this rank's chunks; write what the cut dates and the manifest need to ``stats/``."""
    total = CleaningStats()
    skipped: dict[str, str] = {}
    loaded = 0
    times = gaps = (np.zeros(0, "int64"), np.zeros(0, "int64"))
    spooled: list[int] = []
    for index in tqdm(mine, desc=f"loading {source.name}", unit="chunk", disable=None if len(mine) > 1 else True):
        raw = source.load_symbols(chunks[index])
        loaded += len(raw)
        clean, stats, short = clean_chunk(raw, config, source.name, progress=False)
        del raw
        total = total + stats
        skipped.update(short)
        if not clean:
            continue
        times = _add_counts(times, _time_counts(clean))
        gaps = _add_counts(gaps, _gap_counts(clean))
        long = pd.concat([f.assign(symbol=sym) for sym, f in sorted(clean.items())], ignore_index=True)
        long.to_parquet(staging / SPOOL / part_name(index), index=False, engine="pyarrow")
        spooled.append(index)
    skipped.update(source.skipped_symbols)
    stats_dir = staging / STATS
    pd.DataFrame({"value": times[0], "count": times[1]}).to_parquet(stats_dir / f"times-{shard.rank}.parquet")
    pd.DataFrame({"value": gaps[0], "count": gaps[1]}).to_parquet(stats_dir / f"gaps-{shard.rank}.parquet")
    summary = {"loaded": loaded, "cleaning": dataclasses.asdict(total), "skipped": skipped, "spooled": spooled}
    (stats_dir / f"rank-{shard.rank}.json").write_text(kio.dumps_json(summary), encoding="utf-8")


def _read_counts(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    acc = (np.zeros(0, "int64"), np.zeros(0, "int64"))
    for file in files:
        frame = pd.read_parquet(file)
        acc = _add_counts(acc, (frame["value"].to_numpy("int64"), frame["count"].to_numpy("int64")))
    return acc


def _spooled_chunk(staging: Path, index: int) -> dict[str, pd.DataFrame]:
    long = pd.read_parquet(staging / SPOOL / part_name(index), engine="pyarrow")
    symbols = long.pop("symbol").astype(str).to_numpy()
    bounds = np.flatnonzero(symbols[1:] != symbols[:-1]) + 1
    starts, stops = np.r_[0, bounds], np.r_[bounds, len(long)]
    return {str(symbols[a]): long.iloc[a:b].reset_index(drop=True) for a, b in zip(starts, stops)}


def _split_pass(
    shard: Shard,
    staging: Path,
    config: Config,
    plan: SplitPlan,
    splits: tuple[str, ...],
    afters: dict[str, pd.Timestamp | None],
    chunks: list[int],
) -> None:
    """Write this rank's parts of ``splits`` (from its share of the spooled chunks) and their tallies."""
    tallies = {s: SplitTally() for s in splits}
    for index in chunks:
        frames = _spooled_chunk(staging, index)
        for split in splits:
            part, tally = split_chunk(frames, split, plan, afters[split], config)
            tallies[split] = tallies[split].merge(tally)
            if part is not None:
                write_part(staging, split, index, part)
    for split, tally in tallies.items():
        (staging / STATS / f"{split}-{shard.rank}.json").write_text(kio.dumps_json(tally.to_json()), encoding="utf-8")


def stream_dataset(
    source: ChunkSource, config: Config, shard: Shard | None = None, chunk_symbols: int | None = None
) -> dict[str, Any]:
    """Load, clean, split and save ``source``'s data to ``config.dataset_path`` a chunk of symbols at a time.

    Peak memory follows ``chunk_symbols`` (default: config key ``data_chunk_symbols``), not the market: the first
    pass loads and cleans one chunk at a time and spools it (Parquet) beside the dataset, counting the bars per
    time for the global cut dates; then each split is written as one part file per chunk. The dataset (rows, cut
    dates, manifest) is the one :func:`process_frames` + :func:`~kronos.data.store.save_dataset` make. Under
    torchrun (``shard``) every rank does its share of the chunks and rank 0 writes the manifest and swaps the
    folder into place once every part is written. Returns the manifest.
    """
    shard = shard or Shard()
    size = int(chunk_symbols or config.data_chunk_symbols)
    given = Path(config.dataset_path).expanduser()
    target = given.parent.resolve() / given.name  # not the folder itself: it may be a link to its current version
    staging = Path(shard.share(lambda: str(_staging_folder(target))))
    try:
        manifest = _stream(shard, source, config, staging, size, target)
    finally:
        if shard.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _stream(shard: Shard, source: ChunkSource, config: Config, staging: Path, size: int, target: Path) -> dict:
    name = source.name
    if shard.rank == 0:
        _together(shard, "downloading the data", source.download_data)
    else:
        _together(shard, "downloading the data", lambda: None)
    chunks, mine = _together(shard, "listing the symbols", lambda: _chunk_plan(shard, source, size))
    _together(shard, "loading and cleaning", lambda: _first_pass(shard, source, config, staging, chunks, mine))

    stats_dir = staging / STATS
    summaries = [kio.read_json(stats_dir / f"rank-{r}.json") for r in range(shard.world_size)]
    total = CleaningStats()
    skipped: dict[str, str] = {}
    spooled: list[int] = []
    for summary in summaries:
        total = total + CleaningStats(**summary["cleaning"])
        skipped.update(summary["skipped"])
        spooled += summary["spooled"]
    spooled.sort()
    if not sum(int(s["loaded"]) for s in summaries):
        raise DataError(f"data source '{name}' returned no symbols; check its config keys")
    if shard.rank == 0:
        _log_cleaning(name, total)
    if not spooled:
        raise _no_clean_symbol(name, config, total)
    times = _read_counts(sorted(stats_dir.glob("times-*.parquet")))
    gaps = _read_counts(sorted(stats_dir.glob("gaps-*.parquet")))
    span = (pd.Timestamp(times[0][0]), pd.Timestamp(times[0][-1]))
    plan = SplitPlan.from_config(config, *times)
    my_spool = [i for n, i in enumerate(spooled) if n % shard.world_size == shard.rank]

    groups = [SPLITS] if plan.known_afters() else [(s,) for s in SPLITS]
    info: dict[str, dict[str, Any]] = {}
    after: pd.Timestamp | None = None
    for group in groups:
        afters: dict[str, pd.Timestamp | None] = {group[0]: after}
        if len(group) > 1 and plan.cuts is not None:  # ratio cuts: every split's start is known, one pass
            afters = {"train": None, "val": plan.cuts["train"], "test": plan.cuts["val"]}
        _together(
            shard,
            "writing the splits",
            functools.partial(_split_pass, shard, staging, config, plan, group, afters, my_spool),
        )
        for split in group:
            tally = SplitTally()
            for r in range(shard.world_size):
                tally = tally.merge(SplitTally.from_json(kio.read_json(stats_dir / f"{split}-{r}.json")))
            tally.dropped = dict(sorted(tally.dropped.items()))
            info[split] = split_info(split, tally, plan, config, afters[split], span)
            assert tally.last is not None
            after = plan.after(split, tally.last)

    def finish() -> str:
        if shard.rank != 0:
            return ""
        symbols: set[str] = set()
        for split in SPLITS:
            for part in split_parts(staging / f"{split}.parquet"):
                symbols.update(pd.read_parquet(part, columns=["symbol"])["symbol"].astype(str).unique())
        manifest = build_manifest(
            config, name, info, sorted(symbols), skipped, total, _median_from_counts(*gaps), source.source_info
        )

        def fill(folder: Path) -> None:
            for split in SPLITS:
                os.rename(staging / f"{split}.parquet", folder / f"{split}.parquet")
            (folder / MANIFEST_NAME).write_text(kio.dumps_json(manifest), encoding="utf-8")

        try:
            # entries of the old folder that are not dataset files (a raw-data cache, notes) move into the new one
            kio.write_folder(target, fill, keep_others=True)
        except OSError as exc:
            raise DataError(f"cannot write the dataset folder '{target}': {exc.strerror or exc}") from None
        logger.info("dataset written to %s (%s)", target, ", ".join(f"{s}: {info[s]['rows']} rows" for s in SPLITS))
        return ""

    _together(shard, "saving the dataset", finish)
    return load_manifest(target)


__all__ = [
    "BAR_TOLERANCE",
    "CleaningStats",
    "clean_kline_frame",
    "add_time_features",
    "parse_time_range",
    "split_frames",
    "process_frames",
    "clean_chunk",
    "build_manifest",
    "split_chunk",
    "split_info",
    "SplitPlan",
    "SplitTally",
    "Shard",
    "ChunkSource",
    "stream_dataset",
]
