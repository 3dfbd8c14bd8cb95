"""Request input checks of the service: bars from JSON rows or an uploaded CSV/Parquet file, and the limits.

Every problem raises :class:`kronos.errors.InputError` (a 422 for the REST API, a tool error for MCP) or
:class:`LimitError` (413 for sizes, 422 for values over a limit), each with one line naming the field and the fix.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from kronos.data.schema import KLINE_COLUMNS, validate_kline_frame
from kronos.errors import DataError, InputError


@dataclass
class Limits:
    """Request limits; each error names the limit it hit (e.g. ``max_horizon=256``)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_bars: int = 4096
    min_bars: int = 8
    max_horizon: int = 256
    max_samples: int = 64
    max_batch_series: int = 32
    max_quantiles: int = 9
    max_queue: int = 256

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LimitError(InputError):
    """A request is over one of the service's :class:`Limits`; ``status`` is 413 (size) or 422 (value)."""

    def __init__(self, message: str, limit: str, status: int = 422) -> None:
        super().__init__(message)
        self.limit = limit
        self.status = status


def check_limit(value: int, limit_name: str, limits: Limits, what: str, status: int = 422) -> None:
    bound = getattr(limits, limit_name)
    if value > bound:
        raise LimitError(f"{what} is {value}, over the service limit {limit_name}={bound}", limit_name, status)


def frame_from_rows(rows: Any, where: str = "bars") -> pd.DataFrame:
    """Bars given as JSON rows (``[{"timestamps": ..., "open": ..., ...}]``) or columns (``{"open": [...]}``)."""
    if isinstance(rows, dict):
        try:
            table = pd.DataFrame(rows)
        except ValueError as exc:
            raise InputError(f"{where}: columns must be lists of equal length ({exc})") from None
    elif isinstance(rows, list):
        if not all(isinstance(r, dict) for r in rows):
            raise InputError(
                f"{where}: each row must be an object like "
                '{"timestamps": "2024-01-02 09:35", "open": 1.0, "high": 1.1, "low": 0.9, "close": 1.0}'
            )
        table = pd.DataFrame.from_records(rows)
    else:
        raise InputError(f"{where}: give a list of rows (objects) or an object of columns, got {type(rows).__name__}")
    return table


def frame_from_upload(data: bytes, filename: str, where: str = "file") -> pd.DataFrame:
    """A CSV or Parquet upload as a raw table (columns as in the file)."""
    name = (filename or "").lower()
    label = f"{where} '{filename}'" if filename else where
    if not data:
        raise InputError(f"{label} is empty; upload a CSV or Parquet file of bars")
    try:
        if name.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
            return pd.read_parquet(io.BytesIO(data), engine="pyarrow")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"{label} is neither UTF-8 text nor Parquet; upload a UTF-8 CSV") from None
        return pd.read_csv(io.StringIO(text))
    except InputError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{label} cannot be read as CSV/Parquet: {msg}") from None


# prices the model can normalise in float32 without its epsilon (1e-5) swamping the spread or squares overflowing
MIN_PRICE = 1e-4
MAX_PRICE = 1e15
MAX_SIZE = 1e30  # volume and amount


def check_history(table: pd.DataFrame, limits: Limits, where: str = "bars") -> pd.DataFrame:
    """The canonical history frame (``timestamps`` + open..amount) of one request, strictly checked.

    Unlike the data pipeline (which cleans), a request with NaNs, unsorted or repeated timestamps, too few or too
    many bars is refused with one message naming the first offending row.
    """
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise InputError(f"{where}: no bars given; send at least {limits.min_bars} rows")
    check_limit(len(table), "max_bars", limits, f"{where}: number of bars", 413)
    for name in KLINE_COLUMNS[1:]:  # true/false are not prices (pandas would read them as 1/0)
        if name in table.columns:
            given = table[name]
            flags = given.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(dtype=bool)
            if flags.any():
                first = int(np.flatnonzero(flags)[0])
                raise InputError(f"{where}: column '{name}' holds {given.iloc[first]!r} at row {first}; send numbers")
    try:
        frame = validate_kline_frame(table, where)
    except DataError as exc:
        raise InputError(str(exc)) from None
    values = frame[list(KLINE_COLUMNS[1:])].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise InputError(
            f"{where}: column '{KLINE_COLUMNS[1 + col]}' has a missing or infinite value at row {row}; "
            "fill or drop such rows"
        )
    prices = values[:, :4]
    out_of_range = (prices < MIN_PRICE) | (prices > MAX_PRICE)
    if out_of_range.any():
        row, col = (int(v[0]) for v in np.nonzero(out_of_range))
        raise InputError(
            f"{where}: column '{KLINE_COLUMNS[1 + col]}' is {prices[row, col]:g} at row {row}; prices must lie in "
            f"[{MIN_PRICE:g}, {MAX_PRICE:g}] (scale them, e.g. quote per million units, and scale the forecast back)"
        )
    size = values[:, 4:]
    if ((size < 0) | (size > MAX_SIZE)).any():
        row, col = (int(v[0]) for v in np.nonzero((size < 0) | (size > MAX_SIZE)))
        raise InputError(
            f"{where}: column '{KLINE_COLUMNS[5 + col]}' is {size[row, col]:g} at row {row}; it must lie in "
            f"[0, {MAX_SIZE:g}]"
        )
    crossed = values[:, 1] < values[:, 2]  # high < low
    if crossed.any():
        row = int(np.flatnonzero(crossed)[0])
        raise InputError(
            f"{where}: high {values[row, 1]:g} is below low {values[row, 2]:g} at row {row}; fix or drop that bar"
        )
    ts = frame["timestamps"]
    if ts.isna().any():
        raise InputError(f"{where}: timestamp missing at row {int(np.flatnonzero(ts.isna().to_numpy())[0])}")
    stamps = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    if len(stamps) > 1:
        steps = np.diff(stamps)
        if (steps == 0).any():
            i = int(np.flatnonzero(steps == 0)[0]) + 1
            raise InputError(f"{where}: duplicate timestamp {ts.iloc[i]} at rows {i - 1} and {i}; send each bar once")
        if (steps < 0).any():
            i = int(np.flatnonzero(steps < 0)[0]) + 1
            raise InputError(
                f"{where}: timestamps are not sorted: row {i} ({ts.iloc[i]}) comes before row {i - 1} "
                f"({ts.iloc[i - 1]}); sort the bars oldest first"
            )
    if len(frame) < limits.min_bars:
        raise InputError(f"{where}: only {len(frame)} bars; a forecast needs at least min_bars={limits.min_bars}")
    return frame


def check_settings(horizon: Any, samples: Any, quantiles: Sequence[Any] | None, limits: Limits) -> list[float]:
    """Check horizon/sample/quantile values against the limits; returns the quantiles as floats."""
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise InputError(f"horizon must be an integer >= 1, got {horizon!r}")
    check_limit(int(horizon), "max_horizon", limits, "horizon")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise InputError(f"samples must be an integer >= 1, got {samples!r}")
    check_limit(int(samples), "max_samples", limits, "samples")
    qs = list(quantiles) if quantiles is not None else []
    check_limit(len(qs), "max_quantiles", limits, "number of quantiles")
    out = []
    for q in qs:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < float(q) < 1.0:
            raise InputError(f"quantiles must be numbers strictly between 0 and 1, got {q!r}")
        out.append(float(q))
    return sorted(set(out))
