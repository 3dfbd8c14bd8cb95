"""CSV/Parquet source: K-lines of any market and frequency from files (config key ``csv_data_path``).

``csv_data_path`` may be
- one file of one symbol (the symbol is the file name without extension),
- a folder of such files (``.csv``, ``.csv.gz``, ``.parquet``, ``.pq``; one symbol per file), or
- a long file (or folder of long files) with a symbol column: ``csv_symbol_column``, or the first of
  symbol/code/ticker/instrument/stock_code found.
Columns are matched case-insensitively with aliases (see :data:`kronos.data.schema.COLUMN_ALIASES`); a missing
volume gives volume = amount = 0 and a missing amount is derived as mean(OHLC) x volume (said once per run).
Yahoo-style files (``Date, Open, High, Low, Close, Adj Close, Volume``) are read as they are; with config key
``adjust: adj_close`` open/high/low/close are scaled row by row by ``Adj Close / Close`` (split- and
dividend-adjusted prices; volume and amount stay as traded). All rows of the files are
used (``dataset_begin_time``/``dataset_end_time`` apply to Qlib only); choose the rows per split with the
``*_time_range`` keys or ``split_ratios``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from kronos.data.schema import (
    ADJ_CLOSE_ALIASES,
    COLUMN_ALIASES,
    PRICE_COLUMNS,
    SYMBOL_ALIASES,
    find_column,
    validate_kline_frame,
)
from kronos.data.sources.base import BaseDataProcessor
from kronos.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in CSV_SUFFIXES + PARQUET_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_table(
    path: Path, symbol_column: str = "", columns: list[str] | None = None, header: list[str] | None = None
) -> pd.DataFrame:
    """Read one CSV or Parquet file; DataError naming the file when it cannot be read.

    In CSV files the symbol column is read as text so codes such as ``000001`` keep their leading zeros.
    ``columns``: read only these; ``header``: the file's column names when already known (else read first).
    """
    kind = _kind(path)
    try:
        if kind == "parquet":
            return pd.read_parquet(path, columns=columns)
        if header is None:
            header = list(_read_csv(path, nrows=0).columns)
        sym = find_column(header, SYMBOL_ALIASES, symbol_column)
        return _read_csv(path, dtype={sym: str} if sym is not None else None, usecols=columns)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"file '{path}' is empty") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read file '{path}': {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # pyarrow raises its own types for damaged Parquet files
        raise DataError(f"cannot read file '{path}': {type(exc).__name__}: {exc}") from None


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except UnicodeDecodeError:
        # Chinese exports are often GBK-encoded
        try:
            return pd.read_csv(path, encoding="gb18030", **kwargs)
        except UnicodeDecodeError:
            raise DataError(f"file '{path}' is neither UTF-8 nor GBK text; save it as UTF-8 CSV") from None


def read_kline_file(path: str | os.PathLike, symbol: str = "", timestamp_column: str = "") -> pd.DataFrame:
    """One symbol's bars from a CSV/Parquet file, cleaned and sorted (e.g. the history for a forecast).

    Returns the canonical raw frame (``timestamps`` + six float64 values). A file with a symbol column holding
    several symbols needs ``symbol``. Duplicate timestamps keep the last row; rows with missing or impossible
    values are dropped with a warning. DataError when the file is unusable or nothing is left.
    """
    from kronos.data.processing import clean_kline_frame

    file = Path(path).expanduser()
    if file.is_dir():
        raise DataError(
            f"K-line file '{file}' is a folder; pass one CSV/Parquet file (a folder of files is "
            "data_source csv with csv_data_path)"
        )
    if not file.is_file():
        raise DataError(f"K-line file '{file}' does not exist")
    if _kind(file) is None:
        raise DataError(f"K-line file '{file}' is not CSV or Parquet ({', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)})")
    table = read_table(file)
    where = f"file '{file}'"
    if table.empty:
        raise DataError(f"{where} has no rows")
    frame = validate_kline_frame(
        table, where, timestamp_column=timestamp_column, line_offset=2 if _kind(file) == "csv" else None
    )
    if _derives_amount(table):
        logger.info("%s: no amount column; derived amount = volume x mean(open, high, low, close)", where)
    sym_col = find_column(table.columns, SYMBOL_ALIASES)
    if sym_col is not None:
        codes = table[sym_col].astype(str).str.strip().reset_index(drop=True)
        if symbol:
            if not (codes == symbol).any():
                known = codes.drop_duplicates()
                raise DataError(
                    f"{where}: symbol '{symbol}' not found in column '{sym_col}'; it holds {len(known)}: "
                    f"{', '.join(known.iloc[:5])}{', ...' if len(known) > 5 else ''}"
                )
            frame = frame[(codes == symbol).to_numpy()]
        elif codes.nunique() > 1:
            raise DataError(
                f"{where} holds {codes.nunique()} symbols in column '{sym_col}' (e.g. "
                f"{', '.join(repr(c) for c in codes.drop_duplicates().iloc[:3])}); pick one with "
                f"`kronos forecast --symbol {codes.iloc[0]}` (symbol= in Python)"
            )
    clean, stats = clean_kline_frame(frame, str(file))
    dropped = stats.rows_in - stats.rows_out
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows (%d duplicate timestamps, %d missing values, %d impossible bars)",
            where,
            dropped,
            stats.rows_in,
            stats.duplicates,
            stats.missing,
            stats.impossible,
        )
    if clean.empty:
        raise DataError(f"{where}: no usable rows left after dropping missing and impossible values")
    return clean


def _derives_amount(table: pd.DataFrame) -> bool:
    """Whether a file's amount is derived: it has a volume column but no amount column."""
    cols = table.columns
    return (
        find_column(cols, COLUMN_ALIASES["volume"]) is not None and find_column(cols, COLUMN_ALIASES["amount"]) is None
    )


def adjust_prices(frame: pd.DataFrame, table: pd.DataFrame, where: str) -> pd.DataFrame:
    """``frame``'s open/high/low/close scaled by ``Adj Close / Close`` of ``table`` row by row (same row order).

    Rows whose factor is missing or not positive keep NaN prices (cleaning drops them and says so).
    """
    col = find_column(table.columns, ADJ_CLOSE_ALIASES)
    if col is None:
        raise DataError(
            f"{where} has no 'Adj Close' column, which config key 'adjust: adj_close' needs; columns are "
            f"{list(map(str, table.columns))}; set adjust to none or add the column"
        )
    adj = pd.to_numeric(table[col], errors="coerce").astype("float64").reset_index(drop=True)
    factor = adj / frame["close"]
    factor = factor.where(factor > 0)
    return frame.assign(**{c: frame[c] * factor for c in PRICE_COLUMNS})


class CsvDataProcessor(BaseDataProcessor):
    """K-lines from CSV/Parquet files; see the module docstring for the accepted layouts."""

    name = "csv"

    def files(self) -> list[Path]:
        """The data files ``csv_data_path`` names (one file, or the data files of a folder, sorted)."""
        raw = self.config.csv_data_path
        if not raw:
            raise ConfigError("config key 'csv_data_path' is empty; set it to a CSV/Parquet file or a folder of them")
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(
                f"csv_data_path '{path}' does not exist; set config key 'csv_data_path' to a file or folder"
            )
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _kind(p))
            if not files:
                raise DataError(
                    f"folder '{path}' (csv_data_path) holds no data files; expected "
                    f"{', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}"
                )
            return files
        if _kind(path) is None:
            raise DataError(
                f"file '{path}' (csv_data_path) is not CSV or Parquet; expected one of "
                f"{', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}"
            )
        return [path]

    streams = True

    def load_raw(self) -> dict[str, pd.DataFrame]:
        return self.load_symbols(self.list_symbols())

    def list_symbols(self) -> list[str]:
        """Every symbol of the files: file names, and the symbol columns of long files (only that column read)."""
        cfg = self.config
        files = self.files()
        origin: dict[str, list[tuple[Path, bool]]] = {}  # symbol -> (file, whether the file is that one symbol's)
        adjusted = unused_adj = derived = 0  # files, for one summary line each
        self._headers: dict[Path, list[str]] = {}
        for file in files:
            columns = self._headers[file] = _columns(file)
            where = f"file '{file}'"
            sym_col = find_column(columns, SYMBOL_ALIASES, cfg.csv_symbol_column)
            if cfg.csv_symbol_column and sym_col is None:
                raise DataError(
                    f"{where}: symbol column '{cfg.csv_symbol_column}' (config key 'csv_symbol_column') not found; "
                    f"columns are {list(map(str, columns))}"
                )
            has_adj = find_column(columns, ADJ_CLOSE_ALIASES) is not None
            if cfg.adjust == "adj_close":
                adjusted += 1
            elif has_adj:
                unused_adj += 1
            if find_column(columns, COLUMN_ALIASES["volume"]) is not None and (
                find_column(columns, COLUMN_ALIASES["amount"]) is None
            ):
                derived += 1
            if sym_col is None:
                origin.setdefault(_stem(file), []).append((file, True))
                continue
            codes = _symbol_codes(read_table(file, cfg.csv_symbol_column, columns=[sym_col], header=columns)[sym_col])
            found = codes.dropna().drop_duplicates()
            if found.empty:
                raise DataError(f"{where}: column '{sym_col}' holds no symbols")
            for symbol in found:
                origin.setdefault(str(symbol), []).append((file, False))
        for symbol, where_from in origin.items():
            # a long export split over several files is one symbol's history in parts; a file named after the
            # symbol next to another source of the same symbol is two copies (e.g. AAA.csv and AAA.parquet)
            if len(where_from) > 1 and any(own for _, own in where_from):
                names = " and ".join(f"'{f}'" for f, _ in where_from)
                raise DataError(
                    f"symbol '{symbol}' comes from more than one file: {names}; keep one of them in "
                    "csv_data_path (they would be merged silently)"
                )
        self._origin = {symbol: [f for f, _ in where_from] for symbol, where_from in origin.items()}
        self._order = {f: i for i, f in enumerate(files)}
        self.source_info.update({"path": str(Path(cfg.csv_data_path).expanduser()), "files": [str(f) for f in files]})
        self.source_info["adjust"] = cfg.adjust
        logger.info("csv: %d symbol(s) from %d file(s)", len(origin), len(files))
        if derived:
            logger.info("csv: derived amount = volume x average price for %d of %d file(s)", derived, len(files))
        if adjusted:
            logger.info(
                "csv: open/high/low/close scaled by Adj Close / Close in %d of %d file(s)", adjusted, len(files)
            )
        if unused_adj:
            logger.info(
                "csv: %d of %d file(s) have an 'Adj Close' column, not used (adjust: none); set adjust: adj_close "
                "for split/dividend-adjusted prices",
                unused_adj,
                len(files),
            )
        return sorted(origin)

    def load_symbols(self, symbols: list[str]) -> dict[str, pd.DataFrame]:
        """The bars of ``symbols``: only the files that hold them are read, one at a time (the last long file
        read is kept for the next chunk, which usually needs it too)."""
        if getattr(self, "_origin", None) is None:
            self.list_symbols()
        wanted = set(symbols)
        files = sorted({f for s in symbols for f in self._origin.get(s, [])}, key=self._order.__getitem__)
        pieces: dict[str, list[pd.DataFrame]] = {}
        for file in files:
            frame, codes = self._read(file)
            if codes is None:
                pieces.setdefault(_stem(file), []).append(frame)
                continue
            keep = codes.notna().to_numpy() & codes.isin(wanted).to_numpy()
            for symbol, idx in frame[keep].groupby(codes[keep], sort=True).groups.items():
                pieces.setdefault(str(symbol), []).append(frame.loc[idx].reset_index(drop=True))
        return {
            symbol: parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
            for symbol, parts in sorted(pieces.items())
        }

    def _read(self, file: Path) -> tuple[pd.DataFrame, pd.Series | None]:
        """One file's canonical frame and its symbol codes (None: the file is one symbol's)."""
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] == file:
            return cached[1], cached[2]
        self._cache = None
        cfg = self.config
        table = read_table(file, cfg.csv_symbol_column, header=getattr(self, "_headers", {}).get(file))
        where = f"file '{file}'"
        if table.empty:
            raise DataError(f"{where} has no rows")
        line_offset = 2 if _kind(file) == "csv" else None  # header line + 1-based lines
        sym_col = find_column(table.columns, SYMBOL_ALIASES, cfg.csv_symbol_column)
        frame = validate_kline_frame(table, where, timestamp_column=cfg.csv_timestamp_column, line_offset=line_offset)
        if cfg.adjust == "adj_close":
            frame = adjust_prices(frame, table, where)
        if sym_col is None:
            return frame, None
        codes = _symbol_codes(table[sym_col].reset_index(drop=True))
        missing = int(codes.isna().sum())
        if missing:
            logger.warning("%s: %d row(s) without a symbol in column '%s' are ignored", where, missing, sym_col)
        self._cache = (file, frame, codes)
        return frame, codes


def _columns(path: Path) -> list[str]:
    """A data file's column names (its header or Parquet schema only)."""
    try:
        if _kind(path) == "parquet":
            import pyarrow.parquet as pq

            return [str(c) for c in pq.read_schema(path).names if not str(c).startswith("__index_level_")]
        return [str(c) for c in _read_csv(path, nrows=0).columns]
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"file '{path}' is empty") from None
    except Exception as exc:  # pyarrow raises its own types for damaged Parquet files
        raise DataError(f"cannot read file '{path}': {type(exc).__name__}: {exc}") from None


def _symbol_codes(column: pd.Series) -> pd.Series:
    """A symbol column as stripped text (NaN stays missing)."""
    missing = column.isna()
    return column.astype(str).str.strip().where(~missing)


__all__ = ["CsvDataProcessor", "read_table", "read_kline_file"]
