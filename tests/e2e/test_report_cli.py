"""`kronos calibrate`, `kronos evaluate` and `kronos forecast --calibration` on the real Qlib fixture (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from _support.models import save_tiny_pair
from _support.training import tiny_config
from kronos.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_calibrate_evaluate_and_forecast_with_calibration(tmp_path, capsys, dataset):
    cfg = tiny_config(
        tmp_path,
        dataset,
        predict_window=3,
        lookback_window=20,
        inference_sample_count=8,
        eval_stride=5,
        eval_max_anchors=10,
        calibration_min_forecasts=10,  # tiny data: keep the test fast
        eval_seeds=[1, 2],
        backtest_result_path=str(tmp_path / "bt"),
    )
    save_tiny_pair(cfg.finetuned_tokenizer, cfg.finetuned_predictor, seed=0)
    config_file = tmp_path / "config.json"
    cfg.save(config_file)

    assert main(["calibrate", "--config-path", str(config_file)]) == 0
    cal_file = Path(cfg.finetuned_predictor).parent / "calibration.json"
    cal = json.loads(cal_file.read_text())
    assert cal["n_anchors"] >= 10 and set(cal["coverage_before"]) == {"0.5", "0.8"}

    assert main(["predict", "--config-path", str(config_file)]) == 0  # latest forecasts use the calibration
    latest = pd.read_parquet(Path(cfg.backtest_dir) / "forecast_latest.parquet")
    assert {"close_q0.9_raw", "p_up_calibrated"} <= set(latest.columns)
    assert (
        latest["close_q0.9"] - latest["close_q0.1"] >= latest["close_q0.9_raw"] - latest["close_q0.1_raw"] - 1e-9
    ).all() or cal["method"] in ("cqr_multiplicative", "spread_scale", "none")
    assert main(["evaluate", "--config-path", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "last_value" in out and "finetuned" in out and "mase=" in out
    report = json.loads((Path(cfg.backtest_dir) / "report.json").read_text())
    assert report["seeds"] == [1, 2] and report["calibration"]["finetuned"]["method"] == cal["method"]
    assert pd.Timestamp(report["anchors"]["first"]) >= pd.Timestamp("2024-03-29")  # targets after validation
    assert (Path(cfg.backtest_dir) / "metrics.json").is_file()

    csv = tmp_path / "klines.csv"
    frame = pd.read_parquet(Path(dataset) / "test.parquet")
    frame = frame[frame["symbol"] == frame["symbol"].iloc[0]].iloc[-20:]
    frame[["timestamps", "open", "high", "low", "close", "volume", "amount"]].to_csv(csv, index=False)
    common = [
        "forecast",
        "--input",
        str(csv),
        "--tokenizer",
        cfg.finetuned_tokenizer,
        "--model",
        cfg.finetuned_predictor,
        "--pred-len",
        "3",
        "--sample-count",
        "8",
        "--seed",
        "1",
    ]
    assert main(common + ["--calibration", str(cal_file), "--output", str(tmp_path / "f.csv")]) == 0
    fc = pd.read_csv(tmp_path / "f.csv")
    assert {"close_q0.1", "close_q0.9", "close_q0.25", "close_q0.75", "p_up"} <= set(fc.columns)
    # a calibration for another horizon is a one-line error
    capsys.readouterr()
    assert (
        main(
            [
                "forecast",
                "--input",
                str(csv),
                "--tokenizer",
                cfg.finetuned_tokenizer,
                "--model",
                cfg.finetuned_predictor,
                "--pred-len",
                "4",
                "--calibration",
                str(cal_file),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "horizon" in err and "\n" not in err
