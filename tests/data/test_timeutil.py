"""Future bar timestamps continue the history's trading pattern."""

import pandas as pd

from kronos.timeutil import future_timestamps


def test_daily_bars_skip_weekends():
    hist = pd.bdate_range("2024-01-01", "2024-01-05")  # Mon..Fri
    fut = future_timestamps(hist, 3)
    assert list(fut) == list(pd.to_datetime(["2024-01-08", "2024-01-09", "2024-01-10"]))


def test_intraday_bars_follow_the_session():
    raw = pd.read_csv(__import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv")
    ts = pd.to_datetime(raw["timestamps"])
    fut = future_timestamps(pd.Series(ts), 60)
    assert fut[0] > ts.iloc[-1]
    observed = set((ts - ts.dt.normalize()).unique())
    assert all((t - t.normalize()) in observed for t in fut)  # only times the market trades
    assert fut.is_monotonic_increasing and fut.is_unique
    assert all(t.weekday() < 5 for t in fut)


def test_series_input_and_weekly_spacing():
    hist = pd.Series(pd.date_range("2024-01-05", periods=10, freq="W-FRI"))
    fut = future_timestamps(hist, 2)
    assert list(fut) == [hist.iloc[-1] + pd.Timedelta(days=7), hist.iloc[-1] + pd.Timedelta(days=14)]


def test_exchange_calendar_skips_holidays():
    """A-share daily bars: New Year's Day 2025 and the 2024 National Day week are not forecast dates."""
    hist = pd.DatetimeIndex(["2024-12-26", "2024-12-27", "2024-12-30", "2024-12-31"])
    assert future_timestamps(hist, 2)[0] == pd.Timestamp("2025-01-01")  # plain business days (no calendar)
    fut = future_timestamps(hist, 3, calendar="XSHG")
    assert list(fut) == list(pd.to_datetime(["2025-01-02", "2025-01-03", "2025-01-06"]))
    national_day = future_timestamps(pd.DatetimeIndex(["2024-09-27", "2024-09-30"]), 1, calendar="XSHG")
    assert national_day[0] == pd.Timestamp("2024-10-08")


def test_intraday_bars_follow_the_exchange_calendar():
    hist = pd.DatetimeIndex(["2024-09-30 14:50", "2024-09-30 14:55", "2024-09-30 15:00"])
    fut = future_timestamps(hist, 4, calendar="XSHG")
    assert fut[0] == pd.Timestamp("2024-10-08 14:50")  # next session after the holiday, same times of day


def test_calendar_keeps_time_zone_and_rejects_unknown_codes():
    import pytest

    from kronos.errors import ConfigError
    from kronos.timeutil import resolve_calendar

    hist = pd.DatetimeIndex(["2024-12-30", "2024-12-31"]).tz_localize("Asia/Shanghai")
    fut = future_timestamps(hist, 1, calendar="XSHG")
    assert str(fut.tz) == "Asia/Shanghai" and fut[0].date() == pd.Timestamp("2025-01-02").date()
    assert resolve_calendar("auto", "qlib") == "XSHG" and resolve_calendar("auto", "csv") is None
    assert resolve_calendar("none", "qlib") is None
    with pytest.raises(ConfigError, match="trading_calendar.*NOPE"):
        resolve_calendar("NOPE")
