"""Request input checks of the service: bars from JSON rows or an uploaded CSV/Parquet file, and the limits.

Every problem raises :class:`kronos.errors.InputError` (a 422 for the REST API, a tool error for MCP) or
:class:`LimitError` (413 for sizes, 422 for values over a limit), each with one line naming the field and the fix.
Messages that echo user input are cut to :data:`MAX_MESSAGE_CHARS` (:func:`short`).

Hostile bodies are sized up before they are decoded: a JSON body's nesting depth is counted on the raw bytes
(:func:`json_depth`) before ``json.loads``; a Parquet upload's footer (rows, columns, types, uncompressed sizes)
is checked before any column is read, and then only the bar columns are read; a CSV upload is parsed no further
than ``max_bars + 1`` rows, after its header's field count is checked.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from kronos.data.schema import COLUMN_ALIASES, KLINE_COLUMNS, PRICE_COLUMNS, find_column, validate_kline_frame
from kronos.errors import DataError, InputError

MAX_MESSAGE_CHARS = 300
MAX_NAME_CHARS = 80  # a file name inside a message
MAX_CELL_BYTES = 256  # the longest text a bar's cell may hold (timestamps and numbers as text are far shorter)


def short(text: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as a string of at most ``limit`` characters (cut with an ellipsis): error messages that quote user
    input (a file name, a value, 10,000 column names, a JSON body) stay one short line."""
    s = str(text)
    return s if len(s) <= limit else s[: max(limit - 1, 0)] + "…"


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
    max_json_depth: int = 64  # nesting of a JSON body ({"bars": [{...}]} is 3)
    max_columns: int = 64  # columns of an uploaded CSV/Parquet file
    # a request's estimated compute time on this service (its measured speed; 0 = no cost limit)
    max_request_seconds: float = 4.0
    body_timeout_s: float = 10.0  # a client that takes longer to send its headers or body is cut off

    def to_dict(self) -> dict[str, float]:
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
        raise LimitError(short(f"{what} is {value}, over the service limit {limit_name}={bound}"), limit_name, status)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_JSON_CHUNK = 1 << 18
_OPEN, _CLOSE = (0x5B, 0x7B), (0x5D, 0x7D)  # [ {   ] }


def json_depth(data: bytes, stop_above: int | None = None) -> int:
    """The deepest nesting of arrays/objects in the UTF-8 JSON text ``data``, brackets inside strings not counted.

    Vectorised over 256 KiB chunks (an 8 MB body takes tens of milliseconds, memory stays a few MB); returns as
    soon as the depth passes ``stop_above``. For invalid JSON the number means little, and json.loads refuses it.
    """
    if data.count(b"[") + data.count(b"{") <= (stop_above if stop_above is not None else 0):
        return data.count(b"[") + data.count(b"{")  # cannot nest deeper than its number of brackets
    buf = np.frombuffer(data, dtype=np.uint8)
    depth = deepest = 0
    in_string = 0  # 1 when the chunk starts inside a string
    odd_run = 0  # 1 when the previous chunk ends in an odd run of backslashes
    for start in range(0, len(buf), _JSON_CHUNK):
        a = buf[start : start + _JSON_CHUNK]
        n = len(a)
        backslash = a == 0x5C
        idx = np.arange(n, dtype=np.int32)
        # the last non-backslash at or before i (a virtual one before the chunk carries the run's parity)
        last = np.maximum.accumulate(np.where(backslash, np.int32(-1 - odd_run), idx))
        run = np.empty(n, dtype=np.int32)  # backslashes right before i
        run[0] = odd_run
        run[1:] = idx[:-1] - last[:-1]
        quote = (a == 0x22) & ((run & 1) == 0)
        inside = (np.cumsum(quote, dtype=np.int32) + in_string) & 1  # 1 inside a string (or on its closing quote)
        outside = inside == 0
        step = ((a == _OPEN[0]) | (a == _OPEN[1])) & outside
        step = step.astype(np.int8) - (((a == _CLOSE[0]) | (a == _CLOSE[1])) & outside).astype(np.int8)
        levels = np.cumsum(step, dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        if stop_above is not None and deepest > stop_above:
            return deepest
        depth = int(levels[-1])
        in_string = int(inside[-1])
        odd_run = int(((n - 1) - last[-1]) & 1) if backslash[-1] else 0
    return deepest


def parse_json_body(raw: bytes, limits: Limits) -> Any:
    """A request's JSON body, its size and nesting depth checked before it is decoded (None when empty)."""
    check_limit(len(raw), "max_body_bytes", limits, "request body size in bytes", 413)
    if not raw:
        return None
    data = raw
    try:
        encoding = json.detect_encoding(raw)
        if encoding not in ("utf-8", "utf-8-sig"):  # UTF-16/32: scan and parse it as UTF-8
            data = raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    except UnicodeError as exc:
        raise InputError(short(f"request body is not valid JSON ({_first_line(exc)})")) from None
    depth = json_depth(data, stop_above=limits.max_json_depth)
    if depth > limits.max_json_depth:
        raise LimitError(
            f"request body nests JSON arrays/objects over the service limit max_json_depth={limits.max_json_depth} "
            '(a forecast request needs 3: {"bars": [{...}]})',
            "max_json_depth",
        )
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, integers of over 4300 digits
        raise InputError(short(f"request body is not valid JSON ({_first_line(exc)})")) from None


def frame_from_rows(rows: Any, where: str = "bars") -> pd.DataFrame:
    """Bars given as JSON rows (``[{"timestamps": ..., "open": ..., ...}]``) or columns (``{"open": [...]}``)."""
    if isinstance(rows, dict):
        try:
            table = pd.DataFrame(rows)
        except (ValueError, TypeError) as exc:
            raise InputError(short(f"{where}: columns must be lists of equal length ({_first_line(exc)})")) from None
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


def upload_label(filename: str | None, where: str = "file") -> str:
    """How messages name an upload: ``file 'k.csv'`` (a long name cut short)."""
    return f"{where} '{short(filename, MAX_NAME_CHARS)}'" if filename else where


# lower-cased column names the bars can come from (validate_kline_frame matches them case-insensitively)
_BAR_NAMES = frozenset(alias.strip().lower() for aliases in COLUMN_ALIASES.values() for alias in aliases)


def frame_from_upload(data: bytes, filename: str, where: str = "file", limits: Limits | None = None) -> pd.DataFrame:
    """A CSV or Parquet upload as a raw table (the bar columns as in the file), sized up before it is decoded.

    Over ``max_bars`` rows or ``max_columns`` columns is a 413 naming the limit; no more than that is ever parsed.
    """
    limits = limits or Limits()
    name = (filename or "").lower()
    label = upload_label(filename, where)
    if not data:
        raise InputError(f"{label} is empty; upload a CSV or Parquet file of bars")
    try:
        if name.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
            return _read_parquet(data, label, limits)
        return _read_csv(data, label, limits)
    except InputError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise InputError(short(f"{label} cannot be read as CSV/Parquet: {_first_line(exc)}")) from None


_QUOTED = re.compile(rb'"[^"]*"')
_LINE = re.compile(rb"[^\r\n]+")


def _read_csv(data: bytes, label: str, limits: Limits) -> pd.DataFrame:
    """The first ``max_bars + 1`` rows of a CSV: more is refused without parsing the rest."""
    # the header and the first row: pandas makes the first row's extra fields a (multi-)index, which for a row of
    # a million fields takes minutes; later rows with extra fields are a quick parse error
    for line in itertools.islice(_LINE.finditer(data), 2):
        fields = _QUOTED.sub(b"", line.group()).count(b",") + 1  # commas inside quotes do not separate
        check_limit(fields, "max_columns", limits, f"{label}: number of columns", 413)
    try:
        table = pd.read_csv(io.BytesIO(data), nrows=limits.max_bars + 1, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{label} is neither UTF-8 text nor Parquet; upload a UTF-8 CSV") from None
    check_limit(len(table.columns), "max_columns", limits, f"{label}: number of columns", 413)
    if len(table) > limits.max_bars:
        raise LimitError(
            f"{label}: number of bars is over the service limit max_bars={limits.max_bars}", "max_bars", 413
        )
    return table


def _bar_type(kind: Any) -> bool:
    """Whether a Parquet column of arrow type ``kind`` can hold timestamps or numbers (dictionary-encoded too)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    checks = (
        pa.types.is_integer,
        pa.types.is_floating,
        pa.types.is_decimal,
        pa.types.is_boolean,  # refused later with a message naming the row
        pa.types.is_null,
        pa.types.is_timestamp,
        pa.types.is_date,
        pa.types.is_time,  # the time of a date + time pair
        pa.types.is_string,
        pa.types.is_large_string,
        getattr(pa.types, "is_string_view", lambda _: False),
    )
    return any(check(kind) for check in checks)


def _read_parquet(data: bytes, label: str, limits: Limits) -> pd.DataFrame:
    """A Parquet upload's bar columns, read only after its footer says they fit the limits."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(pa.BufferReader(data)).metadata  # the footer only
    check_limit(meta.num_columns, "max_columns", limits, f"{label}: number of columns", 413)
    groups = [meta.row_group(i) for i in range(min(meta.num_row_groups, limits.max_bars + 1))]
    rows = max(meta.num_rows, sum(g.num_rows for g in groups))
    check_limit(rows, "max_bars", limits, f"{label}: number of bars", 413)
    check_limit(meta.num_row_groups, "max_bars", limits, f"{label}: number of row groups", 413)
    schema = meta.schema.to_arrow_schema()
    names = [str(n) for n in schema.names]
    try:
        index = [c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
    except Exception:  # metadata that is not pandas' JSON: ignore it
        index = []
    wanted = [n for n in names if n.strip().lower() in _BAR_NAMES or n in index]
    if len(set(wanted)) != len(wanted):
        raise InputError(short(f"{label}: a column name appears more than once in {wanted}; rename the copies"))
    for price in PRICE_COLUMNS:
        if find_column(wanted, COLUMN_ALIASES[price]) is None:
            raise InputError(
                short(
                    f"{label}: required price column '{price}' is missing (need timestamps, open, high, low, close); "
                    f"columns are {names}"
                )
            )
    if find_column(wanted, COLUMN_ALIASES["timestamps"]) is None and not index:
        raise InputError(
            short(
                f"{label}: no timestamp column found (looked for {', '.join(COLUMN_ALIASES['timestamps'][:6])}, "
                f"any case); columns are {names}"
            )
        )
    text = []
    for column in wanted:
        kind = schema.field(column).type
        if not _bar_type(kind):
            raise InputError(
                short(
                    f"{label}: column '{column}' has type {kind}; bars need numbers, and timestamps as "
                    "timestamps, dates or text"
                )
            )
        plain = kind.value_type if pa.types.is_dictionary(kind) else kind
        if pa.types.is_string(plain) or pa.types.is_large_string(plain):
            text.append(column)
    leaves = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    stored = sum(g.column(leaves[c]).total_uncompressed_size for g in groups for c in wanted if c in leaves)
    room = limits.max_bars * len(wanted) * MAX_CELL_BYTES + (1 << 20)
    if stored > room:
        raise LimitError(
            f"{label}: its bar columns take {stored} bytes uncompressed, more than max_bars={limits.max_bars} bars "
            f"can need ({room})",
            "max_bars",
            413,
        )
    # text columns stay dictionary-encoded until each distinct value is known to be short: a 1 MB string
    # repeated 4096 times is a few bytes in the file and 4 GB decoded
    reader = pq.ParquetFile(pa.BufferReader(data), metadata=meta, read_dictionary=text)
    table = reader.read(columns=wanted, use_threads=False, use_pandas_metadata=True)
    for i, field in enumerate(table.schema):
        if not pa.types.is_dictionary(field.type):
            continue
        column = table.column(i)
        for chunk in column.chunks:
            values = chunk.dictionary
            if (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)) and len(values):
                longest = pc.max(pc.binary_length(values)).as_py() or 0
                if longest > MAX_CELL_BYTES:
                    raise InputError(
                        short(
                            f"{label}: column '{field.name}' holds a text of {longest} bytes; a bar's cell "
                            f"takes at most {MAX_CELL_BYTES}"
                        )
                    )
        table = table.set_column(i, field.name, column.cast(field.type.value_type))
    if table.num_rows > limits.max_bars:
        raise LimitError(
            f"{label}: number of bars is {table.num_rows}, over the service limit max_bars={limits.max_bars}",
            "max_bars",
            413,
        )
    return table.to_pandas()


# prices the model can normalise in float32 without its epsilon (1e-5) swamping the spread or squares overflowing
MIN_PRICE = 1e-4
MAX_PRICE = 1e15
MAX_SIZE = 1e30  # volume and amount


def check_history(table: pd.DataFrame, limits: Limits, where: str = "bars") -> pd.DataFrame:
    """The canonical history frame (``timestamps`` + open..amount) of one request, strictly checked.

    Unlike the data pipeline (which cleans), a request with NaNs, unsorted or repeated timestamps, too few or too
    many bars is refused with one message naming the first offending row (cut to :data:`MAX_MESSAGE_CHARS`).
    """
    try:
        return _check_history(table, limits, where)
    except LimitError:
        raise
    except (InputError, DataError) as exc:
        raise InputError(short(exc)) from None


def _check_history(table: pd.DataFrame, limits: Limits, where: str) -> pd.DataFrame:
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
        raise InputError(short(exc)) from None
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
        raise InputError(short(f"horizon must be an integer >= 1, got {horizon!r}"))
    check_limit(int(horizon), "max_horizon", limits, "horizon")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise InputError(short(f"samples must be an integer >= 1, got {samples!r}"))
    check_limit(int(samples), "max_samples", limits, "samples")
    qs = list(quantiles) if quantiles is not None else []
    check_limit(len(qs), "max_quantiles", limits, "number of quantiles")
    out = []
    for q in qs:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < float(q) < 1.0:
            raise InputError(short(f"quantiles must be numbers strictly between 0 and 1, got {q!r}"))
        out.append(float(q))
    return sorted(set(out))
