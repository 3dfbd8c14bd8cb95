"""Intraday bands that follow the clock: the first bar of a session carries the night's gap, lunch bars are quiet, so
a band anchored late in the afternoon that reaches into the next morning must be wider than its calm context says.
``vol_scaled`` learns the profile of the trading day from bars before the test split (never later) and sizes each
step by it (kronos.evaluate.calibration.fit_session_profile, kronos.inference.bands.session_time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos.errors import CheckpointError, InputError
from kronos.evaluate.calibration import fit_calibration, fit_session_profile
from kronos.inference.bands import Calibration, apply_calibration, recent_volatility
from kronos.inference.outcomes import BandOutcomes

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv"
L, P, S = 60, 8, 24


def _slots() -> list[pd.Timedelta]:
    """An A-share 5-minute day: 09:35 .. 11:30 and 13:05 .. 15:00 (48 bars)."""
    morning = [pd.Timedelta(hours=9, minutes=35) + pd.Timedelta(minutes=5 * i) for i in range(24)]
    afternoon = [pd.Timedelta(hours=13, minutes=5) + pd.Timedelta(minutes=5 * i) for i in range(24)]
    return morning + afternoon


# as measured on the bundled real 5-minute bars: the open ~9x, a busy morning, a quieter and quieter afternoon
PROFILE = np.concatenate([[9.0, 3.0, 3.0, 2.0], np.linspace(1.3, 0.6, 20), np.linspace(1.0, 0.4, 24)])
PROFILE = PROFILE / PROFILE.mean()


def _market(n_days=70, symbols=12, seed=0) -> pd.DataFrame:
    """Random walks whose variance per bar follows PROFILE by time of day (the night's gap lands on 09:35)."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range("2024-01-02", periods=n_days)
    times = pd.DatetimeIndex([d + s for d in days for s in _slots()])
    frames = []
    for k in range(symbols):
        sigma = 0.001 * np.exp(rng.normal(0, 0.3))
        r = rng.normal(size=len(times)) * sigma * np.sqrt(np.tile(PROFILE, n_days))
        close = 10.0 * np.exp(np.cumsum(r))
        frames.append(pd.DataFrame({"symbol": f"S{k}", "timestamps": times, "close": close}))
    return pd.concat(frames, ignore_index=True)


def _forecasts(frame: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp | None, seed: int):
    """Every 2nd bar of each symbol whose horizon lies in (start, end]: a 'model' that knows no clock (paths too
    narrow, spread in proportion to the recent volatility and the step count)."""
    rng = np.random.default_rng(seed)
    samples, last, true, vol, anchors, targets = [], [], [], [], [], []
    for _, g in frame.groupby("symbol", sort=True):
        t = g["timestamps"].to_numpy(dtype="datetime64[ns]")
        c = g["close"].to_numpy(dtype=float)
        for pos in range(L, len(c) - P, 2):
            if t[pos + 1] <= np.datetime64(start) or (end is not None and t[pos + P] > np.datetime64(end)):
                continue
            ctx = c[pos + 1 - L : pos + 1]
            v = float(recent_volatility(ctx[None])[0])
            h = np.sqrt(np.arange(1, P + 1))
            samples.append(ctx[-1] * (1 + 0.3 * v * h[None, :] * rng.normal(size=(S, P))))
            last.append(ctx[-1])
            true.append(c[pos + 1 : pos + 1 + P])
            vol.append(v)
            anchors.append(t[pos])
            targets.append(t[pos + 1 : pos + 1 + P])
    return tuple(np.asarray(x) for x in (samples, last, true, vol, anchors, targets))


def _coverage(cal, data, lv):
    """Coverage overall, by tercile of recent volatility, and of the forecasts whose horizon crosses the night
    versus those within one session."""
    samples, last, true, vol, anchors, targets = data
    lo, hi = cal.quantiles(samples, last, [(1 - lv) / 2, (1 + lv) / 2], vol, anchors=anchors)
    inside = (true >= lo) & (true <= hi)
    tercile = np.digitize(vol, np.quantile(vol, [1 / 3, 2 / 3]))
    night = pd.DatetimeIndex(targets[:, -1]).normalize() != pd.DatetimeIndex(anchors).normalize()
    return (
        float(inside.mean()),
        [float(inside[tercile == t].mean()) for t in range(3)],
        [float(inside[night].mean()), float(inside[~night].mean())],
    )


@pytest.fixture(scope="module")
def market():
    frame = _market()
    days = np.unique(frame["timestamps"].dt.normalize())
    val_start, test_start = pd.Timestamp(days[20]), pd.Timestamp(days[45])
    val_end = frame["timestamps"][frame["timestamps"] < test_start].max()
    val = _forecasts(frame, val_start, val_end, 1)
    test = _forecasts(frame, val_end, None, 2)
    return frame, val_end, val, test


def test_profile_is_learnt_from_bars_before_the_cut_only(market):
    frame, val_end, _, _ = market
    profile = fit_session_profile(frame, val_end)
    assert profile is not None and len(profile["minutes"]) == 48
    assert profile["minutes"][0] == 9 * 60 + 35 and profile["minutes"][-1] == 15 * 60
    w = np.asarray(profile["weight"])
    assert w.mean() == pytest.approx(1.0) and int(np.argmax(w)) == 0
    assert w[0] == pytest.approx(PROFILE[0], rel=0.25)  # the night's gap: about 9x a typical bar's variance
    # every bar after the cut poisoned: the profile does not move
    poisoned = frame.copy()
    later = poisoned["timestamps"] > val_end
    poisoned.loc[later, "close"] = poisoned.loc[later, "close"] * np.exp(
        np.random.default_rng(5).normal(0, 0.2, later.sum())
    )
    assert fit_session_profile(poisoned, val_end) == profile


def test_daily_bars_have_no_profile():
    days = pd.bdate_range("2020-01-01", periods=300)
    frame = pd.DataFrame({"symbol": "A", "timestamps": days, "close": np.linspace(10, 12, 300)})
    assert fit_session_profile(frame) is None


def test_real_five_minute_bars_carry_the_nights_gap_on_the_first_bar():
    raw = pd.read_csv(FIXTURE, parse_dates=["timestamps"])
    raw.insert(0, "symbol", "X")
    profile = fit_session_profile(raw)
    assert profile is not None and len(profile["minutes"]) == 48
    w = dict(zip(profile["minutes"], profile["weight"]))
    assert max(w, key=w.get) == 9 * 60 + 35 and w[9 * 60 + 35] > 3.0


def test_profile_evens_coverage_across_volatility_terciles(market):
    frame, val_end, val, test = market
    profile = fit_session_profile(frame, val_end)
    fits = {}
    for name, session in (("clockless", None), ("profile", profile)):
        samples, last, true, vol, anchors, _ = val
        fits[name] = fit_calibration(
            samples, last, true, anchors, [0.5, 0.8], L, "fp", context_vol=vol, session=session
        )
    assert "session" in fits["profile"].params and "session" not in fits["clockless"].params
    for lv in (0.5, 0.8):
        overall, by_tercile, by_night = _coverage(fits["profile"], test, lv)
        assert abs(overall - lv) < 0.03
        assert max(abs(c - lv) for c in by_tercile) < 0.05, by_tercile
        assert max(abs(c - lv) for c in by_night) < 0.05, by_night
        _, _, clockless = _coverage(fits["clockless"], test, lv)
        assert clockless[0] < lv - 0.04  # without the clock, bands across the night fall short
    # a band anchored at 14:55 reaching into the next morning is wider than its context's calm says
    cal = fits["profile"]
    samples, last, _, vol, anchors, _ = test
    late = pd.DatetimeIndex(anchors).strftime("%H:%M") == "14:55"
    noon = pd.DatetimeIndex(anchors).strftime("%H:%M") == "10:35"
    unit = lambda m: np.mean(  # noqa: E731 - half-band at the last step in units of the recent volatility
        (np.diff(cal.quantiles(samples[m], last[m], [0.1, 0.9], vol[m], anchors=anchors[m]), axis=0)[0, :, -1])
        / last[m]
        / vol[m]
    )
    assert unit(late) > 1.5 * unit(noon)


def test_adaptive_outcomes_and_records_use_the_profile(market):
    frame, val_end, val, test = market
    samples, last, true, vol, anchors, targets = val
    cal = fit_calibration(
        samples, last, true, anchors, [0.8], L, "fp", context_vol=vol, session=fit_session_profile(frame, val_end)
    )
    with pytest.raises(InputError, match="anchor time"):
        cal.quantiles(samples, last, [0.1, 0.9], vol)
    pool = BandOutcomes.from_forecasts(cal, samples, last, true, vol, targets, anchors=anchors)
    inside = pool.scores["0.8"] <= 1.0
    assert abs(float(inside.mean()) - 0.8) < 0.03  # the scores are the profile's bands, as fitted
    # forecast records: one row per step, with its anchor
    n = 5
    rows = pd.DataFrame(
        {
            "step": np.tile(np.arange(1, P + 1), n),
            "last_close": np.repeat(last[:n], P),
            "context_vol": np.repeat(vol[:n], P),
            "close_q0.1": np.quantile(samples[:n], 0.1, axis=1).ravel(),
            "close_q0.5": np.quantile(samples[:n], 0.5, axis=1).ravel(),
            "close_q0.9": np.quantile(samples[:n], 0.9, axis=1).ravel(),
        }
    )
    with pytest.raises(InputError, match="'anchor' column"):
        apply_calibration(rows, cal)
    rows["anchor"] = np.repeat(anchors[:n], P)
    out = apply_calibration(rows, cal)
    lo, hi = cal.quantiles(samples[:n], last[:n], [0.1, 0.9], vol[:n], anchors=anchors[:n])
    np.testing.assert_allclose(out["close_q0.1"].to_numpy(), lo.ravel(), rtol=1e-9)
    np.testing.assert_allclose(out["close_q0.9"].to_numpy(), hi.ravel(), rtol=1e-9)


def test_saved_profile_round_trips_and_a_broken_one_is_refused(market, tmp_path):
    frame, val_end, val, _ = market
    samples, last, true, vol, anchors, _ = val
    cal = fit_calibration(
        samples, last, true, anchors, [0.8], L, "fp", context_vol=vol, session=fit_session_profile(frame, val_end)
    )
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = Calibration.load(path)
    np.testing.assert_allclose(
        again.quantiles(samples[:20], last[:20], [0.1, 0.9], vol[:20], anchors=anchors[:20]),
        cal.quantiles(samples[:20], last[:20], [0.1, 0.9], vol[:20], anchors=anchors[:20]),
    )
    data = cal.to_dict()
    data["params"]["session"]["weight"][3] = -1.0
    with pytest.raises(CheckpointError, match="'session'"):
        Calibration.from_dict(data)
