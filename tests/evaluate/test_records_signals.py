"""Record-level tools on hand-computable forecast records: backtest signals, IC by date, metrics files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kronos.errors import InputError
from kronos.evaluate import all_signals, save_metrics, signals_from_records
from kronos.evaluate.records import ic_by_date

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
                rows.append(
                    {
                        "symbol": sym,
                        "anchor": anchor,
                        "step": step,
                        "timestamps": anchor + pd.Timedelta(days=step),
                        "last_close": last,
                        "true_close": true,
                        "close": pred_fn(last, true),
                    }
                )
    return pd.DataFrame(rows)


def test_ic_by_date_of_perfect_and_anti_forecasts():
    perfect = ic_by_date(_records(lambda last, true: true))
    assert list(perfect.index) == list(DATES) and (perfect["n"] == 3).all()
    assert perfect["ic"].to_numpy() == pytest.approx(1.0) and perfect["rank_ic"].to_numpy() == pytest.approx(1.0)
    anti = ic_by_date(_records(lambda last, true: 2 * last - true))
    assert anti["ic"].to_numpy() == pytest.approx(-1.0) and anti["rank_ic"].to_numpy() == pytest.approx(-1.0)


def test_one_symbol_has_no_ic_and_unknown_outcomes_are_left_out():
    one = _records(lambda last, true: true)
    one = one[one["symbol"] == "AAA"]
    assert ic_by_date(one)["ic"].isna().all()  # no cross-section: NaN, not an exception
    unknown = _records(lambda last, true: true).assign(true_close=np.nan)
    assert ic_by_date(unknown).empty


def test_save_metrics_writes_strict_json(tmp_path):
    out = tmp_path / "metrics.json"
    save_metrics({"ic": float("nan"), "n": 3}, out)
    assert json.loads(out.read_text()) == {"ic": None, "n": 3}  # NaN became null


def test_missing_or_bad_columns_raise_input_error():
    with pytest.raises(InputError, match="true_close"):
        ic_by_date(
            pd.DataFrame({"symbol": ["X"], "anchor": ["2024-01-02"], "step": [1], "last_close": [1.0], "close": [1.0]})
        )
    with pytest.raises(InputError, match="numeric"):
        signals_from_records(
            pd.DataFrame(
                {"symbol": ["X"], "anchor": ["2024-01-02"], "step": [1], "last_close": ["abc"], "close": [1.0]}
            )
        )


def test_signals_from_records_kinds():
    recs = pd.DataFrame(
        {
            "symbol": ["S"] * 3 + ["T"] * 3,
            "anchor": pd.to_datetime(["2024-01-02"] * 6),
            "step": [3, 1, 2, 1, 2, 3],  # unsorted steps must not matter
            "last_close": [10.0] * 3 + [20.0] * 3,
            "close": [12.0, 11.0, 9.0, 20.0, 22.0, 21.0],
        }
    )
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
    from kronos.evaluate.signals import signals_from_records as sig

    rec = pd.DataFrame(
        {
            "symbol": ["A", "A", "B", "B"],
            "anchor": pd.to_datetime(["2024-01-02"] * 4),
            "step": [1, 2, 1, 2],
            "last_close": [10.0, 10.0, 100.0, 100.0],
            "close_scale": [0.5, 0.5, 20.0, 20.0],
            "close": [11.0, 12.0, 110.0, 90.0],
        }
    )
    last = sig(rec, "last", scale="std")
    assert last.loc[(pd.Timestamp("2024-01-02"), "A")] == pytest.approx(4.0)
    assert last.loc[(pd.Timestamp("2024-01-02"), "B")] == pytest.approx(-0.5)
    mx = sig(rec, "max", scale="std")
    assert mx.loc[(pd.Timestamp("2024-01-02"), "B")] == pytest.approx(0.5)
    ret = sig(rec, "last", scale="price")
    assert ret.loc[(pd.Timestamp("2024-01-02"), "A")] == pytest.approx(0.2)
    with pytest.raises(InputError, match="close_scale"):
        sig(rec.drop(columns="close_scale"), "last", scale="std")
