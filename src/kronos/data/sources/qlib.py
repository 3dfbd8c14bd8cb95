"""Qlib source: daily bars of an instrument pool (e.g. csi300) from a local Qlib data folder.

Needs pyqlib (``pip install pyqlib``, or the ``qlib`` extra: ``pip install 'kronos-kline[qlib]'``). Follows the
official ``qlib_data_preprocess.py``: the time range
``dataset_begin_time .. dataset_end_time`` is widened by ``lookback_window`` trading days before and
``predict_window`` trading days after (on the Qlib calendar), fields ``$open $high $low $close $volume`` are
read, and ``amount`` is derived as mean(OHLC) x volume unless the data folder has an ``amount`` field.

Pool membership: unlike the official script, which takes every row of every symbol that was a member at any
time, a symbol's rows are kept only inside its membership spans (``instruments/<pool>.txt``), each span
widened by ``lookback_window`` trading days before its start. Training then sees a stock only while it was in
the pool (no look-ahead in the choice of stocks), and a window whose predicted part starts at the first day of
membership still has a full lookback of history. Spans of one symbol are concatenated, as are the bars around
a suspension, so a window may straddle such a gap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kronos import io as kio
from kronos.data.processing import Bars
from kronos.data.schema import VALUE_COLUMNS, derive_amount_values
from kronos.data.sources.base import BaseDataProcessor
from kronos.errors import DataError, DependencyError

logger = logging.getLogger(__name__)

FIELDS = ("open", "high", "low", "close", "volume")
FREQ = "day"


def _missing_qlib(detail: str) -> DependencyError:
    return DependencyError(
        f"the Qlib data source needs pyqlib, which is not installed ({detail}); run: pip install pyqlib"
    )


def require_qlib() -> None:
    """Raise DependencyError unless pyqlib is installed (without paying for its slow import)."""
    try:
        found = importlib.util.find_spec("qlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing_qlib("no module named 'qlib'")


def import_qlib() -> Any:
    """Import pyqlib or raise DependencyError with the install command."""
    try:
        import qlib  # noqa: F401  (the top-level pyqlib package, not this module)
        from qlib.data import D  # noqa: F401
    except ImportError as exc:
        raise _missing_qlib(str(exc)) from None
    return qlib


def check_provider(provider: Path, instrument: str = "") -> None:
    """Raise DataError naming the path unless ``provider`` looks like a Qlib data folder with ``instrument``."""
    if not provider.is_dir():
        raise DataError(
            f"Qlib data folder '{provider}' (config key 'qlib_data_path') does not exist; download the Qlib data "
            "or point qlib_data_path at it"
        )
    calendar = provider / "calendars" / f"{FREQ}.txt"
    if not calendar.is_file() or calendar.stat().st_size == 0:
        raise DataError(
            f"Qlib data folder '{provider}' has no calendar '{calendar}'; is qlib_data_path the folder that holds "
            "calendars/, instruments/ and features/?"
        )
    if not (provider / "features").is_dir():
        raise DataError(f"Qlib data folder '{provider}' has no 'features' folder; check config key 'qlib_data_path'")
    if instrument:
        pool = provider / "instruments" / f"{instrument.lower()}.txt"
        if not pool.is_file():
            known = sorted(p.stem for p in (provider / "instruments").glob("*.txt"))
            raise DataError(
                f"instrument pool '{instrument}' not found: '{pool}' does not exist; set config key 'instrument' to "
                f"one of {known or 'the pools in instruments/'}"
            )


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kronos" / "qlib-views"


def lowercase_view(provider: Path) -> Path:
    """The folder pyqlib should read: ``provider`` itself, or a view of it with lower-case feature names.

    pyqlib looks for ``features/<symbol in lower case>/<field>.day.bin``; some public dumps write the symbol
    folders (or field files) in upper case, which pyqlib then silently misses ("0 symbols"). For such a folder a
    view of symbolic links with lower-case names is built once in the user's cache (the data is not copied) and
    reused while the folder's list of symbols is unchanged.
    """
    features = provider / "features"
    folders = sorted(p for p in features.iterdir() if p.is_dir())

    def needs_view(folder: Path) -> bool:
        return folder.name != folder.name.lower() or any(f.name != f.name.lower() for f in folder.iterdir())

    if not any(needs_view(f) for f in folders[:50]) and not any(f.name != f.name.lower() for f in folders):
        return provider
    seen: dict[str, str] = {}
    for f in folders:
        other = seen.setdefault(f.name.lower(), f.name)
        if other != f.name:
            raise DataError(f"Qlib data folder '{features}' holds both '{other}' and '{f.name}'; keep one of them")
    key = hashlib.sha1("\n".join([str(provider)] + [f.name for f in folders]).encode()).hexdigest()[:16]
    view = _cache_root() / key
    if (view / ".complete").is_file():
        return view

    def fill(tmp: Path) -> None:
        (tmp / "features").mkdir(parents=True)
        for sub in ("calendars", "instruments"):
            os.symlink(provider / sub, tmp / sub)
        for folder in folders:
            dest = tmp / "features" / folder.name.lower()
            dest.mkdir()
            for f in folder.iterdir():
                os.symlink(f, dest / f.name.lower())
        (tmp / ".complete").write_text(str(provider) + "\n")

    try:
        kio.write_folder(view, fill)
    except OSError as exc:
        raise DataError(
            f"Qlib data folder '{features}' has upper-case symbol folders or field files, which pyqlib does not "
            f"find, and a lower-case view could not be made ({exc}); rename them to lower case, e.g. in that folder: "
            'for d in *; do mv "$d" "$(echo $d | tr A-Z a-z)"; done'
        ) from None
    logger.info("qlib: '%s' has upper-case feature names; reading it through a lower-case view in %s", features, view)
    return view


def init_qlib(provider_uri: str) -> Path:
    """Initialise Qlib for ``provider_uri`` (region cn) quietly, unless it is already set up on that folder.

    Whoever initialised Qlib in this process (this module, the backtest, user code), a second call for the same
    provider costs nothing; a different provider re-initialises it. Returns the folder pyqlib reads (see
    :func:`lowercase_view`).
    """
    provider = Path(provider_uri).expanduser().resolve()
    check_provider(provider)
    provider = lowercase_view(provider)
    if current_qlib_provider() == str(provider):
        return provider
    qlib = import_qlib()
    try:
        qlib.init(provider_uri=str(provider), region="cn", kernels=1, logging_level=logging.ERROR)
    except Exception as exc:  # qlib raises assorted types for a broken setup
        raise DataError(f"Qlib could not be initialised on '{provider}': {type(exc).__name__}: {exc}") from None
    return provider


def current_qlib_provider() -> str | None:
    """The folder Qlib is initialised on in this process, or None (not initialised / not imported)."""
    if "qlib" not in sys.modules or sys.modules["qlib"] is None:
        return None
    try:
        from qlib.config import C

        if not C.registered:
            return None
        uri = C["provider_uri"]
        uri = next(iter(uri.values())) if isinstance(uri, dict) and uri else uri
        return str(Path(str(uri)).expanduser().resolve())
    except Exception:  # unexpected Qlib internals: initialise again to be safe
        return None


class QlibDataProcessor(BaseDataProcessor):
    """Daily K-lines of ``config.instrument`` from the Qlib folder ``config.qlib_data_path``."""

    name = "qlib"

    streams = True

    def load_raw(self) -> Bars:
        return self.load_symbols(self.list_symbols())

    def list_symbols(self) -> list[str]:
        """The pool's members in the time range (calendar and instruments through pyqlib; no bars read)."""
        cfg = self.config
        provider = Path(cfg.qlib_data_path).expanduser().resolve()
        require_qlib()
        check_provider(provider, cfg.instrument)
        provider = init_qlib(str(provider))
        from qlib.data import D

        try:
            calendar = pd.DatetimeIndex(D.calendar(freq=FREQ))
        except Exception as exc:
            raise DataError(f"cannot read the Qlib calendar of '{provider}': {exc}") from None
        if len(calendar) == 0:
            raise DataError(f"the Qlib calendar of '{provider}' is empty")
        start, end = self._time_range(calendar, provider)

        try:
            members = D.list_instruments(D.instruments(cfg.instrument), start_time=start, end_time=end, as_list=False)
        except Exception as exc:
            raise DataError(f"cannot read instrument pool '{cfg.instrument}' of '{provider}': {exc}") from None
        if not members:
            raise DataError(
                f"instrument pool '{cfg.instrument}' in '{provider / 'instruments'}' has no members between "
                f"{start.date()} and {end.date()}; check dataset_begin_time/dataset_end_time"
            )
        symbols = sorted(members)
        has_amount = all((provider / "features" / s.lower() / f"amount.{FREQ}.bin").is_file() for s in symbols)
        self._plan = (provider, calendar, start, end, members, has_amount)
        logger.info(
            "qlib: %d symbols of pool '%s' between %s and %s%s",
            len(symbols),
            cfg.instrument,
            start.date(),
            end.date(),
            "" if has_amount else "; amount = mean(OHLC) x volume",
        )
        self.source_info.update(
            {
                "provider_uri": str(provider),
                "instrument": cfg.instrument,
                "freq": FREQ,
                "load_start": start.isoformat(),
                "load_end": end.isoformat(),
                "amount": "field" if has_amount else "mean(OHLC) x volume",
                "membership": f"spans from instruments/{cfg.instrument.lower()}.txt, widened by lookback_window "
                f"({cfg.lookback_window}) trading days before each span start",
            }
        )
        return symbols

    def load_symbols(self, symbols: list[str]) -> Bars:
        """The bars of ``symbols`` (members listed by :meth:`list_symbols`), as a mapping of raw frames.

        Each field is read through pyqlib's feature storage (the provider's ``FeatureD`` backend; the plain
        ``$open`` etc. the expression engine ``D.features`` would load, without its per-expression overhead): the
        same rows (the calendar days of any field between the load start and end) and values (float32 widened to
        float64)."""
        if not symbols:
            return Bars.empty()
        if getattr(self, "_plan", None) is None:
            self.list_symbols()
        provider, calendar, start, end, members, has_amount = self._plan
        from qlib.data.data import FeatureD
        from qlib.utils import code_to_fname

        fields = list(FIELDS) + (["amount"] if has_amount else [])
        first = int(calendar.searchsorted(start))
        last = int(calendar.searchsorted(end, side="right")) - 1
        days = calendar.to_numpy(dtype="datetime64[ns]").view("int64")
        lookback = self.config.lookback_window
        names: list[str] = []
        lengths: list[int] = []
        times: list[np.ndarray] = []
        values: list[np.ndarray] = []
        suspended = 0
        for symbol in symbols:
            try:
                blocks = [
                    _read_field(FeatureD.backend_obj(instrument=code_to_fname(symbol), field=f, freq=FREQ), first, last)
                    for f in fields
                ]
            except Exception as exc:  # pyqlib and NumPy raise assorted types for a broken file
                raise DataError(
                    f"Qlib could not read features from '{provider}': {type(exc).__name__}: {exc}"
                ) from None
            found = [b for b in blocks if b is not None]
            if not found:
                self.skipped_symbols[symbol] = f"no Qlib data between {start.date()} and {end.date()}"
                continue
            rows = _day_rows(found)
            table = np.full((len(rows), len(VALUE_COLUMNS)), np.nan)
            for col, block in enumerate(blocks):
                if block is not None:
                    at = int(np.searchsorted(rows, block[0]))
                    table[at : at + len(block[1]), col] = block[1]
            stamps = days[rows]
            keep = np.zeros(len(rows), dtype=bool)
            for span_start, span_end in members[symbol]:
                since = days[max(int(calendar.searchsorted(pd.Timestamp(span_start))) - lookback, 0)]
                keep |= (stamps >= since) & (stamps <= pd.Timestamp(span_end).value)
            table, stamps = table[keep], stamps[keep]
            suspended += int(np.isnan(table[:, : len(FIELDS)]).all(axis=1).sum())
            if not has_amount:
                table[:, 5] = derive_amount_values(table[:, :4], table[:, 4])
            names.append(symbol)
            lengths.append(len(stamps))
            times.append(stamps)
            values.append(table)
        logger.debug("qlib: %d symbols read (%d suspended rows to drop)", len(names), suspended)
        if not names:
            return Bars.empty()
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("int64")
        return Bars(names, offsets, np.concatenate(times), np.concatenate(values))

    def _time_range(self, calendar: pd.DatetimeIndex, provider: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
        """dataset_begin/end_time widened by lookback/predict trading days, clipped to the calendar."""
        cfg = self.config
        try:
            begin = pd.Timestamp(cfg.dataset_begin_time)
            end = pd.Timestamp(cfg.dataset_end_time)
        except ValueError as exc:
            raise DataError(f"dataset_begin_time/dataset_end_time must be dates: {exc}") from None
        first = int(calendar.searchsorted(begin))
        last = int(calendar.searchsorted(end, side="right")) - 1
        if first >= len(calendar) or last < 0 or first > last:
            raise DataError(
                f"no trading days between dataset_begin_time {cfg.dataset_begin_time} and dataset_end_time "
                f"{cfg.dataset_end_time} in the calendar of '{provider}' ({calendar[0].date()} .. "
                f"{calendar[-1].date()}); change those config keys"
            )
        start = calendar[max(first - cfg.lookback_window, 0)]
        stop = calendar[min(last + cfg.predict_window, len(calendar) - 1)]
        return pd.Timestamp(start), pd.Timestamp(stop)


def _read_field(storage: Any, first: int, last: int) -> tuple[int, np.ndarray] | None:
    """One field's values on calendar days ``first .. last`` (indices) from pyqlib's feature ``storage``: the first
    day's index and the float32 values (None: no data then). A file storage is read in one go."""
    from qlib.data.storage.file_storage import FileFeatureStorage

    if isinstance(storage, FileFeatureStorage):
        uri = storage.uri
        if not uri.exists():
            return None
        raw = np.fromfile(uri, dtype="<f4")  # the first value: the index of the first day in the calendar
        begin, data = int(raw[0]), raw[1:]
        lo, hi = max(first, begin), min(last, begin + len(data) - 1)
        return (lo, data[lo - begin : hi - begin + 1]) if lo <= hi else None
    series = storage[first : last + 1]
    if len(series) == 0:
        return None
    return int(series.index[0]), series.to_numpy(dtype="float32")


def _day_rows(blocks: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """The calendar indices of the days any field has (the union of the fields' contiguous blocks)."""
    spans = {(lo, len(data)) for lo, data in blocks}
    if len(spans) == 1:
        lo, n = spans.pop()
        return np.arange(lo, lo + n, dtype="int64")
    return np.unique(np.concatenate([np.arange(lo, lo + n, dtype="int64") for lo, n in spans]))


__all__ = [
    "QlibDataProcessor",
    "init_qlib",
    "lowercase_view",
    "import_qlib",
    "require_qlib",
    "check_provider",
    "current_qlib_provider",
]
