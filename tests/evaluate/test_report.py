"""Walk-forward report and validation calibration with a tiny model on the real Qlib fixture (fast)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from _support.models import tiny_predictor
from _support.training import qlib_frame
from kronos.config import Config
from kronos.evaluate.calibration import calibrate_on_validation, load_calibration
from kronos.evaluate.report import build_report
from kronos.evaluate.rolling import forecast_split, select_anchors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    frame = qlib_frame(symbols=3).sort_values(["symbol", "timestamps"]).reset_index(drop=True)
    ts = frame["timestamps"]
    bounds = {
        "train_start": ts.min(),
        "train_end": pd.Timestamp("2023-06-30"),
        "val_start": pd.Timestamp("2023-07-01"),
        "val_end": pd.Timestamp("2024-03-29"),
        "test_start": pd.Timestamp("2024-04-01"),
        "test_end": ts.max(),
    }
    predictor = tiny_predictor(seed=0, max_context=32)
    cfg = Config.from_dict(
        dict(
            lookback_window=20,
            predict_window=3,
            inference_sample_count=8,
            eval_stride=5,
            eval_max_anchors=12,
            calibration_min_forecasts=10,  # tiny data: keep the test fast
            device="cpu",
            quantiles=[0.1, 0.25, 0.5, 0.75, 0.9],
        )
    )
    return frame, bounds, predictor, cfg


def test_anchors_targets_stay_in_their_split(setup):
    frame, bounds, _, _ = setup
    test = select_anchors(frame, bounds["val_end"], None, 20, 3)
    val = select_anchors(frame, bounds["train_end"], bounds["val_end"], 20, 3, stride=2, max_anchors=30)
    for anchors, lo, hi in ((test, bounds["val_end"], None), (val, bounds["train_end"], bounds["val_end"])):
        for symbol, pos in zip(anchors["symbol"], anchors["pos"]):
            g = frame[frame["symbol"] == symbol].reset_index(drop=True)
            targets = g["timestamps"].iloc[pos + 1 : pos + 4]
            assert len(targets) == 3 and (targets > lo).all()
            assert hi is None or (targets <= hi).all()
    assert val["anchor"].nunique() == 30


@pytest.mark.slow
def test_report_and_calibration_end_to_end(setup, tmp_path):
    frame, bounds, predictor, cfg = setup
    cal = calibrate_on_validation(cfg, predictor, frame, bounds, out_path=tmp_path / "calibration.json")
    assert cal.n_anchors >= 10 and load_calibration(tmp_path / "calibration.json").method == cal.method
    # the fit's own uncertainty: its validation coverage with an interval over the validation dates
    fitted = cal.coverage_after["0.8"]
    assert fitted["interval"][0] <= fitted["coverage"] <= fitted["interval"][1] < 1.0 + 1e-9
    cfg.update({"eval_seeds": [1, 2]})
    passed = forecast_split(
        cfg, frame, "test", bounds["val_end"], bounds["test_end"], {"finetuned": predictor}, seeds=cfg.eval_seeds
    )
    assert len(passed.paths["finetuned"]) == 2 and passed.first("finetuned").records is not None
    report = build_report(cfg, frame, bounds, passed, str(tmp_path / "r"), calibrations={"finetuned": cal})
    assert set(report["forecasters"]) == {"finetuned", "last_value", "drift", "random_walk"}
    fin = report["forecasters"]["finetuned"]
    assert 0 <= fin["dm_vs_last_value"]["p_value"] <= 1
    assert len(fin["by_step"]["mase"]) == 3
    assert report["forecasters"]["last_value"]["overall"]["width_0.8"] == 0.0
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    comp = saved["calibration"]["finetuned"]
    assert comp["calibrated"]["coverage_0.8"] is not None
    # coverage by horizon step and by tercile of recent volatility, each with its interval over dates
    by_vol, by_vol_ci = (
        comp["calibrated"]["coverage_0.8_by_vol_tercile"],
        comp["calibrated"]["coverage_0.8_by_vol_tercile_ci"],
    )
    assert len(by_vol) == 3 and len(by_vol_ci) == 3 and comp["vol_tercile_edges"][0] <= comp["vol_tercile_edges"][1]
    fc = passed.first("finetuned")
    low = fc.vol < comp["vol_tercile_edges"][0]  # the calm third of the forecasts
    lo, hi = cal.quantiles(fc.samples, fc.last_close, [0.1, 0.9], fc.vol)
    inside = (fc.true >= lo) & (fc.true <= hi)
    assert by_vol[0] == pytest.approx(inside[low].mean()) and by_vol_ci[0][0] <= by_vol[0] <= by_vol_ci[0][1]
    assert len(comp["calibrated"]["coverage_0.8_by_step_ci"]) == 3
    assert all(lo <= hi for lo, hi in comp["calibrated"]["coverage_0.8_by_step_ci"] if lo == lo)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| MASE |" in md and "random_walk" in md and "calibrated" in md
    assert "Fitted coverage on validation (in-sample, 95% interval over validation dates): 50%: " in md
    assert set(saved["calibration"]["finetuned"]["candidates"]) >= {"none", "cqr_additive", "cqr_vol", "spread_scale"}
    assert f"| {cal.method} (used) |" in md
    for name in ("error_by_horizon", "pit_histogram", "coverage_by_horizon", "reliability"):
        assert (tmp_path / "r" / f"{name}.png").stat().st_size > 1000


def test_report_anchors_stay_inside_the_test_split_and_spread_over_it(setup, tmp_path):
    """Bars after the test split's last bar (a later hold-out, say) are never targets of the report; with
    eval_max_anchors the dates are spread over the whole split, not bunched at its end."""
    frame, bounds, _, cfg = setup
    dates = np.sort(frame["timestamps"].unique())
    cut = pd.Timestamp(dates[-40])
    short = dict(bounds, test_end=cut)
    c = Config.from_dict(dict(cfg.to_dict(), eval_stride=1, eval_max_anchors=6))
    report = build_report(
        c, frame, short, forecast_split(c, frame, "test", short["val_end"], cut, {}), str(tmp_path / "r")
    )
    last_anchor = pd.Timestamp(report["anchors"]["last"])
    g = frame[frame["symbol"] == frame["symbol"].iloc[0]].reset_index(drop=True)
    pos = int(np.flatnonzero(g["timestamps"] == last_anchor)[0])
    assert g["timestamps"].iloc[pos + 3] <= cut < g["timestamps"].iloc[pos + 4]  # the last anchor's targets end at it
    assert report["anchors"]["n_dates"] == 6
    first = pd.Timestamp(report["anchors"]["first"])
    assert first <= bounds["val_end"] + pd.Timedelta(days=7)  # the first date of the split is one of the six


def test_config_keys_are_checked():
    from kronos.errors import ConfigError

    with pytest.raises(ConfigError, match="interval_levels"):
        Config.from_dict({"interval_levels": [0.8, 1.0]})
    with pytest.raises(ConfigError, match="eval_seeds"):
        Config.from_dict({"eval_seeds": ["a"]})


def test_coverage_interval_resamples_whole_dates():
    """Forecasts of one date miss together (a market-wide move); the interval reflects the number of dates, not
    the number of rows, and holds the coverage."""
    from kronos.evaluate.report import coverage_interval

    rng = np.random.default_rng(0)
    dates = np.repeat(np.arange(40), 25)  # 40 dates x 25 symbols
    hit_date = rng.random(40) < 0.8  # every symbol of a date is inside, or none is
    inside = np.repeat(hit_date, 25)[:, None] & np.ones((1, 3), bool)
    lo, hi = coverage_interval(inside, dates)
    assert lo <= inside.mean() <= hi
    assert hi - lo > 0.15  # ~ 40 independent draws, not 1,000
    independent = rng.random((1000, 3)) < 0.8
    lo2, hi2 = coverage_interval(independent, np.arange(1000))
    assert hi2 - lo2 < 0.07
    assert coverage_interval(inside[:25], dates[:25]) != coverage_interval(inside[:25], dates[:25])  # NaN: one date
    # overlapping horizons: runs of dates share one outcome, and a block bootstrap widens the interval
    runs = np.repeat(rng.random(8) < 0.8, 5)  # 40 dates, outcomes constant over runs of 5
    inside_runs = np.repeat(runs, 25)[:, None] & np.ones((1, 3), bool)
    lo1, hi1 = coverage_interval(inside_runs, dates, block=1)
    lo5, hi5 = coverage_interval(inside_runs, dates, block=5)
    assert hi5 - lo5 > 1.5 * (hi1 - lo1)


def test_dates_per_horizon_counts_anchor_dates_in_a_horizon():
    from kronos.evaluate.report import dates_per_horizon

    days = pd.bdate_range("2024-01-01", periods=300)
    assert dates_per_horizon(days, days[::1], 10) == 10
    assert dates_per_horizon(days, days[::5], 10) == 2
    assert dates_per_horizon(days, days[::30], 10) == 1


def test_a_symbol_suspended_for_years_is_not_forecast_across_the_gap():
    """Anchors lie at or after the last validation bar: a context that ended years before the test split does
    not 'forecast' the first bars after the gap."""
    days = pd.bdate_range("2018-01-01", periods=60).append(pd.bdate_range("2024-01-01", periods=40))
    gap = pd.DataFrame({"symbol": "GAP", "timestamps": days, "close": np.linspace(10, 20, len(days))})
    plain_days = pd.bdate_range("2023-09-01", "2024-02-23")
    plain = pd.DataFrame({"symbol": "OK", "timestamps": plain_days, "close": np.linspace(10, 20, len(plain_days))})
    frame = pd.concat([gap, plain], ignore_index=True)
    val_end = pd.Timestamp("2023-12-29")
    anchors = select_anchors(frame, val_end, None, 20, 3)
    assert (anchors["anchor"] >= val_end).all()
    assert set(anchors["symbol"]) == {"GAP", "OK"}  # GAP still forecast once it has 20 bars after the gap
    assert anchors.loc[anchors["symbol"] == "GAP", "anchor"].min() >= pd.Timestamp("2024-01-01")
