"""Forecast metrics and signals on hand-computable records."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from kronos.errors import InputError
from kronos.evaluate import all_signals, forecast_metrics, metrics_by_step, save_metrics, signals_from_records

DATES = pd.to_datetime(["2024-01-02", "2024-01-03", "2024-01-04"])


def _records(pred_fn, n_steps: int = 3) -> pd.DataFrame:
    """Three symbols, three consecutive anchors; the true path moves linearly at a symbol-specific rate."""
    rates = {"AAA": 0.02, "BBB": -0.01, "CCC": 0.005}
    rows = []
    for sym, rate in rates.items():
        for k, anchor in enumerate(DATES):
            last = 10.0 * (1 + rate) ** k
            for step in range(1, n_steps + 1):
                true = last * (1 + rate * step)
                rows.append({
                    "symbol": sym, "datetime": anchor, "step": step,
                    "timestamps": anchor + pd.Timedelta(days=step),
                    "last_close": last, "true_close": true, "pred_close": pred_fn(last, true),
                })
    return pd.DataFrame(rows)


def test_perfect_forecast():
    m = forecast_metrics(_records(lambda last, true: true))
    assert m["model/mse"] == 0.0 and m["model/mae"] == 0.0
    assert m["model/direction_accuracy"] == 1.0
    assert m["model/ic"] == pytest.approx(1.0) and m["model/rank_ic"] == pytest.approx(1.0)
    assert m["n_ic_dates"] == 3 and m["n_forecasts"] == 9 and m["n_rows"] == 27
    # the last-value forecast is worse than perfect
    assert m["naive/mse"] > 0 and m["naive/mae"] > 0


def test_anti_forecast_has_negative_ic_and_zero_direction():
    m = forecast_metrics(_records(lambda last, true: 2 * last - true))
    assert m["model/ic"] == pytest.approx(-1.0)
    assert m["model/rank_ic"] == pytest.approx(-1.0)
    assert m["model/direction_accuracy"] == 0.0


def test_hand_computed_errors_and_naive_baselines():
    recs = pd.DataFrame({
        "symbol": ["X", "X"], "datetime": pd.to_datetime(["2024-01-02"] * 2), "step": [1, 2],
        "last_close": [10.0, 10.0], "true_close": [11.0, 12.0], "pred_close": [10.5, 13.0],
    })
    m = forecast_metrics(recs)
    assert m["model/mse"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["model/mae"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["naive/mse"] == pytest.approx((1.0 + 4.0) / 2)
    assert m["naive/mae"] == pytest.approx(1.5)
    assert m["model/mape"] == pytest.approx((0.5 / 11 + 1.0 / 12) / 2)
    assert m["model/direction_accuracy"] == 1.0
    # one symbol, one anchor: no cross-section and no previous anchor -> NaN, not an exception
    assert math.isnan(m["model/ic"]) and math.isnan(m["model/icir"])
    assert math.isnan(m["naive/direction_accuracy"])
    assert m["naive/up_fraction"] == 1.0


def test_naive_momentum_direction_and_ic():
    # two symbols, two anchors, horizon 1. A: 10 -> 11 (anchor 2), then 12; B: 10 -> 9, then 10.
    recs = pd.DataFrame({
        "symbol": ["A", "A", "B", "B"],
        "datetime": pd.to_datetime(["2024-01-02", "2024-01-03"] * 2),
        "step": [1, 1, 1, 1],
        "last_close": [10.0, 11.0, 10.0, 9.0],
        "true_close": [11.0, 12.0, 9.0, 10.0],
        "pred_close": [11.0, 12.0, 9.0, 10.0],
    })
    m = forecast_metrics(recs)
    # momentum at anchor 2: A up (continues up: right), B down (reverses up: wrong)
    assert m["naive/direction_accuracy"] == pytest.approx(0.5)
    # at anchor 2 the momentum signal (A +10%, B -10%) vs realised (A +9.1%, B +11.1%) is anti-correlated
    assert m["naive/ic"] == pytest.approx(-1.0)
    assert math.isnan(m["naive/icir"])  # a single IC date has no std
    assert m["model/ic"] == pytest.approx(1.0) and m["n_ic_dates"] == 2
    assert m["model/ic_std"] == pytest.approx(0.0) and math.isnan(m["model/icir"])  # zero spread: no ICIR


def test_quantile_metrics():
    recs = pd.DataFrame({
        "symbol": ["X", "X"], "datetime": pd.to_datetime(["2024-01-02"] * 2), "step": [1, 2],
        "last_close": [10.0, 10.0], "true_close": [11.0, 14.0], "pred_close": [11.0, 12.0],
        "pred_close_q0.1": [10.0, 11.0], "pred_close_q0.9": [12.0, 13.0],
    })
    m = forecast_metrics(recs)
    # row 1: y=11 inside [10, 12]; row 2: y=14 above [11, 13]
    assert m["model/coverage"] == pytest.approx(0.5)
    assert m["model/coverage_nominal"] == pytest.approx(0.8)
    # pinball q0.1: 0.1*(11-10)=0.1 and 0.1*(14-11)=0.3 ; q0.9: 0.1*(12-11)=0.1 and 0.9*(14-13)=0.9
    assert m["model/pinball_q0.1"] == pytest.approx(0.2)
    assert m["model/pinball_q0.9"] == pytest.approx(0.5)
    scale = 11.0 + 14.0
    assert m["model/wql"] == pytest.approx(np.mean([2 * 0.4 / scale, 2 * 1.0 / scale]))
    # naive puts every quantile at last_close=10: q0.1 -> 0.1*1, 0.1*4 ; q0.9 -> 0.9*1, 0.9*4
    assert m["naive/pinball_q0.1"] == pytest.approx(0.25)
    assert m["naive/pinball_q0.9"] == pytest.approx(2.25)
    assert m["model/wql"] < m["naive/wql"]


def test_unknown_future_and_small_data_give_nan_not_errors(tmp_path):
    recs = _records(lambda last, true: true)
    recs["true_close"] = np.nan
    m = forecast_metrics(recs)
    assert m["n_rows"] == 0 and math.isnan(m["model/mse"]) and math.isnan(m["model/direction_accuracy"])
    assert math.isnan(m["model/ic"])
    out = tmp_path / "metrics.json"
    save_metrics(m, out)
    loaded = json.loads(out.read_text())  # strict JSON: NaN became null
    assert loaded["model/mse"] is None and loaded["n_rows"] == 0


def test_missing_columns_raise_input_error():
    with pytest.raises(InputError, match="true_close"):
        forecast_metrics(pd.DataFrame({"symbol": ["X"], "datetime": ["2024-01-02"], "step": [1],
                                       "last_close": [1.0], "pred_close": [1.0]}))
    with pytest.raises(InputError, match="numeric"):
        forecast_metrics(pd.DataFrame({"symbol": ["X"], "datetime": ["2024-01-02"], "step": [1],
                                       "last_close": ["abc"], "pred_close": [1.0], "true_close": [1.0]}))


def test_metrics_by_step():
    table = metrics_by_step(_records(lambda last, true: true))
    assert list(table.index) == [1, 2, 3]
    assert (table["model/mse"] == 0).all() and (table["n"] == 9).all()
    # the last-value error grows with the horizon for a trending path
    assert table["naive/mae"].is_monotonic_increasing


def test_signals_from_records_kinds():
    recs = pd.DataFrame({
        "symbol": ["S"] * 3 + ["T"] * 3, "datetime": pd.to_datetime(["2024-01-02"] * 6),
        "step": [3, 1, 2, 1, 2, 3],  # unsorted steps must not matter
        "last_close": [10.0] * 3 + [20.0] * 3,
        "pred_close": [12.0, 11.0, 9.0, 20.0, 22.0, 21.0],
    })
    # S path by step: 11, 9, 12 ; T path: 20, 22, 21
    expect = {"last": (0.2, 0.05), "mean": (32 / 30 - 1, 21 / 20 - 1), "max": (0.2, 0.1), "min": (-0.1, 0.0)}
    sigs = all_signals(recs)
    for kind, (s_val, t_val) in expect.items():
        sig = sigs[kind]
        assert list(sig.index.names) == ["datetime", "instrument"]
        assert sig.loc[(pd.Timestamp("2024-01-02"), "S")] == pytest.approx(s_val)
        assert sig.loc[(pd.Timestamp("2024-01-02"), "T")] == pytest.approx(t_val)
    with pytest.raises(InputError, match="signal kind"):
        signals_from_records(recs, "median")


def test_official_std_scaled_signal():
    # the official qlib_test.py scores (forecast close - last close) in normalised units: / (lookback std + 1e-5)
    from kronos.evaluate.metrics import signals_from_records as sig

    rec = pd.DataFrame({
        "symbol": ["A", "A", "B", "B"],
        "datetime": pd.to_datetime(["2024-01-02"] * 4),
        "step": [1, 2, 1, 2],
        "last_close": [10.0, 10.0, 100.0, 100.0],
        "close_scale": [0.5, 0.5, 20.0, 20.0],
        "pred_close": [11.0, 12.0, 110.0, 90.0],
    })
    last = sig(rec, "last", scale="std")
    assert last.loc[(pd.Timestamp("2024-01-02"), "A")] == pytest.approx(4.0)
    assert last.loc[(pd.Timestamp("2024-01-02"), "B")] == pytest.approx(-0.5)
    mx = sig(rec, "max", scale="std")
    assert mx.loc[(pd.Timestamp("2024-01-02"), "B")] == pytest.approx(0.5)
    ret = sig(rec, "last", scale="price")
    assert ret.loc[(pd.Timestamp("2024-01-02"), "A")] == pytest.approx(0.2)
    with pytest.raises(InputError, match="close_scale"):
        sig(rec.drop(columns="close_scale"), "last", scale="std")
