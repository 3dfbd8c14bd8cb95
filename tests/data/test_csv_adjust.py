"""Yahoo-style files in the csv source: ``adjust`` (none | adj_close) and one summary line per run, not per file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos.config import Config
from kronos.data.schema import validate_kline_frame
from kronos.data.sources.base import DataProcessorFactory
from kronos.data.sources.csv import read_kline_file
from kronos.errors import DataError
from kronos.serve.inputs import frame_from_upload

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv"


def yahoo_frame(days: int = 60, ratio: float = 0.5) -> pd.DataFrame:
    """Daily bars as Yahoo Finance exports them (Date, Open, High, Low, Close, Adj Close, Volume), from the fixture."""
    raw = pd.read_csv(FIXTURE).head(days)
    dates = pd.bdate_range("2024-01-02", periods=days)
    return pd.DataFrame(
        {
            "Date": dates.strftime("%Y-%m-%d"),
            "Open": raw["open"],
            "High": raw["high"],
            "Low": raw["low"],
            "Close": raw["close"],
            "Adj Close": raw["close"] * np.linspace(ratio, 1.0, days),
            "Volume": raw["volume"] * 100,
        }
    )


def write_folder(tmp_path, n: int = 3, adj: bool = True):
    folder = tmp_path / "yahoo"
    folder.mkdir()
    for i in range(n):
        frame = yahoo_frame()
        if not adj:
            frame = frame.drop(columns="Adj Close")
        frame.to_csv(folder / f"T{i}.csv", index=False)
    return folder


def load(folder, **overrides):
    values = dict(data_source="csv", csv_data_path=str(folder), lookback_window=10, predict_window=2)
    cfg = Config.from_dict(dict(values, split_ratios=[0.6, 0.2, 0.2], **overrides))
    proc = DataProcessorFactory.create_processor("csv", cfg)
    return proc, proc.load_raw()


def test_adjust_none_keeps_prices_and_says_once_that_adj_close_is_unused(tmp_path, caplog):
    folder = write_folder(tmp_path)
    with caplog.at_level(logging.INFO):
        proc, frames = load(folder)
    source = yahoo_frame()
    np.testing.assert_allclose(frames["T0"]["close"], source["Close"])
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    unused = [m for m in messages if "Adj Close" in m]
    line = "csv: 3 of 3 file(s) have an 'Adj Close' column, not used (adjust: none); set adjust: adj_close"
    assert unused == [line + " for split/dividend-adjusted prices"]
    derived = [m for m in messages if "amount" in m]
    assert derived == ["csv: derived amount = volume x average price for 3 of 3 file(s)"]  # not one line per file
    assert proc.source_info["adjust"] == "none"


def test_adjust_adj_close_scales_open_high_low_close_row_by_row(tmp_path, caplog):
    folder = write_folder(tmp_path, n=2)
    with caplog.at_level(logging.INFO):
        _, frames = load(folder, adjust="adj_close")
    source = yahoo_frame()
    factor = source["Adj Close"] / source["Close"]
    for col in ("Open", "High", "Low", "Close"):
        np.testing.assert_allclose(frames["T1"][col.lower()], source[col] * factor)
    np.testing.assert_allclose(frames["T1"]["volume"], source["Volume"])  # volume stays as traded
    lines = [r.getMessage() for r in caplog.records if "scaled by Adj Close" in r.getMessage()]
    assert lines == ["csv: open/high/low/close scaled by Adj Close / Close in 2 of 2 file(s)"]


def test_adjust_adj_close_without_the_column_names_the_file(tmp_path):
    folder = write_folder(tmp_path, n=1, adj=False)
    with pytest.raises(DataError) as err:
        load(folder, adjust="adj_close")
    msg = str(err.value)
    assert "\n" not in msg and "T0.csv" in msg and "'Adj Close'" in msg and "adjust" in msg


def test_yahoo_files_work_for_forecast_and_the_service(tmp_path):
    path = tmp_path / "AAPL.csv"
    yahoo_frame().to_csv(path, index=False)
    bars = read_kline_file(path)
    assert len(bars) == 60 and bars["close"].iloc[0] == yahoo_frame()["Close"].iloc[0]  # Close, not Adj Close
    upload = validate_kline_frame(frame_from_upload(path.read_bytes(), "AAPL.csv"), "upload")  # as the service does
    assert len(upload) == 60 and np.allclose(upload["close"], yahoo_frame()["Close"])
