"""Cleaning, derived fields, calendar features and train/val/test splits, shared by every data source.

``process_frames`` takes the per-symbol raw frames a source loaded (see :mod:`kronos.data.schema`) and returns
the three split frames plus the dataset manifest that :func:`kronos.data.store.save_dataset` writes;
:func:`stream_dataset` writes the same dataset a chunk of symbols at a time. Both work on :class:`Bars` (the bars of
many symbols in flat NumPy arrays): cleaning (:func:`clean_bars`), calendar features and splits
(:func:`split_bars`) run over all the symbols at once, not symbol by symbol; :func:`clean_kline_frame` and
:func:`split_frames` are the same code for frames.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
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
    check_split_frame,
    derive_amount_values,
    time_features,
)
from kronos.data.store import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    load_manifest,
    split_table,
    write_table_part,
)
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
NAT = np.iinfo("int64").min  # NaT as int64 nanoseconds
_STAT_FIELDS = tuple(f.name for f in dataclasses.fields(CleaningStats))


@dataclass(eq=False)
class Bars(Mapping):
    """Bars of several symbols in flat arrays (the data step's working form: no frame per symbol).

    Symbol ``symbols[i]`` owns rows ``offsets[i]:offsets[i + 1]`` of ``times`` (int64 nanoseconds, tz-naive) and
    ``data`` (float64, one column per :data:`~kronos.data.schema.VALUE_COLUMNS`). Raw bars (a source's) may hold
    NaT/NaN, duplicates and unsorted times; clean bars (:func:`clean_bars`) are sorted by time within a symbol,
    symbols by name.
    """

    symbols: list[str]
    offsets: np.ndarray
    times: np.ndarray
    data: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_rows(self) -> int:
        return len(self.times)

    # a Mapping of {symbol: raw frame}, like the dict a source's load_symbols returns
    def __len__(self) -> int:
        return len(self.symbols)

    def __iter__(self) -> Iterator[str]:
        return iter(self.symbols)

    def __getitem__(self, symbol: str) -> pd.DataFrame:
        if symbol not in self.symbols:
            raise KeyError(symbol)
        return self.frame(self.symbols.index(symbol))

    def segments(self) -> np.ndarray:
        """The symbol index of every row."""
        return np.repeat(np.arange(len(self.symbols), dtype="int64"), self.lengths)

    @classmethod
    def empty(cls) -> Bars:
        return cls([], np.zeros(1, "int64"), np.zeros(0, "int64"), np.zeros((0, len(VALUE_COLUMNS)), "float64"))

    @classmethod
    def from_frames(cls, frames: Mapping[Any, pd.DataFrame]) -> Bars:
        """The bars of ``{symbol: raw frame}`` (canonical columns, see :mod:`kronos.data.schema`), symbols sorted."""
        keys = sorted(frames, key=str)
        if not keys:
            return cls.empty()
        times = [frames[k]["timestamps"].to_numpy(dtype="datetime64[ns]").view("int64") for k in keys]
        values = [frames[k][list(VALUE_COLUMNS)].to_numpy(dtype="float64") for k in keys]
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in times])]).astype("int64")
        return cls([str(k) for k in keys], offsets, np.concatenate(times), np.concatenate(values))

    @classmethod
    def from_segments(cls, symbols: list[str], seg: np.ndarray, times: np.ndarray, values: np.ndarray) -> Bars:
        """Bars from rows grouped by symbol index ``seg`` (non-decreasing); symbols without rows are dropped."""
        counts = np.bincount(seg, minlength=len(symbols)) if len(seg) else np.zeros(len(symbols), "int64")
        keep = np.flatnonzero(counts)
        offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype("int64")
        return cls([symbols[i] for i in keep], offsets, times, values)

    def select(self, keep: np.ndarray) -> Bars:
        """The bars of the symbols where the boolean ``keep`` (one per symbol) is True."""
        if keep.all():
            return self
        rows = np.repeat(keep, self.lengths)
        lengths = self.lengths[keep]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("int64")
        return Bars([s for s, k in zip(self.symbols, keep) if k], offsets, self.times[rows], self.data[rows])

    def frame(self, i: int, features: pd.DataFrame | None = None) -> pd.DataFrame:
        """Symbol ``i``'s bars as a raw frame (plus the rows of ``features``, calendar features of all rows)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        cols: dict[str, Any] = {"timestamps": self.times[a:b].view("datetime64[ns]")}
        cols.update({c: self.data[a:b, j] for j, c in enumerate(VALUE_COLUMNS)})
        if features is not None:
            cols.update({c: features[c].to_numpy()[a:b] for c in TIME_FEATURES})
        return pd.DataFrame(cols)

    def frames(self, with_features: bool = False) -> dict[str, pd.DataFrame]:
        """``{symbol: frame}`` (raw frames, or with the calendar features: what the splits are made of)."""
        features = time_features(self.times.view("datetime64[ns]")) if with_features else None
        return {s: self.frame(i, features) for i, s in enumerate(self.symbols)}

    def long_frame(self) -> pd.DataFrame:
        """The long split frame (:data:`~kronos.data.schema.SPLIT_COLUMNS`) of these (clean) bars."""
        cols: dict[str, Any] = {
            "symbol": np.repeat(np.array(self.symbols, dtype=object), self.lengths),
            "timestamps": self.times.view("datetime64[ns]"),
        }
        cols.update({c: self.data[:, j] for j, c in enumerate(VALUE_COLUMNS)})
        features = time_features(self.times.view("datetime64[ns]"))
        cols.update({c: features[c].to_numpy() for c in TIME_FEATURES})
        return check_split_frame(pd.DataFrame(cols), "split")


def _bincount(seg: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(seg[mask], minlength=n) if mask.any() else np.zeros(n, "int64")


def find_price_spikes(frame: pd.DataFrame, factor: float) -> np.ndarray:
    """Boolean mask of bars with an open/high/low/close above ``factor`` x (or below 1/``factor`` x) the median
    close of the :data:`SPIKE_WINDOW` bars centred on them (a robust bound: one wild bar cannot move the median)."""
    prices = frame[["open", "high", "low", "close"]].to_numpy(dtype="float64")
    return _spikes(prices, np.zeros(len(frame), "int64"), factor)


def _spikes(prices: np.ndarray, seg: np.ndarray, factor: float) -> np.ndarray:
    """:func:`find_price_spikes` of every symbol at once (``seg``: non-decreasing symbol index of each row)."""
    n_rows = len(prices)
    if factor <= 0 or n_rows == 0:
        return np.zeros(n_rows, dtype=bool)
    log_prices = np.log(prices)
    # Each symbol's rows in one series, symbols apart by half a window of NaN (which the rolling median skips):
    # every window sees its own symbol's bars only, as if each symbol were run alone.
    half = SPIKE_WINDOW // 2
    where = np.arange(n_rows, dtype="int64") + seg * half
    padded = np.full(int(where[-1]) + 1, np.nan)
    padded[where] = log_prices[:, 3]
    ref = pd.Series(padded).rolling(SPIKE_WINDOW, center=True, min_periods=1).median().to_numpy()[where]
    spikes = (np.abs(log_prices - ref[:, None]) > np.log(factor)).any(axis=1)
    counts = np.bincount(seg)
    spikes &= (counts >= 3)[seg]  # too few bars for a reference
    return spikes


def clean_bars(raw: Bars, spike_factor: float = 10.0, drop_spikes: bool = True) -> tuple[Bars, np.ndarray]:
    """:func:`clean_kline_frame` for every symbol of ``raw`` at once; returns the clean bars (symbols without a
    clean row left out) and the counts of each symbol (one row per symbol of ``raw``, the fields of
    :class:`CleaningStats` in order)."""
    n = len(raw.symbols)
    col = {f: i for i, f in enumerate(_STAT_FIELDS)}
    counts = np.zeros((n, len(_STAT_FIELDS)), "int64")
    counts[:, col["rows_in"]] = raw.lengths
    seg, t, v = raw.segments(), raw.times, raw.data
    ok = t != NAT
    if not ok.all():
        counts[:, col["missing"]] += _bincount(seg, ~ok, n)
        seg, t, v = seg[ok], t[ok], v[ok]
    if len(t) > 1:
        same = seg[1:] == seg[:-1]
        if (t[1:][same] < t[:-1][same]).any():  # sort by time within each symbol, equal times in input order
            order = np.argsort(t, kind="stable")
            order = order[np.argsort(seg[order], kind="stable")]
            seg, t, v = seg[order], t[order], v[order]
        dup = np.zeros(len(t), bool)  # the same time again: the last one is kept
        dup[:-1] = (seg[1:] == seg[:-1]) & (t[1:] == t[:-1])
        if dup.any():
            counts[:, col["duplicates"]] = _bincount(seg, dup, n)
            seg, t, v = seg[~dup], t[~dup], v[~dup]

    fill = np.isnan(v[:, 5]) & ~np.isnan(v[:, :5]).any(axis=1)
    if fill.any():
        v = v.copy() if v is raw.data else v
        v[fill, 5] = derive_amount_values(v[fill, :4], v[fill, 4])
        counts[:, col["amount_derived"]] = _bincount(seg, fill, n)

    finite = np.isfinite(v).all(axis=1)
    o, h, lo, c, vol, a = (v[:, i] for i in range(6))
    with np.errstate(invalid="ignore"):
        top = np.maximum(o, c)
        bottom = np.minimum(o, c)
        impossible = (
            (v[:, :4] <= 0).any(axis=1)
            | (vol < 0)
            | (a < 0)
            | (h < lo * (1 - BAR_TOLERANCE))
            | (h < top * (1 - BAR_TOLERANCE))
            | (lo > bottom * (1 + BAR_TOLERANCE))
        )
    impossible &= finite
    counts[:, col["missing"]] += _bincount(seg, ~finite, n)
    counts[:, col["impossible"]] = _bincount(seg, impossible, n)
    keep = finite & ~impossible
    if not keep.all():
        seg, t, v = seg[keep], t[keep], v[keep]

    spikes = _spikes(v[:, :4], seg, spike_factor)
    if spikes.any():
        counts[:, col["spikes"]] = _bincount(seg, spikes, n)
        firsts = np.flatnonzero(spikes)
        firsts = firsts[np.r_[True, seg[firsts][1:] != seg[firsts][:-1]]]
        for row in firsts:
            sym = int(seg[row])
            logger.warning(
                "%s: %d price spike(s) more than %gx away from the surrounding bars' median close, first at %s "
                "(close %r); %s (config keys price_spike_factor, price_spike_action)",
                raw.symbols[sym] or "frame",
                counts[sym, col["spikes"]],
                spike_factor,
                pd.Timestamp(t[row]),
                float(v[row, 3]),
                "dropped" if drop_spikes else "kept",
            )
        if drop_spikes:
            seg, t, v = seg[~spikes], t[~spikes], v[~spikes]
    counts[:, col["rows_out"]] = np.bincount(seg, minlength=n) if len(seg) else np.zeros(n, "int64")
    if logger.isEnabledFor(logging.DEBUG):
        for i in np.flatnonzero(counts[:, [col["duplicates"], col["missing"], col["impossible"]]].any(axis=1)):
            logger.debug(
                "%s: dropped %d duplicate, %d NaN/inf and %d impossible bar(s) of %d",
                raw.symbols[i] or "frame",
                counts[i, col["duplicates"]],
                counts[i, col["missing"]],
                counts[i, col["impossible"]],
                counts[i, col["rows_in"]],
            )
    return Bars.from_segments(raw.symbols, seg, t, v), counts


def clean_kline_frame(
    df: pd.DataFrame, symbol: str = "", spike_factor: float = 10.0, drop_spikes: bool = True
) -> tuple[pd.DataFrame, CleaningStats]:
    """Sort by time, drop duplicate timestamps (keep last), fill a missing amount, drop bad bars.

    Bad bars are rows with a NaN/inf value or an impossible price/volume (see :data:`BAR_TOLERANCE`). Price
    spikes (see :func:`find_price_spikes`; ``spike_factor`` 0 = off) are counted, logged with their first time,
    and dropped unless ``drop_spikes`` is False. Returns the clean frame (RangeIndex, canonical columns) and the
    counts of what was removed. (:func:`clean_bars` cleans many symbols at once, the same way.)
    """
    raw = Bars.from_frames({symbol: df[list(KLINE_COLUMNS)]})
    clean, counts = clean_bars(raw, spike_factor, drop_spikes)
    stats = CleaningStats(*(int(x) for x in counts[0]))
    if not clean.symbols:
        return pd.DataFrame(
            {c: pd.Series(dtype="datetime64[ns]" if c == "timestamps" else "float64") for c in KLINE_COLUMNS}
        ), stats
    return clean.frame(0), stats


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


def _time_mask(times: np.ndarray, bounds: tuple[pd.Timestamp, pd.Timestamp, bool]) -> np.ndarray:
    """Mask of the bar times ``times`` (int64 ns) inside ``bounds`` (see :func:`parse_time_range`)."""
    start, end, whole_day = bounds
    if whole_day:
        return (times >= start.value) & (times < (end + pd.Timedelta(days=1)).value)
    return (times >= start.value) & (times <= end.value)


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


def _time_counts(bars: Bars) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct bar times (int64 ns) of ``bars`` and how many bars each has."""
    return np.unique(bars.times, return_counts=True)


def _gap_counts(bars: Bars) -> tuple[np.ndarray, np.ndarray]:
    """Distinct gaps (int64 ns) between consecutive bars of each symbol and how often each occurs."""
    if bars.n_rows < 2:
        return np.zeros(0, "int64"), np.zeros(0, "int64")
    inside = np.ones(bars.n_rows - 1, bool)
    inside[bars.offsets[1:-1] - 1] = False  # from one symbol's last bar to the next one's first
    return np.unique(np.diff(bars.times)[inside], return_counts=True)


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

    def own(self, split: str, times: np.ndarray) -> np.ndarray:
        """Mask of the bars at ``times`` (int64 ns) that ``split`` may own (before the previous split's bars are
        cut)."""
        if self.cuts is not None:
            if self.cuts["train"] is None and split == "train":
                return np.zeros(len(times), bool)
            cut = self.cuts[split]
            return np.ones(len(times), bool) if cut is None else times <= cut.value
        assert self.bounds is not None
        return _time_mask(times, self.bounds[split])

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


def split_bars(
    bars: Bars, split: str, plan: SplitPlan, after: pd.Timestamp | None, config: Config
) -> tuple[Bars | None, SplitTally]:
    """The part of ``split`` that the clean bars of some symbols give (None: no symbol has a window in it) and
    its tally; ``after``: the previous split's last bar (this split owns only later bars)."""
    window, lookback = config.window, config.lookback_window
    tally = SplitTally()
    times = bars.times
    mask = plan.own(split, times)
    if after is not None:
        mask &= times > after.value
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        return None, tally
    seg = bars.segments()[rows]  # the symbol of each own row
    change = seg[1:] != seg[:-1]
    firsts, lasts = np.r_[True, change], np.r_[change, True]
    symbols = seg[firsts]
    start, stop = rows[firsts], rows[lasts] + 1  # own rows are contiguous (one time interval)
    begin = start if split == "train" else np.maximum(start - lookback, bars.offsets[symbols])
    history = start - begin
    n_rows = stop - begin
    windows = n_rows - window - np.maximum(0, history - lookback) + 1  # windows whose targets lie at/after start
    ok = windows >= 1
    for i in np.flatnonzero(~ok):
        tally.dropped[bars.symbols[symbols[i]]] = (
            f"{stop[i] - start[i]} rows in the split (+{history[i]} history), fewer than one window of "
            f"{window} whose {config.predict_window + 1} target bars lie in the split"
        )
    if not ok.any():
        return None, tally
    symbols, start, stop, begin, n_rows = symbols[ok], start[ok], stop[ok], begin[ok], n_rows[ok]
    offsets = np.concatenate([[0], np.cumsum(n_rows)]).astype("int64")
    take = np.arange(int(offsets[-1]), dtype="int64") + np.repeat(begin - offsets[:-1], n_rows)
    tally.rows, tally.target_rows, tally.n_symbols = int(offsets[-1]), int((stop - start).sum()), len(symbols)
    tally.first, tally.last = pd.Timestamp(times[start].min()), pd.Timestamp(times[stop - 1].max())
    tally.history_from = pd.Timestamp(times[begin].min())
    part = Bars([bars.symbols[i] for i in symbols], offsets, times[take], bars.data[take])
    return part, tally


def split_chunk(
    frames: Mapping[str, pd.DataFrame], split: str, plan: SplitPlan, after: pd.Timestamp | None, config: Config
) -> tuple[pd.DataFrame | None, SplitTally]:
    """:func:`split_bars` of clean per-symbol frames, the part as a long split frame."""
    part, tally = split_bars(_as_bars(frames), split, plan, after, config)
    return (None if part is None else part.long_frame()), tally


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
    splits, info = _split_all(_as_bars(frames), config)
    return {s: part.long_frame() for s, part in splits.items()}, info


def _split_all(bars: Bars, config: Config) -> tuple[dict[str, Bars], dict[str, dict[str, Any]]]:
    plan = SplitPlan.from_config(config, *_time_counts(bars))
    firsts = bars.times[bars.offsets[:-1][bars.lengths > 0]]
    lasts = bars.times[bars.offsets[1:][bars.lengths > 0] - 1]
    span = (
        pd.Timestamp(firsts.min()) if len(firsts) else None,
        pd.Timestamp(lasts.max()) if len(lasts) else None,
    )
    info: dict[str, dict[str, Any]] = {}
    splits: dict[str, Bars] = {}
    after: pd.Timestamp | None = None  # last bar of the previous split: this split owns only later bars
    for split in SPLITS:
        part, tally = split_bars(bars, split, plan, after, config)
        info[split] = split_info(split, tally, plan, config, after, span)
        assert part is not None and tally.last is not None
        splits[split] = part
        after = plan.after(split, tally.last)
    return splits, info


def _as_bars(frames: Mapping[str, pd.DataFrame]) -> Bars:
    return frames if isinstance(frames, Bars) else Bars.from_frames(frames)


def clean_bar_chunk(raw: Bars, config: Config) -> tuple[Bars, CleaningStats, dict[str, str]]:
    """Clean the raw bars of some symbols (:func:`clean_bars`); returns the clean bars of the symbols with at least
    one window of rows, the summed cleaning counts, and the symbols left out (with reasons)."""
    window = config.window
    clean, counts = clean_bars(raw, config.price_spike_factor, config.price_spike_action == "drop")
    total = CleaningStats(*(int(x) for x in counts.sum(axis=0)))
    skipped: dict[str, str] = {}
    rows_in, rows_out = counts[:, 0], counts[:, -1]
    for i in np.flatnonzero(rows_out < window):
        reason = (
            f"{rows_out[i]} clean rows (of {rows_in[i]}), fewer than one window of {window} "
            "(lookback_window + predict_window + 1)"
        )
        skipped[raw.symbols[i]] = reason
        logger.warning("skipping symbol %s: %s", raw.symbols[i], reason)
    if skipped:
        clean = clean.select(np.array([s not in skipped for s in clean.symbols], dtype=bool))
    return clean, total, skipped


def clean_chunk(
    raw: Mapping[str, pd.DataFrame], config: Config, source_name: str = ""
) -> tuple[dict[str, pd.DataFrame], CleaningStats, dict[str, str]]:
    """:func:`clean_bar_chunk` of raw frames; the clean frames carry the calendar features."""
    clean, total, skipped = clean_bar_chunk(_as_bars(raw), config)
    return clean.frames(with_features=True), total, skipped


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
    clean, total, short = clean_bar_chunk(_as_bars(raw), config)
    _log_cleaning(source_name, total)
    if not clean.symbols:
        raise _no_clean_symbol(source_name, config, total)
    parts, info = _split_all(clean, config)
    symbols = sorted(set().union(*(p.symbols for p in parts.values())))
    manifest = build_manifest(
        config,
        source_name,
        info,
        symbols,
        {**(skipped or {}), **short},
        total,
        _median_from_counts(*_gap_counts(clean)),
        source_info,
    )
    return {s: p.long_frame() for s, p in parts.items()}, manifest


# ---------------------------------------------------------------------------------------------- streaming
class ChunkSource(Protocol):
    """What :func:`stream_dataset` needs of a data source (:class:`~kronos.data.sources.BaseDataProcessor`)."""

    name: str
    streams: bool
    skipped_symbols: dict[str, str]
    source_info: dict[str, Any]

    def download_data(self) -> None: ...

    def list_symbols(self) -> list[str]: ...

    def load_symbols(self, symbols: list[str]) -> Mapping[str, pd.DataFrame]: ...


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
        raw = _as_bars(source.load_symbols(chunks[index]))
        loaded += len(raw.symbols)
        clean, stats, short = clean_bar_chunk(raw, config)
        del raw
        total = total + stats
        skipped.update(short)
        if not clean.symbols:
            continue
        times = _add_counts(times, _time_counts(clean))
        gaps = _add_counts(gaps, _gap_counts(clean))
        _spool(staging, index, clean)
        spooled.append(index)
    skipped.update(source.skipped_symbols)
    stats_dir = staging / STATS
    np.save(stats_dir / f"times-{shard.rank}.npy", np.stack(times))
    np.save(stats_dir / f"gaps-{shard.rank}.npy", np.stack(gaps))
    summary = {"loaded": loaded, "cleaning": dataclasses.asdict(total), "skipped": skipped, "spooled": spooled}
    (stats_dir / f"rank-{shard.rank}.json").write_text(kio.dumps_json(summary), encoding="utf-8")


def _spool(staging: Path, index: int, bars: Bars) -> None:
    """One chunk's clean bars as plain arrays (``.npy``, read back without pickles) and its symbols (JSON)."""
    stem = staging / SPOOL / f"{index:05d}"
    for name in ("offsets", "times", "data"):
        np.save(f"{stem}-{name}.npy", getattr(bars, name))
    Path(f"{stem}-symbols.json").write_text(json.dumps(bars.symbols), encoding="utf-8")


def _spooled(staging: Path, index: int) -> Bars:
    stem = staging / SPOOL / f"{index:05d}"
    arrays = {name: np.load(f"{stem}-{name}.npy", allow_pickle=False) for name in ("offsets", "times", "data")}
    return Bars(json.loads(Path(f"{stem}-symbols.json").read_text(encoding="utf-8")), **arrays)


def _read_counts(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    acc = (np.zeros(0, "int64"), np.zeros(0, "int64"))
    for file in files:
        pair = np.load(file, allow_pickle=False)
        acc = _add_counts(acc, (pair[0], pair[1]))
    return acc


def _split_pass(
    shard: Shard,
    staging: Path,
    config: Config,
    plan: SplitPlan,
    splits: tuple[str, ...],
    afters: dict[str, pd.Timestamp | None],
    chunks: list[int],
) -> None:
    """Write this rank's parts of ``splits`` (from its share of the spooled chunks), their tallies and symbols."""
    tallies = {s: SplitTally() for s in splits}
    symbols: dict[str, list[str]] = {s: [] for s in splits}
    for index in chunks:
        bars = _spooled(staging, index)
        for split in splits:
            part, tally = split_bars(bars, split, plan, afters[split], config)
            tallies[split] = tallies[split].merge(tally)
            if part is not None:
                write_table_part(staging, split, index, split_table(part.symbols, part.lengths, part.times, part.data))
                symbols[split] += part.symbols
        del bars
    for split, tally in tallies.items():
        out = {"tally": tally.to_json(), "symbols": symbols[split]}
        (staging / STATS / f"{split}-{shard.rank}.json").write_text(kio.dumps_json(out), encoding="utf-8")


def stream_dataset(
    source: ChunkSource, config: Config, shard: Shard | None = None, chunk_symbols: int | None = None
) -> dict[str, Any]:
    """Load, clean, split and save ``source``'s data to ``config.dataset_path`` a chunk of symbols at a time.

    Peak memory follows ``chunk_symbols`` (default: config key ``data_chunk_symbols``), not the market: the first
    pass loads and cleans one chunk at a time (:class:`Bars`: flat arrays, no frame per symbol) and spools its clean
    arrays (``.npy``) beside the dataset, counting the bars per time for the global cut dates; then each split is
    written as one part file per chunk (pyarrow, straight from the arrays). The dataset (rows, cut
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
    times = _read_counts(sorted(stats_dir.glob("times-*.npy")))
    gaps = _read_counts(sorted(stats_dir.glob("gaps-*.npy")))
    span = (pd.Timestamp(times[0][0]), pd.Timestamp(times[0][-1]))
    plan = SplitPlan.from_config(config, *times)
    my_spool = [i for n, i in enumerate(spooled) if n % shard.world_size == shard.rank]

    groups = [SPLITS] if plan.known_afters() else [(s,) for s in SPLITS]
    info: dict[str, dict[str, Any]] = {}
    symbols: set[str] = set()
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
                written = kio.read_json(stats_dir / f"{split}-{r}.json")
                tally = tally.merge(SplitTally.from_json(written["tally"]))
                symbols.update(written["symbols"])
            tally.dropped = dict(sorted(tally.dropped.items()))
            info[split] = split_info(split, tally, plan, config, afters[split], span)
            assert tally.last is not None
            after = plan.after(split, tally.last)

    def finish() -> str:
        if shard.rank != 0:
            return ""
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
    "Bars",
    "clean_bars",
    "clean_bar_chunk",
    "split_bars",
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
