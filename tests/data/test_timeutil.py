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
