"""Parsing Sina Finance's formats: stock symbols (``sh600000``) and K-line response bodies.

A JSONP body (the default endpoint) is an optional ``/*<script>location.href='//sina.com';</script>*/`` prefix,
then ``=(`` JSON ``);`` — the callback name is whatever sits before ``=`` in the URL path (empty for the default
URL, ``var _x`` for ``.../var%20_x=/...``). The plain-JSON endpoint returns the bare array.

The array holds objects whose values are strings: ``day`` (``2024-01-10`` for daily bars, ``2024-01-10 14:55:00``
for minute bars, the bar's end time), ``open``, ``high``, ``low``, ``close``, ``volume`` and, usually, ``amount``.
Unknown symbols give ``null`` (or ``=(null);``). Numbers are kept as Sina gives them: volume is in shares (not
the 100-share lots of some other feeds) and amount in yuan; a missing ``amount`` is derived later as
``volume * mean(open, high, low, close)`` (the spec's rule for an absent amount).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from kronos.data.schema import KLINE_COLUMNS, PRICE_COLUMNS, VALUE_COLUMNS, derive_amount
from kronos.errors import ConfigError, DataError

_SYMBOL_RE = re.compile(r"^(sh|sz|bj)(\d{6})$")
_SUFFIX_SYMBOL_RE = re.compile(r"^(\d{6})\.(sh|sz|bj)$")  # 600000.SH, the other common spelling
_COMMENT_RE = re.compile(r"^\s*/\*.*?\*/", re.S)
# JSONP wrapper: optional "var", optional callback name, optional "=", then "( payload )" and an optional ";".
_JSONP_RE = re.compile(r"^(?:var\s+)?(?:[A-Za-z_$][\w$.]*)?\s*=?\s*\((?P<payload>.*)\)\s*;?\s*$", re.S)
_ASSIGN_RE = re.compile(r"^(?:var\s+)?[A-Za-z_$][\w$.]*\s*=\s*(?P<payload>.*?)\s*;?\s*$", re.S)
_BARE_KEY_RE = re.compile(r"([{,]\s*)([A-Za-z_]\w*)(\s*:)")  # {day:"..."}: older Sina bodies are JS literals


# ---------------------------------------------------------------------------------------------- symbols
def normalize_symbol(symbol: Any) -> str:
    """Return ``symbol`` as Sina spells it (``sh600000``); accepts ``SH600000`` and ``600000.SH`` too.

    Raises ConfigError naming the symbol when it is not an exchange prefix (sh, sz, bj) plus six digits.
    """
    if not isinstance(symbol, str):
        raise ConfigError(f"config key 'sina_symbols': symbol {symbol!r} must be a string like 'sh600000'")
    s = symbol.strip().lower()
    m = _SUFFIX_SYMBOL_RE.match(s)
    if m:
        s = m.group(2) + m.group(1)
    if not _SYMBOL_RE.match(s):
        raise ConfigError(
            f"config key 'sina_symbols': invalid symbol '{symbol}'; use an exchange prefix (sh, sz, bj) and six "
            "digits, e.g. sh600000, sz000001, bj430047"
        )
    return s


def normalize_symbols(symbols: Iterable[Any]) -> list[str]:
    """Validate, lower-case and de-duplicate ``symbols`` keeping their order."""
    if isinstance(symbols, str):
        symbols = [s for s in re.split(r"[,\s]+", symbols) if s]
    out: list[str] = []
    for sym in symbols:
        s = normalize_symbol(sym)
        if s not in out:
            out.append(s)
    if not out:
        raise ConfigError("config key 'sina_symbols' is empty; list at least one symbol, e.g. [\"sh600000\"]")
    return out


# ---------------------------------------------------------------------------------------------- parsing
def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Older Sina bodies are JavaScript literals with unquoted keys: {day:"2024-01-10",open:"6.57"}.
        return json.loads(_BARE_KEY_RE.sub(r'\1"\2"\3', text))


def _extract_payload(text: str) -> str:
    """Strip the anti-embedding comment and a JSONP wrapper, returning the JSON text inside."""
    s = text.lstrip("\ufeff").strip()
    while True:  # the /*<script>location.href='//sina.com';</script>*/ prefix (possibly repeated)
        m = _COMMENT_RE.match(s)
        if not m:
            break
        s = s[m.end() :].strip()
    if not s or s[0] in '[{"' or s.startswith("null"):
        return s.rstrip(";").strip()
    m = _JSONP_RE.match(s)
    if m:
        return m.group("payload").strip()
    m = _ASSIGN_RE.match(s)  # var _x=[...]; without parentheses
    if m:
        return m.group("payload").strip()
    return s


def parse_kline_body(text: str, symbol: str, url: str = "", max_bars: int | None = None) -> pd.DataFrame:
    """Parse one Sina response body (JSONP or plain JSON) into a canonical K-line frame.

    Columns: ``timestamps`` (datetime64[ns], sorted, unique) and ``open, high, low, close, volume, amount``
    (float64; ``amount`` is NaN where Sina omitted it). Raises DataError naming ``symbol`` for HTML pages,
    malformed bodies, ``null`` (unknown symbol), empty arrays and more than ``max_bars`` bars (the requested
    ``datalen``: a server that ignores it is not trusted).
    """
    where = f" from {url}" if url else ""
    s = _extract_payload(text)
    if not s:
        raise DataError(f"Sina returned an empty body for symbol '{symbol}'{where}")
    if s.startswith("<"):
        title = re.search(r"<title[^>]*>(.*?)</title>", s, re.S | re.I)
        hint = f" ('{title.group(1).strip()[:60]}')" if title else ""
        raise DataError(
            f"Sina returned an HTML page{hint} instead of K-line data for symbol '{symbol}'{where}; "
            "the request was probably blocked or the URL (sina_base_url) is wrong"
        )
    try:
        data = _load_json(s)
    except (json.JSONDecodeError, ValueError):
        snippet = " ".join(s.split())[:80]
        raise DataError(f"Sina returned a malformed body for symbol '{symbol}'{where}: '{snippet}'") from None
    if data is None:
        raise DataError(
            f"Sina has no data for symbol '{symbol}' (body 'null'){where}; check that the symbol exists and is listed"
        )
    if not isinstance(data, list):
        raise DataError(f"Sina returned a {type(data).__name__} instead of a list of bars for symbol '{symbol}'{where}")
    if not data:
        raise DataError(f"Sina returned no bars (empty list) for symbol '{symbol}'{where}")
    if max_bars is not None and len(data) > max_bars:
        raise DataError(
            f"Sina returned {len(data)} bars for symbol '{symbol}', more than the {max_bars} requested "
            f"(config key 'sina_datalen'){where}; the server ignores datalen and its answer is not used"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"Sina bar {i} for symbol '{symbol}' is not an object but {row!r:.60}{where}")
    raw = pd.DataFrame.from_records(data)
    missing = [c for c in ("day",) + PRICE_COLUMNS + ("volume",) if c not in raw.columns]
    if missing:
        raise DataError(f"Sina bars for symbol '{symbol}' lack field(s) {', '.join(missing)}{where}")

    out = {}
    try:
        ts = pd.to_datetime(raw["day"].astype(str), format="ISO8601")
    except (ValueError, TypeError):
        bad = next((i for i, v in enumerate(raw["day"]) if pd.isna(pd.to_datetime(str(v), errors="coerce"))), 0)
        raise DataError(
            f"Sina bar {bad} for symbol '{symbol}' has an unreadable day {raw['day'].iloc[bad]!r}{where}"
        ) from None
    out["timestamps"] = ts.astype("datetime64[ns]")
    for col in VALUE_COLUMNS:
        if col not in raw.columns:
            out[col] = pd.Series(np.nan, index=raw.index, dtype="float64")
            continue
        values = pd.to_numeric(raw[col], errors="coerce").astype("float64")
        # amount may be missing or empty on some rows; the other fields must all be numbers.
        given = raw[col].notna() & (raw[col].astype(str).str.strip() != "") if col == "amount" else True
        bad_rows = values.isna() & given
        if bad_rows.any():
            i = int(np.flatnonzero(bad_rows.to_numpy())[0])
            raise DataError(
                f"Sina bar {i} ({raw['day'].iloc[i]}) for symbol '{symbol}' has a non-numeric {col} "
                f"{raw[col].iloc[i]!r}{where}"
            )
        out[col] = values
    frame = pd.DataFrame(out, columns=list(KLINE_COLUMNS))
    frame = frame.sort_values("timestamps", kind="stable").drop_duplicates("timestamps", keep="last")
    return frame.reset_index(drop=True)


def fill_missing_amount(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with NaN ``amount`` set to ``volume * mean(open, high, low, close)`` (spec step 2)."""
    missing = frame["amount"].isna()
    if not missing.any():
        return frame
    derived = derive_amount(frame)
    return frame.assign(amount=frame["amount"].where(~missing, derived))
