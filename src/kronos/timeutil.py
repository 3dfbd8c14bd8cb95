"""Calendar helpers shared by prediction and evaluation: future bar timestamps after a history."""
from __future__ import annotations

import numpy as np
import pandas as pd

from kronos.errors import InputError


def future_timestamps(history: pd.DatetimeIndex | pd.Series, n: int) -> pd.DatetimeIndex:
    """The ``n`` bar timestamps that follow ``history``, continuing its trading pattern.

    Daily (and coarser) bars step over business days; intraday bars repeat the times of day seen in the
    history on the following business days, so lunch breaks and overnight gaps are respected.
    """
    ts = pd.DatetimeIndex(pd.to_datetime(history)).as_unit("ns")
    if len(ts) == 0:
        raise InputError("cannot extend an empty timestamp history")
    if n < 1:
        raise InputError(f"number of future bars must be >= 1, got {n}")
    last = ts[-1]
    if len(ts) == 1:
        return pd.bdate_range(last + pd.Timedelta(days=1), periods=n)
    steps = np.diff(ts.asi8)
    step = pd.Timedelta(int(np.median(steps)), unit="ns")
    times = ts - ts.normalize()
    if step >= pd.Timedelta(days=1) or (times == pd.Timedelta(0)).all():
        if step > pd.Timedelta(days=5):  # weekly/monthly bars: keep the median spacing
            return pd.DatetimeIndex([last + step * (k + 1) for k in range(n)])
        return pd.bdate_range(last.normalize() + pd.Timedelta(days=1), periods=n) + (last - last.normalize())
    # Intraday: the session's times of day, taken from the history (at most one day's worth of bars).
    day_times = np.unique(times.asi8)
    if len(day_times) > 24 * 60 * 60:  # second bars or irregular ticks: plain spacing
        return pd.DatetimeIndex([last + step * (k + 1) for k in range(n)])
    day_times = pd.to_timedelta(day_times, unit="ns")
    out: list[pd.Timestamp] = []
    day = last.normalize()
    later = [day + t for t in day_times if day + t > last]
    out.extend(later[:n])
    while len(out) < n:
        day = (day + pd.offsets.BDay(1)).normalize()
        for t in day_times:
            out.append(day + t)
            if len(out) == n:
                break
    return pd.DatetimeIndex(out)
