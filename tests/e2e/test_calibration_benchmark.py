"""benchmarks/calibration.py on CSV files in the layout of a downloaded index history (Date, Open, ..., Adj Close,
Volume): it loads them through the package's CSV source, fits on validation and scores every method on the test
split, where the volatility has doubled."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _support.models import save_tiny_pair

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _index_csv(path: Path, seed: int, n: int = 420) -> None:
    rng = np.random.default_rng(seed)
    vol = np.where(np.arange(n) < 260, 0.008, 0.016)  # the test split is twice as volatile
    close = 3000 * np.exp(np.cumsum(rng.normal(0, vol)))
    openp = close * np.exp(rng.normal(0, vol / 3))
    high = np.maximum(openp, close) * (1 + np.abs(rng.normal(0, vol / 2)))
    low = np.minimum(openp, close) * (1 - np.abs(rng.normal(0, vol / 2)))
    pd.DataFrame(
        {
            "Date": pd.bdate_range("2021-01-04", periods=n).strftime("%Y-%m-%d"),
            "Open": openp,
            "High": high,
            "Low": low,
            "Close": close,
            "Adj Close": close,
            "Volume": rng.integers(10**8, 10**9, n),
        }
    ).to_csv(path, index=False)


def test_calibration_benchmark_on_index_csvs(tmp_path, capsys):
    save_tiny_pair(tmp_path / "tok", tmp_path / "pred", seed=0)
    files = [tmp_path / "SPX.csv", tmp_path / "NDX.csv"]
    for i, f in enumerate(files):
        _index_csv(f, i)
    spec = importlib.util.spec_from_file_location("calibration_bench", ROOT / "benchmarks" / "calibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    rc = bench.main(
        [
            "--tokenizer",
            str(tmp_path / "tok"),
            "--predictor",
            str(tmp_path / "pred"),
            "--csv",
            *map(str, files),
            "--test-fraction",
            "0.35",
            "--val-fraction",
            "0.6",
            "--lookback",
            "40",
            "--horizon",
            "5",
            "--stride",
            "2",
            "--samples",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| vol_scaled (static) |" in printed and "| raw (none) |" in printed
    assert "| vol_scaled_adaptive |" in printed
    res = json.loads(out.read_text())
    assert res["method"] == "vol_scaled" and res["n_val"] >= 60 and res["n_test"] >= 60
    rows = res["rows"]
    assert set(rows) >= {"none", "vol_scaled", "cqr_vol", "cqr_additive"}
    # the untrained model's raw band is far off; the calibrated one widens with the doubled volatility, where a
    # correction in price units fitted on the calm validation split stays too narrow
    assert abs(rows["none"]["coverage_0.8"] - 0.8) > 0.3
    assert rows["vol_scaled"]["coverage_0.8"] >= 0.7
    assert abs(rows["vol_scaled"]["coverage_0.8"] - 0.8) < abs(rows["cqr_additive"]["coverage_0.8"] - 0.8)
    # and it is the better band overall: nearer nominal while no less sharp in quantile CRPS
    assert rows["vol_scaled"]["crps_q"] < rows["cqr_additive"]["crps_q"]
    assert rows["vol_scaled"]["crps_q"] < rows["none"]["crps_q"]
