"""Band calibration: reaches nominal coverage on held-out anchors, round-trips, refuses another model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _support.models import tiny_predictor
from kronos.errors import CheckpointError, InputError
from kronos.evaluate.calibration import (
    Calibration,
    calibrated_crps,
    candidate,
    fit_calibration,
    load_calibration,
    model_fingerprint,
)


def _synthetic(n, seed, s=20, p=4, spread=0.4):
    """Outcomes with known noise N(0, (1% sqrt h)^2); the 'model' samples are too narrow (spread x the truth)."""
    rng = np.random.default_rng(seed)
    sigma = 0.01 * np.sqrt(np.arange(1, p + 1))
    last = rng.uniform(10, 200, size=n)
    true = last[:, None] * (1 + rng.normal(size=(n, p)) * sigma)
    samples = last[:, None, None] * (1 + rng.normal(size=(n, s, p)) * sigma * spread)
    return samples, last, true, np.arange(n)


@pytest.mark.parametrize("spread", [0.4, 2.5])
def test_calibration_reaches_nominal_coverage_on_held_out_anchors(spread):
    samples, last, true, anchors = _synthetic(800, 0, spread=spread)
    cal = fit_calibration(
        samples,
        last,
        true,
        anchors,
        levels=[0.5, 0.8],
        lookback=30,
        fingerprint="x",
        context_vol=np.full(len(last), 0.01),
    )
    assert cal.method == "vol_scaled"
    test_s, test_last, test_true, _ = _synthetic(1500, 1, spread=spread)
    for lv in (0.5, 0.8):
        raw_lo, raw_hi = np.quantile(test_s, [(1 - lv) / 2, (1 + lv) / 2], axis=1)
        raw_cov = np.mean((test_true >= raw_lo) & (test_true <= raw_hi))
        lo, hi = cal.quantiles(test_s, test_last, [(1 - lv) / 2, (1 + lv) / 2], np.full(len(test_last), 0.01))
        cov = np.mean((test_true >= lo) & (test_true <= hi))
        assert abs(raw_cov - lv) > 0.1  # the raw band is badly off ...
        assert cov == pytest.approx(lv, abs=0.05)  # ... the calibrated one is not
    assert cal.coverage_before["0.8"]["coverage"] != pytest.approx(cal.coverage_after["0.8"]["coverage"], abs=0.05)
    assert set(cal.holdout) == {"vol_scaled", "cqr_vol", "cqr_additive", "cqr_multiplicative", "spread_scale", "none"}
    assert cal.brier["calibrated"] <= cal.brier["raw"] + 1e-9


def test_file_round_trips_and_rejects_bad_files(tmp_path):
    samples, last, true, anchors = _synthetic(200, 3)
    vol = np.full(200, 0.01)
    cal = fit_calibration(samples, last, true, anchors, levels=[0.8], lookback=30, fingerprint="abc", context_vol=vol)
    path = tmp_path / "calibration.json"
    cal.save(path)
    back = load_calibration(path)
    assert back == Calibration.from_dict(json.loads(path.read_text()))
    assert np.allclose(
        back.quantiles(samples, last, [0.1, 0.5, 0.9], vol), cal.quantiles(samples, last, [0.1, 0.5, 0.9], vol)
    )
    old = dict(cal.to_dict(), version=1)
    path.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="format version 1.*rerun `kronos calibrate`"):
        load_calibration(path)
    path.write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_calibration(path)
    data = cal.to_dict()
    data["levels"] = [1.2]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="outside"):
        load_calibration(path)
    with pytest.raises(InputError, match="outside"):
        fit_calibration(samples, last, true, anchors, levels=[0.0], lookback=30, fingerprint="abc")
    with pytest.raises(InputError, match="not calibrated"):
        back.quantiles(samples, last, [0.25], vol)
    with pytest.raises(InputError, match="unknown calibration method 'bogus'"):
        fit_calibration(samples, last, true, anchors, levels=[0.8], lookback=30, fingerprint="abc", method="bogus")


def test_mismatched_model_is_rejected():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    fp = model_fingerprint(a, 30, 4)
    assert fp == model_fingerprint(a, 30, 4) and fp != model_fingerprint(a, 31, 4)
    samples, last, true, anchors = _synthetic(50, 4)
    cal = fit_calibration(
        samples, last, true, anchors, levels=[0.8], lookback=30, fingerprint=fp, method="cqr_additive"
    )
    cal.check(a, lookback=30, horizon=4)
    with pytest.raises(CheckpointError, match="another predictor"):
        cal.check(b, lookback=30, horizon=4)
    with pytest.raises(CheckpointError, match="horizon"):
        cal.check(a, lookback=30, horizon=5)
    with pytest.raises(CheckpointError, match="lookback"):
        cal.check(a, lookback=20, horizon=4)


def test_predictor_applies_calibration_and_refuses_another_model(tmp_path):
    import pandas as pd

    from kronos.evaluate.calibration import model_fingerprint

    pred, other = tiny_predictor(seed=0, max_context=32), tiny_predictor(seed=1, max_context=32)
    rng = np.random.default_rng(0)
    n, P, L = 40, 3, 24
    ts = pd.date_range("2024-01-01", periods=n + P, freq="D")
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n + P)))
    frame = pd.DataFrame(
        {
            "symbol": "A",
            "timestamps": ts,
            "open": close,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "volume": 1000.0,
        }
    )
    samples, last, true, anchors = _synthetic(100, 5, p=P, spread=0.3)
    cal = fit_calibration(
        samples,
        last,
        true,
        anchors,
        levels=[0.8],
        lookback=L,
        fingerprint=model_fingerprint(pred, L, P),
        method="cqr_additive",
    )
    path = cal.save(tmp_path / "calibration.json")
    ctx = frame.iloc[n - L : n]
    args = (ctx[["open", "high", "low", "close", "volume"]], ctx["timestamps"], frame["timestamps"].iloc[n : n + P], P)
    kw = dict(quantiles=(0.1, 0.5, 0.9), sample_count=6, verbose=False, seed=3)
    raw = pred.predict_quantiles(*args, **kw)
    calq = pred.predict_quantiles(*args, calibration=path, **kw)
    assert np.allclose(raw[0.5]["close"], calq[0.5]["close"])  # the median stays
    assert (calq[0.9]["close"] - calq[0.1]["close"] >= raw[0.9]["close"] - raw[0.1]["close"] - 1e-9).all()
    with pytest.raises(CheckpointError, match="another predictor"):
        other.predict_quantiles(*args, calibration=path, **kw)
    with pytest.raises(CheckpointError, match="lookback"):
        pred.predict_quantiles(
            ctx.iloc[1:][["open", "high", "low", "close"]],
            ctx["timestamps"].iloc[1:],
            frame["timestamps"].iloc[n : n + P],
            P,
            calibration=path,
            **kw,
        )
    records = pred.predict_df(
        frame.iloc[:n], pred_len=P, lookback=L, sample_count=6, seed=3, calibration=path, progress=False
    )
    assert {"close_q0.9_raw", "close_q0.1_raw"} <= set(records.columns)
    assert (
        records["close_q0.9"] - records["close_q0.1"] >= records["close_q0.9_raw"] - records["close_q0.1_raw"] - 1e-9
    ).all()
    with pytest.raises(CheckpointError, match="another predictor"):
        other.predict_df(frame.iloc[:n], pred_len=P, lookback=L, sample_count=2, calibration=path, progress=False)
    # a volatility-normalised calibration takes each context's volatility from the records / the context
    rng2 = np.random.default_rng(9)
    vol = rng2.uniform(0.005, 0.02, 200)
    flat = np.repeat(np.full((200, 1, P), 50.0), 4, axis=1)
    true2 = 50 * (1 + rng2.normal(size=(200, P)) * vol[:, None])
    cal_vol = fit_calibration(
        flat,
        np.full(200, 50.0),
        true2,
        np.arange(200),
        levels=[0.8],
        lookback=L,
        fingerprint=model_fingerprint(pred, L, P),
        context_vol=vol,
    )
    assert cal_vol.method == "vol_scaled"
    records = pred.predict_df(
        frame.iloc[:n], pred_len=P, lookback=L, sample_count=6, seed=3, calibration=cal_vol, progress=False
    )
    assert (records["close_q0.9"] > records["close_q0.9_raw"]).all() and (records["context_vol"] > 0).all()
    calq = pred.predict_quantiles(*args, calibration=cal_vol, **kw)
    assert (calq[0.9]["close"] > raw[0.9]["close"]).all()


@pytest.mark.parametrize("method", ["vol_scaled", "cqr_vol"])
def test_volatility_normalised_calibration_follows_a_regime_change(method):
    """Degenerate samples (zero-width bands) and noise proportional to each context's volatility: only the
    volatility-normalised corrections stay calibrated when the test period is twice as volatile."""

    def make(n, seed, vol_scale):
        rng = np.random.default_rng(seed)
        vol = rng.uniform(0.005, 0.02, size=n) * vol_scale
        last = rng.uniform(10, 200, size=n)
        true = last[:, None] * (1 + rng.normal(size=(n, 4)) * vol[:, None] * np.sqrt(np.arange(1, 5)))
        samples = np.repeat(last[:, None, None], 4, axis=1) * np.ones((1, 1, 4))
        return samples, last, true, vol

    s, last, true, vol = make(1000, 0, 1.0)
    cal = fit_calibration(
        s, last, true, np.arange(1000), levels=[0.5, 0.8], lookback=30, fingerprint="x", context_vol=vol, method=method
    )
    assert cal.method == method
    ts, tlast, ttrue, tvol = make(2000, 1, 2.0)
    additive = candidate(cal, "cqr_additive")
    for lv in (0.5, 0.8):
        lo, hi = cal.quantiles(ts, tlast, [(1 - lv) / 2, (1 + lv) / 2], tvol)
        assert np.mean((ttrue >= lo) & (ttrue <= hi)) == pytest.approx(lv, abs=0.05)
        lo, hi = additive.quantiles(ts, tlast, [(1 - lv) / 2, (1 + lv) / 2], tvol)
        assert np.mean((ttrue >= lo) & (ttrue <= hi)) < lv - 0.1  # a correction in price units does not follow
    with pytest.raises(InputError, match="recent volatility"):
        cal.quantiles(ts, tlast, [0.1])


def test_vol_scaled_widens_with_the_models_own_spread():
    """Where the model's own band is wide, the calibrated band is wider than where it is narrow (same volatility),
    and outcomes whose noise follows the model's spread are covered at nominal rate on new anchors."""

    def make(n, seed):
        rng = np.random.default_rng(seed)
        sd = rng.choice([0.002, 0.03], size=n)  # half the forecasts are far more uncertain, and the model knows
        last = np.full(n, 100.0)
        true = last[:, None] * (1 + rng.normal(size=(n, 3)) * sd[:, None])
        samples = last[:, None, None] * (1 + rng.normal(size=(n, 64, 3)) * sd[:, None, None])
        return samples, last, true, np.full(n, 0.005), sd

    s, last, true, vol, _ = make(1500, 0)
    cal = fit_calibration(s, last, true, np.arange(1500), levels=[0.8], lookback=30, fingerprint="x", context_vol=vol)
    ts, tlast, ttrue, tvol, tsd = make(3000, 1)
    lo, hi = cal.quantiles(ts, tlast, [0.1, 0.9], tvol)
    width = (hi - lo).mean(axis=1)
    assert width[tsd > 0.01].mean() > 3 * width[tsd < 0.01].mean()
    assert np.mean((ttrue >= lo) & (ttrue <= hi)) == pytest.approx(0.8, abs=0.04)


def test_auto_keeps_the_hold_out_choice():
    samples, last, true, anchors = _synthetic(400, 7, spread=0.5)
    cal = fit_calibration(
        samples,
        last,
        true,
        anchors,
        levels=[0.8],
        lookback=30,
        fingerprint="x",
        context_vol=np.full(400, 0.01),
        method="auto",
    )
    best = min(cal.holdout, key=lambda m: cal.holdout[m]["mean_abs_error"])
    assert cal.holdout[cal.method]["mean_abs_error"] <= cal.holdout[best]["mean_abs_error"] + 1e-3


def test_vol_scaled_centre_trusts_an_informative_median_and_not_a_noisy_one():
    """The band centre is the median shrunk toward the last close by a factor fitted on validation: about 1 when
    the model's median move predicts the outcome, 0 when it is noise; the calibrated CRPS is lower for it."""
    rng = np.random.default_rng(5)
    n, s, p = 600, 16, 3
    last = np.full(n, 100.0)
    vol = np.full(n, 0.02)
    signal = rng.normal(0, 0.02, (n, p))
    noise = rng.normal(0, 0.01, (n, p))
    fits = {}
    for name, med in (("informative", signal), ("noise", rng.normal(0, 0.03, (n, p)))):
        paths = last[:, None, None] * (1 + med[:, None, :] + rng.normal(0, 0.01, (n, s, p)))
        true = last[:, None] * (1 + signal + noise)
        half = n // 2
        cal = fit_calibration(
            paths[:half], last[:half], true[:half], np.arange(half), [0.5, 0.8], 20, "fp", context_vol=vol[:half]
        )
        crps = calibrated_crps(cal, paths[half:], last[half:], true[half:], vol[half:]).mean()
        q = cal.quantiles(paths[half:], last[half:], [0.1, 0.9], vol[half:])
        cover = np.mean((true[half:] >= q[0]) & (true[half:] <= q[1]))
        fits[name] = (np.asarray(cal.params["center"]), crps, cover)
    assert (fits["informative"][0] >= 0.8).all() and (fits["noise"][0] <= 0.2).all()
    assert fits["informative"][1] < fits["noise"][1]
    assert abs(fits["informative"][2] - 0.8) < 0.06 and abs(fits["noise"][2] - 0.8) < 0.06
    # a file without a centre (written before it was fitted) keeps the median
    data = Calibration(
        method="vol_scaled", levels=[0.8], horizon=p, lookback=20, fingerprint="fp", params={"0.8": [1.0] * p}
    ).to_dict()
    old = Calibration.from_dict(data)
    paths = last[:4, None, None] * (1 + rng.normal(0.01, 0.01, (4, s, p)))
    med = old.quantiles(paths, last[:4], [0.5], vol[:4])[0]
    assert np.allclose(med, np.median(paths, axis=1))
    with pytest.raises(CheckpointError, match="center"):
        Calibration.from_dict({**data, "params": {"0.8": [1.0] * p, "center": [1.0]}})
