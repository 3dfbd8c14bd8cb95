"""Calendar helpers shared by prediction and evaluation: future bar timestamps after a history.

Future bars follow an exchange's trading calendar when one is named (``calendar="XSHG"`` for China A-shares,
``"XNYS"`` for US stocks: any code of the kept ``exchange_calendars`` library), so holidays such as New Year's
Day are never forecast dates. ``calendar="24/7"`` (the default of the ``ccxt`` crypto source) steps over every
calendar day. Without a calendar the rule is plain business days (or the history's own spacing), unless the
history itself holds Saturday or Sunday bars: such a market trades every day (crypto), so every day is used.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from kronos.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# Data sources whose market is known: their forecasts follow that exchange's calendar by default.
SOURCE_CALENDARS = {"qlib": "XSHG", "sina": "XSHG", "ccxt": "24/7"}
# A market open every day of the year (crypto): future bars step over calendar days, weekends included.
ALWAYS_OPEN = "24/7"
_ALWAYS_OPEN_NAMES = ("24/7", "24x7", "always")


def resolve_calendar(name: str | None, data_source: str = "") -> str | None:
    """The exchange calendar code to use: ``"auto"`` picks the data source's market (A-shares for qlib/sina,
    ``"24/7"`` for ccxt), ``"none"``/empty means plain business days, ``"24/7"`` every calendar day; any other
    value must be an ``exchange_calendars`` code."""
    if name is None or str(name).strip().lower() in ("", "none", "business", "bday"):
        return None
    if str(name).strip().lower() == "auto":
        return SOURCE_CALENDARS.get(data_source)
    if str(name).strip().lower() in _ALWAYS_OPEN_NAMES:
        return ALWAYS_OPEN
    _calendar(str(name))  # validate early: a one-line error naming the key
    return str(name)


@functools.lru_cache(maxsize=8)
def _calendar(code: str):
    try:
        import exchange_calendars as xcals
    except ImportError:  # pragma: no cover - exchange_calendars is a core dependency
        raise ConfigError(
            f"trading_calendar '{code}' needs exchange_calendars: pip install exchange_calendars"
        ) from None
    try:
        return xcals.get_calendar(code)
    except Exception:
        names = ", ".join(n for n in ("XSHG", "XSHE", "XHKG", "XNYS", "XNAS", "XLON", "XTKS", "XETR"))
        raise ConfigError(
            f"trading_calendar: unknown exchange calendar '{code}'; use one of {names}, ... "
            "(exchange_calendars.get_calendar_names()), or 'none' for business days"
        ) from None


def _next_days(calendar: str | None) -> Callable[[pd.Timestamp, int], pd.DatetimeIndex]:
    """A function giving the ``k`` trading days strictly after a day (calendar sessions, else business days)."""

    def bdays(day: pd.Timestamp, k: int) -> pd.DatetimeIndex:
        return pd.bdate_range(day.normalize() + pd.Timedelta(days=1), periods=k)

    def every_day(day: pd.Timestamp, k: int) -> pd.DatetimeIndex:
        return pd.date_range(day.normalize() + pd.Timedelta(days=1), periods=k, freq="D")

    if calendar is None:
        return bdays
    if str(calendar).strip().lower() in _ALWAYS_OPEN_NAMES:
        return every_day
    cal = _calendar(calendar)

    def sessions(day: pd.Timestamp, k: int) -> pd.DatetimeIndex:
        day = day.normalize().tz_localize(None) if day.tzinfo is not None else day.normalize()
        last = cal.last_session.tz_localize(None) if cal.last_session.tzinfo is not None else cal.last_session
        first = cal.first_session.tz_localize(None) if cal.first_session.tzinfo is not None else cal.first_session
        if day < first or day >= last:
            log.warning(
                "trading calendar %s covers %s..%s only; business days used after %s",
                calendar,
                first.date(),
                last.date(),
                day.date(),
            )
            return bdays(day, k)
        out = cal.sessions_in_range(day + pd.Timedelta(days=1), last)[:k]
        out = pd.DatetimeIndex(out).tz_localize(None) if getattr(out, "tz", None) is not None else pd.DatetimeIndex(out)
        if len(out) < k:
            out = out.append(bdays(out[-1] if len(out) else day, k - len(out)))
        return pd.DatetimeIndex(out).as_unit("ns")

    return sessions


_DAY_NS = 86_400 * 10**9


def future_timestamps_key(wall_ns: np.ndarray, calendar: str | None = None) -> tuple:
    """What :func:`future_timestamps` of a history depends on, from the history's wall-clock times (int64 ns, at
    least one): histories with equal keys (and equal ``n`` and time zone) get the same future timestamps, so a
    caller extending many series computes each distinct continuation once. Mirrors :func:`future_timestamps`
    branch by branch; keep the two in step."""
    ns = np.asarray(wall_ns, dtype=np.int64)
    if calendar is None and bool((((ns // _DAY_NS) + 3) % 7 >= 5).any()):  # 1970-01-01 was a Thursday (Mon=0)
        calendar = ALWAYS_OPEN
    last = int(ns[-1])
    if len(ns) == 1:
        return (calendar, "one", last)
    step = int(np.median(np.diff(ns)))
    times = ns % _DAY_NS
    if step >= _DAY_NS or not times.any():
        return (calendar, "days", last, step) if step > 5 * _DAY_NS else (calendar, "days", last)
    day_times = np.unique(times)
    if len(day_times) > 24 * 60 * 60:
        return (calendar, "spacing", last, step)
    return (calendar, "intraday", last, day_times.tobytes())


def future_timestamps(history: pd.DatetimeIndex | pd.Series, n: int, calendar: str | None = None) -> pd.DatetimeIndex:
    """The ``n`` bar timestamps that follow ``history``, continuing its trading pattern.

    Daily bars step over trading days (the sessions of ``calendar``, an ``exchange_calendars`` code such as
    ``"XSHG"``, or business days without one); intraday bars repeat the times of day seen in the history on the
    following trading days, so lunch breaks, overnight gaps and holidays are respected. Without a calendar, a
    history with Saturday or Sunday bars (a market open every day, such as crypto) continues over every day.
    """
    ts = pd.DatetimeIndex(pd.to_datetime(history)).as_unit("ns")
    if len(ts) == 0:
        raise InputError("cannot extend an empty timestamp history")
    if calendar is None and (ts.day_of_week >= 5).any():
        calendar = ALWAYS_OPEN
    next_days = _next_days(calendar)
    if ts.tz is not None:  # work on the exchange's wall clock, then put the zone back
        tz = ts.tz
        naive = future_timestamps(ts.tz_localize(None), n, calendar)
        return naive.tz_localize(tz, ambiguous="NaT", nonexistent="shift_forward")
    if n < 1:
        raise InputError(f"number of future bars must be >= 1, got {n}")
    last = ts[-1]
    if len(ts) == 1:
        return next_days(last, n) + (last - last.normalize())
    steps = np.diff(ts.asi8)
    step = pd.Timedelta(int(np.median(steps)), unit="ns")
    times = ts - ts.normalize()
    if step >= pd.Timedelta(days=1) or (times == pd.Timedelta(0)).all():
        if step > pd.Timedelta(days=5):  # weekly/monthly bars: keep the median spacing
            return pd.DatetimeIndex([last + step * (k + 1) for k in range(n)])
        return next_days(last, n) + (last - last.normalize())
    # Intraday: the session's times of day, taken from the history (at most one day's worth of bars).
    day_times = np.unique(times.asi8)
    if len(day_times) > 24 * 60 * 60:  # second bars or irregular ticks: plain spacing
        return pd.DatetimeIndex([last + step * (k + 1) for k in range(n)])
    day_times = pd.to_timedelta(day_times, unit="ns")
    out: list[pd.Timestamp] = []
    day = last.normalize()
    later = [day + t for t in day_times if day + t > last]
    out.extend(later[:n])
    if len(out) < n:
        per_day = len(day_times)
        for later_day in next_days(day, -(-(n - len(out)) // per_day)):
            for t in day_times:
                out.append(later_day + t)
                if len(out) == n:
                    break
    return pd.DatetimeIndex(out).as_unit("ns")
