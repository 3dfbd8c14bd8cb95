"""The canonical K-line frame every data source produces, and its validation.

A *raw frame* holds one symbol's bars: ``timestamps`` (datetime64[ns], tz-naive) and the six value columns
``open, high, low, close, volume, amount`` (float64). It may still hold NaN rows or impossible bars; cleaning
happens in :mod:`kronos.data.processing`. A *split frame* (what ``store`` writes and the training windows read)
is the long form of many cleaned raw frames plus a ``symbol`` column and the calendar features.

:func:`validate_kline_frame` turns whatever a user's file or an API gives into a raw frame: columns are matched
case-insensitively with common aliases (also the Chinese headers of A-share exports), timestamps are parsed
and made tz-naive, numbers are coerced, and a missing ``volume``/``amount`` is filled the way the predictor
does it (Q10: no volume -> volume and amount 0; no amount -> mean(OHLC) x volume).

This module is the package's one K-line vocabulary; data, inference, evaluation and the pipeline import from it:

- column tuples: :data:`PRICE_COLUMNS` (the four prices), :data:`VALUE_COLUMNS` (the six model inputs, prices then
  ``volume, amount``), :data:`KLINE_COLUMNS` (``timestamps`` + the six), :data:`TIME_FEATURES` (the five calendar
  features) and :data:`SPLIT_COLUMNS` (a processed split's columns);
- :func:`time_features`: the calendar features of timestamps;
- :func:`complete_volume_amount` / :func:`derive_amount`: the volume/amount rule;
- :data:`NORM_EPS` / :func:`norm_scale`: the ``std + 1e-5`` normalisation scale;
- :func:`range_end`: the inclusive end of a configured ``[start, end]`` range.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

from kronos.errors import DataError

logger = logging.getLogger(__name__)

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
VALUE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume", "amount")
KLINE_COLUMNS: tuple[str, ...] = ("timestamps",) + VALUE_COLUMNS
TIME_FEATURES: tuple[str, ...] = ("minute", "hour", "weekday", "day", "month")
SPLIT_COLUMNS: tuple[str, ...] = ("symbol",) + KLINE_COLUMNS + TIME_FEATURES
#: Added to the population std before dividing, in training windows and in the predictor (official code).
NORM_EPS: float = 1e-5

# Accepted spellings per canonical column, in order of preference (matched case-insensitively).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "timestamps": ("timestamps", "timestamp", "datetime", "date", "time", "day", "trade_date", "日期", "时间"),
    "open": ("open", "开盘", "开盘价"),
    "high": ("high", "最高", "最高价"),
    "low": ("low", "最低", "最低价"),
    "close": ("close", "收盘", "收盘价"),
    "volume": ("volume", "vol", "成交量"),
    "amount": ("amount", "amt", "turnover", "money", "成交额"),
}
# Yahoo-style split/dividend-adjusted close (used by the csv source's ``adjust: adj_close``; never read as close).
ADJ_CLOSE_ALIASES: tuple[str, ...] = ("adj close", "adj_close", "adjclose", "adjusted close", "adjusted_close")
SYMBOL_ALIASES: tuple[str, ...] = ("symbol", "code", "ticker", "instrument", "stock_code", "代码", "股票代码")

_TZ_SUFFIX = re.compile(r"\s*(?:Z|UTC|[+-]\d{2}:?\d{2})$")
_TIME_OF_DAY = re.compile(r"^\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?$")


def find_column(columns: Iterable[object], aliases: Iterable[str], explicit: str = "") -> str | None:
    """Return the column of ``columns`` matching ``explicit`` (if given) or the first of ``aliases``.

    Matching ignores case and surrounding spaces; an exact-case match wins over a case-insensitive one.
    """
    cols = [c for c in columns if isinstance(c, str)]
    wanted = [explicit] if explicit else list(aliases)
    for name in wanted:
        if name in cols:
            return name
        key = name.strip().lower()
        for c in cols:
            if c.strip().lower() == key:
                return c
    return None


def derive_amount(frame: pd.DataFrame) -> pd.Series:
    """``mean(open, high, low, close) x volume`` row-wise, the official pipelines' stand-in for turnover."""
    return frame[list(PRICE_COLUMNS)].mean(axis=1, skipna=False) * frame["volume"]


def derive_amount_values(prices: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """:func:`derive_amount` of float64 arrays (``prices``: one column per :data:`PRICE_COLUMNS`): pandas' row mean
    sums the four prices in order and divides by 4, so the results are bit-identical."""
    return (((prices[:, 0] + prices[:, 1]) + prices[:, 2]) + prices[:, 3]) / 4 * volume


def complete_volume_amount(frame: pd.DataFrame, keep_amount: bool = False) -> pd.DataFrame:
    """Add a missing ``volume``/``amount`` the way the official predictor does (Q10), in place; returns ``frame``.

    No ``volume``: volume = 0 and amount = 0 (a supplied amount is overwritten unless ``keep_amount``).
    No ``amount``: amount = mean(open, high, low, close) x volume (:func:`derive_amount`).
    """
    if "volume" not in frame.columns:
        frame["volume"] = 0.0
        if not (keep_amount and "amount" in frame.columns):
            frame["amount"] = 0.0
    elif "amount" not in frame.columns:
        frame["amount"] = derive_amount(frame)
    return frame


def time_features(timestamps) -> pd.DataFrame:
    """Calendar features :data:`TIME_FEATURES` (``minute, hour, weekday (Mon=0), day, month``, int64) of each
    timestamp, as a frame with a RangeIndex. Daily bars carry midnight timestamps: minute and hour are 0."""
    idx = pd.DatetimeIndex(timestamps)
    return pd.DataFrame(
        {
            "minute": np.asarray(idx.minute, dtype="int64"),
            "hour": np.asarray(idx.hour, dtype="int64"),
            "weekday": np.asarray(idx.day_of_week, dtype="int64"),
            "day": np.asarray(idx.day, dtype="int64"),
            "month": np.asarray(idx.month, dtype="int64"),
        },
        columns=list(TIME_FEATURES),
    )


def norm_scale(std):
    """The normalisation divisor ``std + NORM_EPS`` (population std over the context)."""
    return std + NORM_EPS


def range_end(value) -> pd.Timestamp:
    """Inclusive end of a configured range: an end given as a plain date includes that whole day."""
    ts = pd.Timestamp(value)
    return ts + pd.Timedelta(days=1) - pd.Timedelta(1, unit="ns") if ts == ts.normalize() else ts


def _is_time_of_day(values: pd.Series) -> bool:
    first = values.dropna()
    return len(first) > 0 and bool(_TIME_OF_DAY.match(str(first.iloc[0]).strip()))


def _where(pos: int, line_offset: int | None) -> str:
    return f"line {pos + line_offset}" if line_offset is not None else f"row {pos + 1}"


def parse_timestamps(
    values: pd.Series, source_name: str, column: str = "timestamps", line_offset: int | None = None
) -> pd.Series:
    """Parse ``values`` into tz-naive datetime64[ns]; DataError naming the first unparseable row.

    Accepts datetimes (tz-aware ones keep their local wall time), date/time strings in any one format (mixed
    formats are retried), ``YYYYMMDD`` integers and Unix epochs (s/ms/us/ns, by magnitude). ``line_offset``
    turns a 0-based row position into a file line number in messages (2 for a CSV with a header).
    """
    s = pd.Series(values).reset_index(drop=True)
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        parsed = s.dt.tz_localize(None)
    elif pd.api.types.is_datetime64_any_dtype(s.dtype):
        parsed = s
    elif pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        parsed = _parse_numeric_timestamps(s)
    else:
        parsed = _parse_text_timestamps(s)
        _check_mixed_offsets(s, parsed, source_name, column, line_offset)
    bad = parsed.isna().to_numpy()
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source_name}: column '{column}' has an unparseable or empty timestamp at {_where(pos, line_offset)} "
            f"(value {s.iloc[pos]!r}); fix or remove that row ({int(bad.sum())} bad value(s) in total)"
        )
    try:
        return parsed.astype("datetime64[ns]")
    except (ValueError, OverflowError, pd.errors.OutOfBoundsDatetime) as exc:
        raise DataError(f"{source_name}: column '{column}' has timestamps out of range: {exc}") from None


def _offset_minutes(text: str) -> int | None:
    m = _TZ_SUFFIX.search(text.strip()) if isinstance(text, str) else None
    if m is None:
        return None
    suffix = m.group(0).strip()
    if suffix in ("Z", "UTC"):
        return 0
    digits = suffix[1:].replace(":", "")
    return (1 if suffix[0] == "+" else -1) * (int(digits[:2]) * 60 + int(digits[2:]))


_LINE_END_OFFSET = re.compile(r"(Z|UTC|[+-]\d{2}:?\d{2})[^\S\n]*$", re.MULTILINE)


def _one_offset_at_most(s: pd.Series) -> bool:
    """True when the text timestamps ``s`` carry at most one distinct UTC offset: one regex pass over all of them
    joined by line breaks (False, so the per-value check runs, when a value holds a line break itself)."""
    texts = [x for x in s.to_numpy(dtype=object) if isinstance(x, str)]
    joined = "\n".join(texts)
    if joined.count("\n") != max(len(texts) - 1, 0):
        return False
    return len({_offset_minutes(m) for m in _LINE_END_OFFSET.findall(joined)}) <= 1


def _check_mixed_offsets(s: pd.Series, wall: pd.Series, source_name: str, column: str, line_offset: int | None) -> None:
    """Reject timestamps whose UTC offsets differ in a way that makes local clock time lie.

    Bars keep their local wall time. With one offset, or daylight-saving offsets (at most one hour apart) whose
    wall times are in the same order as the instants, that is right. Offsets further apart (bars written in
    two zones) or an order that differs between wall clock and instants would silently reorder or shift bars:
    a DataError names the row.
    """
    if _one_offset_at_most(s):
        return
    offsets = s.map(_offset_minutes)
    known = offsets.dropna()
    if known.nunique() <= 1:
        return
    values = [int(v) for v in known.unique()]
    first = int(known.iloc[0])

    def fmt(minutes: int) -> str:
        return f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"

    hint = "write every timestamp in one time zone (e.g. the exchange's local time) or without offsets, then run again"
    far = known[(known - first).abs() > 60]
    if len(far):
        pos = int(far.index[0])
        raise DataError(
            f"{source_name}: column '{column}' mixes UTC offsets {fmt(first)} and {fmt(int(far.iloc[0]))} "
            f"(first at {_where(pos, line_offset)}, value {s.iloc[pos]!r}); {hint}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instants = pd.to_datetime(s.where(offsets.notna(), None), utc=True, errors="coerce", format="mixed")
    ok = instants.notna() & wall.notna()
    order = np.argsort(instants[ok].to_numpy(), kind="stable")
    walls = wall[ok].to_numpy()[order]
    back = np.flatnonzero(walls[1:] < walls[:-1])
    if len(back):
        pos = int(np.flatnonzero(ok.to_numpy())[order[back[0] + 1]])
        raise DataError(
            f"{source_name}: column '{column}' mixes UTC offsets ({', '.join(fmt(v) for v in sorted(values))}) so "
            f"that local clock time and true time disagree on the order of bars at {_where(pos, line_offset)} "
            f"(value {s.iloc[pos]!r}); {hint}"
        )


def _parse_numeric_timestamps(s: pd.Series) -> pd.Series:
    v = pd.to_numeric(s, errors="coerce").astype("float64")
    finite = v[np.isfinite(v)]
    if len(finite) and (finite >= 1e7).all() and (finite < 3e7).all() and (finite % 1 == 0).all():
        # YYYYMMDD integers (e.g. tushare's trade_date)
        text = v.map(lambda x: f"{int(x):08d}" if np.isfinite(x) else "")
        return pd.to_datetime(text, format="%Y%m%d", errors="coerce")
    magnitude = float(finite.abs().max()) if len(finite) else 0.0
    unit = "s" if magnitude < 1e11 else "ms" if magnitude < 1e14 else "us" if magnitude < 1e17 else "ns"
    return pd.to_datetime(v, unit=unit, errors="coerce")


def _to_naive_datetimes(text: pd.Series, **kwargs) -> pd.Series:
    out = pd.to_datetime(text, errors="coerce", **kwargs)
    if isinstance(out.dtype, pd.DatetimeTZDtype):
        return out.dt.tz_localize(None)
    if not pd.api.types.is_datetime64_any_dtype(out.dtype):
        # pandas 2.x returns objects for mixed UTC offsets where 3.x raises
        raise ValueError("mixed time zones")
    return out


def _parse_text_timestamps(s: pd.Series) -> pd.Series:
    if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
        text = s.str.strip().astype("object").where(s.notna(), None)  # a text column: strip in one pass
    else:
        text = s.astype("object").where(s.notna(), None)
        text = text.map(lambda x: x.strip() if isinstance(x, str) else x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parsed = _to_naive_datetimes(text)
        except (ValueError, TypeError):
            # e.g. mixed UTC offsets (daylight saving): keep each row's local wall time
            text = text.map(lambda x: _TZ_SUFFIX.sub("", x) if isinstance(x, str) else x)
            parsed = _to_naive_datetimes(text, format="mixed")
        if parsed.isna().sum() > s.isna().sum():
            # the format inferred from the first row did not fit every row: parse row by row
            try:
                retry = _to_naive_datetimes(text, format="mixed")
                if retry.isna().sum() < parsed.isna().sum():
                    parsed = retry
            except (ValueError, TypeError):
                pass
    return pd.Series(parsed, index=s.index)


def _coerce_numbers(values: pd.Series, source_name: str, column: str, line_offset: int | None) -> pd.Series:
    s = pd.Series(values).reset_index(drop=True)
    if pd.api.types.is_bool_dtype(s.dtype):
        raise DataError(f"{source_name}: column '{column}' holds true/false values, expected numbers")
    if s.dtype.kind in "fiu":  # numbers already
        return s.astype("float64")
    out = pd.to_numeric(s, errors="coerce").astype("float64")
    given = s.notna().to_numpy()
    if given.any() and out.isna().to_numpy()[given].all():
        pos = int(np.flatnonzero(given)[0])
        raise DataError(
            f"{source_name}: column '{column}' holds no numbers (first value {s.iloc[pos]!r} at "
            f"{_where(pos, line_offset)}); check the file's column layout and decimal format"
        )
    return out


def validate_kline_frame(
    df: pd.DataFrame,
    source_name: str,
    *,
    timestamp_column: str = "",
    line_offset: int | None = None,
) -> pd.DataFrame:
    """Return ``df`` as a canonical raw frame (new object, input order kept, RangeIndex).

    ``source_name`` names the origin in error messages (e.g. ``"file 'data/AAPL.csv'"``). The timestamp
    column is ``timestamp_column`` when given, else the first alias found (``timestamps``, ``datetime``,
    ``date``...), a ``date`` + ``time`` pair, or a datetime index. Missing ``open/high/low/close`` or
    timestamps raise :class:`DataError`; rows are not filtered here.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{source_name}: expected a pandas DataFrame, got {type(df).__name__}")
    frame = df
    ts_col = find_column(frame.columns, COLUMN_ALIASES["timestamps"], timestamp_column)
    if timestamp_column and ts_col is None:
        raise DataError(
            f"{source_name}: timestamp column '{timestamp_column}' (config key 'csv_timestamp_column') not found; "
            f"columns are {list(map(str, frame.columns))}"
        )
    if ts_col is None and isinstance(frame.index, pd.DatetimeIndex):
        frame = frame.reset_index(names="__index_timestamps__")
        ts_col = "__index_timestamps__"
    if ts_col is None:
        raise DataError(
            f"{source_name}: no timestamp column found (looked for {', '.join(COLUMN_ALIASES['timestamps'][:6])}, "
            f"any case); columns are {list(map(str, frame.columns))}; rename one or set 'csv_timestamp_column'"
        )
    ts_values = frame[ts_col]
    if isinstance(ts_values, pd.DataFrame):
        raise DataError(f"{source_name}: timestamp column '{ts_col}' appears more than once")
    # A separate date + time pair (common in exports): join them when the chosen column is the date.
    date_key = ts_col.strip().lower() if isinstance(ts_col, str) else ""
    time_col = (
        find_column(frame.columns, ("time", "时间")) if date_key in ("date", "日期", "day", "trade_date") else None
    )
    if time_col is not None and time_col != ts_col and not timestamp_column and _is_time_of_day(frame[time_col]):
        ts_values = frame[ts_col].astype(str).str.strip() + " " + frame[time_col].astype(str).str.strip()
        ts_col = f"{ts_col}+{time_col}"

    out: dict[str, np.ndarray] = {
        "timestamps": parse_timestamps(ts_values, source_name, str(ts_col), line_offset).to_numpy()
    }
    for name in PRICE_COLUMNS:
        col = find_column(frame.columns, COLUMN_ALIASES[name])
        if col is None:
            raise DataError(
                f"{source_name}: required price column '{name}' is missing; columns are "
                f"{list(map(str, frame.columns))} (need open, high, low, close)"
            )
        out[name] = _coerce_numbers(frame[col], source_name, str(col), line_offset).to_numpy()
    vol_col = find_column(frame.columns, COLUMN_ALIASES["volume"])
    amt_col = find_column(frame.columns, COLUMN_ALIASES["amount"])
    if vol_col is None:
        # Q10: the predictor zeroes volume and amount when volume is absent; training data must match.
        logger.warning("%s: no volume column; using volume = 0 and amount = 0", source_name)
        out["volume"] = np.zeros(len(out["close"]))
        out["amount"] = np.zeros(len(out["close"]))
    else:
        out["volume"] = _coerce_numbers(frame[vol_col], source_name, str(vol_col), line_offset).to_numpy()
        if amt_col is None:
            # debug only: sources say it once per run (csv: "derived amount ... for N of M files")
            logger.debug("%s: no amount column; deriving amount = mean(open, high, low, close) x volume", source_name)
            prices = np.column_stack([out[c] for c in PRICE_COLUMNS])
            out["amount"] = derive_amount_values(prices, out["volume"])  # complete_volume_amount's rule
        else:
            out["amount"] = _coerce_numbers(frame[amt_col], source_name, str(amt_col), line_offset).to_numpy()
    return pd.DataFrame({c: out[c] for c in KLINE_COLUMNS})


def check_split_frame(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Raise DataError unless ``df`` has the split-frame columns; returns it with canonical dtypes."""
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; the dataset was written by another version, re-run the data step"
        )
    out = df[list(SPLIT_COLUMNS)].copy()
    out["symbol"] = out["symbol"].astype(str)
    out["timestamps"] = out["timestamps"].astype("datetime64[ns]")
    for c in VALUE_COLUMNS:
        out[c] = out[c].astype("float64")
    for c in TIME_FEATURES:
        out[c] = out[c].astype("int64")
    return out
