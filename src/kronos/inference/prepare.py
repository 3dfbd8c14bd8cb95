"""Forecast preparation of many series at once (NumPy): the fast path of :class:`~kronos.inference.KronosPredictor`'s
``predict_df`` / ``predict_batch``.

Each context is checked and normalised once, with the per-series pandas work of
:meth:`KronosPredictor.prepare <kronos.inference.predictor.KronosPredictor.prepare>` replaced by whole-array NumPy
operations: values gathered column-wise, the official normalisation in the same arithmetic order, dtype and
memory layout (so every tensor is bit-identical to the per-series path), calendar features from the integer
nanoseconds, and future timestamps computed once per distinct continuation
(:func:`kronos.timeutil.future_timestamps_key`).

Nothing here builds an error message. The functions answer ``None`` (or :data:`INVALID`) when an input is not
plainly valid or not of a kind they handle (extension dtypes, timestamps that are not already datetimes, ...); the
predictor then runs the per-series path, which either raises the usual one-line message or handles the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kronos.data.schema import PRICE_COLUMNS, VALUE_COLUMNS, norm_scale
from kronos.timeutil import future_timestamps, future_timestamps_key

DAY_NS = 86_400 * 10**9
HOUR_NS = 3_600 * 10**9
MINUTE_NS = 60 * 10**9
NAT = np.iinfo(np.int64).min
CLOSE = VALUE_COLUMNS.index("close")


class _Invalid:
    """Marker: the input is not plainly valid (or of a kind the fast path leaves to the per-series path)."""


INVALID = _Invalid()


# ---------------------------------------------------------------------------------------------- pieces
def plain_numeric(dtype: Any) -> bool:
    """A NumPy integer or float dtype (what the fast path converts; bools and extension dtypes are left to the
    per-series path, which accepts or refuses them as before)."""
    return isinstance(dtype, np.dtype) and dtype.kind in "iuf"


def wall_ns(idx: pd.DatetimeIndex) -> np.ndarray:
    """Wall-clock nanoseconds of ``idx`` (local time for a tz-aware index): what its calendar fields are read from."""
    if idx.tz is not None:
        idx = idx.tz_localize(None)
    return idx.as_unit("ns").asi8


def time_feature_array(ns: np.ndarray) -> np.ndarray:
    """Calendar features ``[..., 5]`` (minute, hour, weekday Mon=0, day, month; float32) of wall-clock nanoseconds
    ``[...]``: the values of :func:`kronos.data.schema.time_features`, without pandas."""
    ns = np.asarray(ns, dtype=np.int64)
    days = ns // DAY_NS  # floor: correct before 1970 too
    of_day = ns - days * DAY_NS
    d = days.astype("datetime64[D]")
    month_start = d.astype("datetime64[M]")
    out = np.empty((*ns.shape, 5), dtype=np.float32)
    out[..., 0] = (of_day % HOUR_NS) // MINUTE_NS
    out[..., 1] = of_day // HOUR_NS
    out[..., 2] = (days + 3) % 7  # 1970-01-01 was a Thursday
    out[..., 3] = (d - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    out[..., 4] = month_start.astype(np.int64) % 12 + 1
    return out


def normalise(values: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official normalisation of ``values [n, 6, T]`` (float32, C-contiguous: each column of each context
    contiguous, the layout ``DataFrame.values.astype(float32)`` gives one context, so the reductions add in the same
    order): ``(x [n, T, 6], mean [n, 6], std [n, 6])`` with population std, ``(x - mean) / (std + 1e-5)`` clipped."""
    mean = np.mean(values, axis=2)
    std = np.std(values, axis=2)
    x = (values.transpose(0, 2, 1) - mean[:, None, :]) / norm_scale(std)[:, None, :]
    return np.clip(x, -clip, clip), mean, std


def complete_columns(columns: dict[str, np.ndarray], keep_amount: bool) -> tuple[list[np.ndarray], np.dtype] | None:
    """The six value columns after the Q10 rule (:func:`kronos.data.schema.complete_volume_amount`) and the dtype
    ``DataFrame.values`` gives them; ``None`` for a column that is not a plain NumPy number."""
    if not all(plain_numeric(v.dtype) for v in columns.values()):
        return None
    cols = dict(columns)
    n = len(cols["close"])
    if "volume" not in cols:
        cols["volume"] = np.zeros(n)
        if not (keep_amount and "amount" in cols):
            cols["amount"] = np.zeros(n)
    elif "amount" not in cols:  # derive_amount: pandas' row mean (sum in order, / 4) times volume
        prices = [cols[c] for c in PRICE_COLUMNS]
        common = np.result_type(*prices)
        acc = np.dtype(np.float64) if common.kind in "iu" else common
        total = prices[0].astype(acc)
        for p in prices[1:]:
            total = total + p.astype(acc)
        cols["amount"] = (total / acc.type(4)) * cols["volume"]
    out = [cols[c] for c in VALUE_COLUMNS]
    return out, np.result_type(*out)


def value_rows(columns: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """``[6, n]`` float32 rows of the six columns, converted as ``DataFrame.values.astype(float32)`` does (to the
    common dtype first, then float32)."""
    out = np.empty((len(columns), len(columns[0])), dtype=np.float32)
    for j, c in enumerate(columns):
        out[j] = c.astype(dtype, copy=False)
    return out


def strictly_increasing(ns: np.ndarray, axis: int = -1) -> bool:
    return bool((np.diff(ns, axis=axis) > 0).all())


class FutureCalendar:
    """Future timestamps by calendar, each distinct continuation computed once (:func:`future_timestamps`)."""

    def __init__(self, calendar: str | None, tz: Any) -> None:
        self.calendar, self.tz = calendar, tz
        self._done: dict[tuple, np.ndarray] = {}

    def extend(self, history: pd.DatetimeIndex, wall: np.ndarray, n: int) -> np.ndarray:
        """UTC nanoseconds ``[n]`` of the ``n`` bars after ``history`` (its wall clock ``wall``)."""
        key = (n, *future_timestamps_key(wall, self.calendar))
        got = self._done.get(key)
        if got is None:
            ext = future_timestamps(history, n, calendar=self.calendar)
            got = self._done[key] = _utc_ns(ext)
        return got


def _utc_ns(idx: pd.DatetimeIndex) -> np.ndarray:
    return pd.DatetimeIndex(idx).as_unit("ns").asi8


def to_index(utc_ns: np.ndarray, tz: Any) -> pd.DatetimeIndex:
    """A DatetimeIndex (in ``tz``) of UTC nanoseconds."""
    idx = pd.DatetimeIndex(np.asarray(utc_ns, dtype=np.int64).view("M8[ns]"))
    return idx if tz is None else idx.tz_localize("UTC").tz_convert(tz)


# ---------------------------------------------------------------------------------------------- predict_df
@dataclass
class FrameTasks:
    """Every forecast of one ``predict_df`` call, as arrays over the frame's rows sorted by (symbol, time)."""

    symbols: list  # per task: the symbol (groupby key)
    pos: np.ndarray  # per task: row of the anchor bar
    start: np.ndarray  # per task: first context row
    vstart: np.ndarray  # per task: its column in ``values``
    end: np.ndarray  # per task: last row of the task's symbol + 1
    ts: pd.DatetimeIndex  # sorted timestamps (the frame's time zone)
    wall: np.ndarray  # their wall-clock nanoseconds
    values: np.ndarray  # [6, rows in some context] float32 model inputs (Q10 completed), in row order
    close: np.ndarray  # [rows] float64 closes
    y_utc: np.ndarray  # [tasks, P] forecast bars, UTC nanoseconds
    y_wall: np.ndarray  # [tasks, P] their wall-clock nanoseconds
    short: list[str]  # anchors skipped for lack of history ("symbol@time")

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def tz(self) -> Any:
        return self.ts.tz

    def true_close(self, P: int, which: np.ndarray) -> np.ndarray:
        """``[len(which), P]`` realised closes after the anchors of tasks ``which`` (NaN past the symbol's last
        bar)."""
        rows = self.pos[which, None] + 1 + np.arange(P)
        known = rows < self.end[which, None]
        return np.where(known, self.close[np.minimum(rows, len(self.close) - 1)], np.nan)


def frame_tasks(
    frame: pd.DataFrame,
    id_column: str,
    timestamp_column: str,
    L: int | None,
    max_context: int,
    P: int,
    anchors: tuple[dict | None, np.ndarray | None] | None,
    future: Any,
    calendar: str | None,
    keep_amount: bool,
    min_history: int,
) -> FrameTasks | None:
    """The tasks of ``predict_df`` (see ``_forecast_tasks`` in :mod:`kronos.inference.predictor`, whose rules this
    follows row for row), or ``None`` when the per-series path must handle the frame (anything invalid or unusual:
    it raises the message, or handles it). ``anchors``: the parsed ``(by_symbol, shared)`` lookup, or ``None`` for
    each symbol's last bar. The frame's columns were checked by the caller."""
    if L is not None and L < min_history:
        return None  # contexts shorter than a forecast needs: the per-series path names the first one
    ts_col = frame[timestamp_column]
    if not isinstance(ts_col.dtype, (np.dtype, pd.DatetimeTZDtype)) or ts_col.dtype.kind != "M":
        return None  # strings, objects: parsed per symbol by the per-series path
    ids = frame[id_column]
    if isinstance(ids.dtype, pd.CategoricalDtype):
        return None
    codes, uniques = pd.factorize(ids, sort=True)  # the groupby's order (it factorizes the same way)
    keys = list(pd.Index(uniques))
    stamps = pd.DatetimeIndex(ts_col).as_unit("ns")
    if stamps.hasnans:
        return None
    keep = codes >= 0
    raw = stamps.asi8
    if keep.all() and (np.diff(codes) >= 0).all() and (np.diff(raw)[codes[1:] == codes[:-1]] > 0).all():
        order = np.arange(len(codes))  # already sorted (the pipeline's frame): what the sort below would give
    else:
        order = np.lexsort((raw, codes))  # stable: by symbol, then time, ties in frame order
        order = order[keep[order]]
    codes = codes[order]
    ts = stamps[order]
    utc = ts.asi8
    wall = wall_ns(ts)
    n_rows = len(order)
    bounds = np.flatnonzero(np.diff(codes)) + 1
    starts = np.r_[0, bounds]
    ends = np.r_[bounds, n_rows]
    if n_rows > 1:
        same = codes[1:] == codes[:-1]
        if (utc[1:][same] <= utc[:-1][same]).any():
            return None  # a repeated timestamp: the per-series path names it
    close_col = frame["close"].to_numpy()
    if not plain_numeric(close_col.dtype):
        return None
    close = close_col[order].astype(np.float64)

    # anchors: rows of each symbol
    if anchors is None:
        pos, sym_of = ends - 1, np.arange(len(starts))
    else:
        by_symbol, shared = anchors
        if by_symbol is None:
            assert shared is not None
            pos = np.flatnonzero(np.isin(utc, shared))
            sym_of = codes[pos]
        else:
            group = {keys[codes[s]]: (s, e) for s, e in zip(starts, ends)}
            if any(s not in group for s in by_symbol):
                return None
            parts = []
            for symbol in keys:
                wanted = by_symbol.get(symbol)
                if wanted is None or not len(wanted):
                    continue
                s, e = group[symbol]
                found = s + np.flatnonzero(np.isin(utc[s:e], wanted))
                if len(found) < len(wanted):
                    return None
                parts.append(found)
            pos = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            sym_of = codes[pos]
    first = starts[sym_of]
    end = ends[sym_of]
    have = pos + 1 - first
    need = min_history if L is None else L
    ok = have >= need
    short = [f"{keys[codes[i]]}@{ts[i]}" for i in pos[~ok]]
    pos, first, end, have = pos[ok], first[ok], end[ok], have[ok]
    start = pos + 1 - (np.minimum(have, max_context) if L is None else L)
    n = len(pos)
    if n == 0:
        return None

    # forecast bars: the frame's next bars, then the calendar (or the given future timestamps)
    y_utc = np.empty((n, P), dtype=np.int64)
    n_next = np.minimum(P, end - pos - 1)
    if future is not None:
        y_utc[:] = _given_future(future, [keys[c] for c in codes[pos]], ts.tz, P)
    else:
        cal = FutureCalendar(calendar, ts.tz)
        for t in range(n):
            k = int(n_next[t])
            a = int(pos[t]) + 1
            y_utc[t, :k] = utc[a : a + k]
            if k < P:
                s, e = int(start[t]), a + k
                y_utc[t, k:] = cal.extend(ts[s:e], wall[s:e], P - k)
    if (y_utc == NAT).any() or (P > 1 and not strictly_increasing(y_utc)) or (y_utc[:, 0] <= utc[pos]).any():
        return None
    y_wall = wall_ns(to_index(y_utc.ravel(), ts.tz)).reshape(n, P)
    # the model inputs of the rows inside some context only (contexts are runs of sorted rows)
    depth = np.cumsum(np.bincount(start, minlength=n_rows + 1) - np.bincount(pos + 1, minlength=n_rows + 1))
    inside = depth[:n_rows] > 0
    rows = order[inside]
    columns = {c: frame[c].to_numpy()[rows] for c in VALUE_COLUMNS if c in frame.columns}
    done = complete_columns(columns, keep_amount)
    if done is None:
        return None
    values = value_rows(*done)
    if not np.isfinite(values).all():
        return None
    vstart = (np.cumsum(inside) - 1)[start]
    symbols = [keys[c] for c in codes[pos]]
    return FrameTasks(symbols, pos, start, vstart, end, ts, wall, values, close, y_utc, y_wall, short)


def _given_future(future: Any, symbols: list, tz: Any, P: int) -> Any:
    """``[tasks, P]`` UTC ns of given future timestamps, or raise _Fallback."""
    cache: dict[int, np.ndarray] = {}
    rows = []
    for symbol in symbols:
        given = future.get(symbol) if isinstance(future, dict) else future
        if given is None or isinstance(given, pd.DataFrame):
            raise _Fallback
        got = cache.get(id(given))
        if got is None:
            try:
                idx = pd.DatetimeIndex(given)
            except (TypeError, ValueError):
                raise _Fallback from None
            if len(idx) != P or idx.hasnans or str(idx.tz) != str(tz):
                raise _Fallback
            got = cache[id(given)] = idx.as_unit("ns").asi8
        rows.append(got)
    return np.stack(rows)


class _Fallback(Exception):
    """The input needs the per-series path."""


def frame_tasks_or_none(*args: Any, **kwargs: Any) -> FrameTasks | None:
    """:func:`frame_tasks`, ``None`` where it defers to the per-series path."""
    try:
        return frame_tasks(*args, **kwargs)
    except (_Fallback, OverflowError, ValueError, TypeError):
        return None


@dataclass
class Batch:
    """Model-ready arrays of contexts of one length."""

    members: np.ndarray  # positions (in the caller's list) of these contexts
    x: np.ndarray  # [n, T, 6] float32
    x_stamp: np.ndarray  # [n, T, 5] float32
    y_stamp: np.ndarray  # [n, P, 5] float32
    mean: np.ndarray  # [n, 6] float32
    std: np.ndarray  # [n, 6] float32


def frame_batches(tasks: FrameTasks, which: np.ndarray, clip: float, window: int | None) -> list[Batch]:
    """The prepared contexts of tasks ``which`` grouped by context length; ``window``: keep only the last
    ``window`` bars of a longer context (``truncate_history``)."""
    stop = tasks.pos[which] + 1
    lengths = stop - tasks.start[which]
    if window is not None:
        lengths = np.minimum(lengths, window)
    vstop = tasks.vstart[which] + (stop - tasks.start[which])
    out = []
    for T in np.unique(lengths):
        sel = np.flatnonzero(lengths == T)
        rows = stop[sel, None] - T + np.arange(T)
        vals = np.ascontiguousarray(tasks.values[:, vstop[sel, None] - T + np.arange(T)].transpose(1, 0, 2))
        x, mean, std = normalise(vals, clip)
        x_stamp = time_feature_array(tasks.wall[rows])
        y_stamp = time_feature_array(tasks.y_wall[which[sel]])
        out.append(Batch(sel, np.ascontiguousarray(x), x_stamp, y_stamp, mean, std))
    return out


# ---------------------------------------------------------------------------------------------- predict_batch
@dataclass
class SeriesInputs:
    """One series of ``predict_batch`` read into arrays (not yet normalised)."""

    values: np.ndarray  # [6, T] float32
    x_wall: np.ndarray  # [T]
    y_wall: np.ndarray  # [P]
    last_close: float
    y_index: pd.Index


def read_series(
    df: Any, x_timestamp: Any, y_timestamp: Any, pred_len: int, keep_amount: bool, min_history: int
) -> SeriesInputs | None:
    """One series' arrays, or ``None`` when it is not plainly valid (the per-series check then raises its
    message) or not of a kind handled here."""
    if not isinstance(df, pd.DataFrame) or len(df) < min_history:
        return None
    where = df.columns.get_indexer_for(_VALUE_INDEX) if df.columns.is_unique else None
    if where is None or (where[: len(PRICE_COLUMNS)] < 0).any():
        return None
    present = [(c, int(j)) for c, j in zip(VALUE_COLUMNS, where) if j >= 0]
    block = df.to_numpy()
    if len(present) == df.shape[1] and plain_numeric(block.dtype) and ("amount" in df.columns or "volume" not in df):
        # only value columns and nothing to derive: the frame's values in their common dtype (which is what
        # DataFrame.values gives the per-series path, and converts the same way on to float32)
        columns = {c: block[:, j] for c, j in present}
    else:
        columns = {c: df[c].to_numpy() for c, _ in present}
    done = complete_columns(columns, keep_amount)
    if done is None:
        return None
    cols, dtype = done
    values = value_rows(cols, dtype)
    if not np.isfinite(values).all():
        return None
    x, y = _stamps(x_timestamp), _stamps(y_timestamp)
    if x is None or y is None or len(x[0]) != len(df) or len(y[0]) != pred_len:
        return None
    if x[2] != y[2]:
        return None  # naive beside tz-aware: not comparable, the per-series path says so
    (x_utc, x_wall, _, _), (y_utc, y_wall, _, y_idx) = x, y
    if not (strictly_increasing(x_utc) and strictly_increasing(y_utc)) or not y_utc[0] > x_utc[-1]:
        return None
    y_index = pd.Index(y_timestamp if isinstance(y_timestamp, pd.Series) or y_idx is None else y_idx)
    last_close = float(columns["close"][-1])
    return SeriesInputs(values, x_wall, y_wall, last_close, y_index)


_VALUE_INDEX = pd.Index(VALUE_COLUMNS)


def _stamps(values: Any) -> tuple[np.ndarray, np.ndarray, bool, pd.DatetimeIndex | None] | None:
    """``(UTC ns, wall-clock ns, tz-aware, index or None)`` of timestamps, converted as ``pd.DatetimeIndex``
    converts them; None for anything not plainly valid. Naive datetime64 Series/indexes skip the index."""
    if isinstance(values, (pd.Series, pd.DatetimeIndex)) and isinstance(values.dtype, np.dtype):
        if values.dtype.kind == "M":
            raw = values.to_numpy()
            ns = raw.astype("M8[ns]").view(np.int64)
            if (ns == NAT).any() or not (ns.view("M8[ns]").astype(raw.dtype) == raw).all():
                return None  # NaT, or out of the nanosecond range
            return ns, ns, False, None
    if isinstance(values, pd.DataFrame):
        return None
    try:
        idx = pd.DatetimeIndex(values)
        if idx.hasnans:
            return None
        return idx.as_unit("ns").asi8, wall_ns(idx), idx.tz is not None, idx
    except (TypeError, ValueError, OverflowError):
        return None


def series_batches(series: list[SeriesInputs], clip: float, window: int | None) -> list[Batch]:
    """The prepared contexts of ``series`` grouped by length (``window`` as in :func:`frame_batches`)."""
    lengths = np.array([s.values.shape[1] for s in series])
    if window is not None:
        lengths = np.minimum(lengths, window)
    out = []
    for T in np.unique(lengths):
        sel = np.flatnonzero(lengths == T)
        vals = np.stack([series[i].values[:, -T:] for i in sel])  # [n, 6, T], C-contiguous
        x, mean, std = normalise(vals, clip)
        x_stamp = time_feature_array(np.stack([series[i].x_wall[-T:] for i in sel]))
        y_stamp = time_feature_array(np.stack([series[i].y_wall for i in sel]))
        out.append(Batch(sel, np.ascontiguousarray(x), x_stamp, y_stamp, mean, std))
    return out
