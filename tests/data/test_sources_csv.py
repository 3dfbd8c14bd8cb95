"""CSV/Parquet source end to end: file, folder, long file, Parquet; errors; a failed run keeps the old dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos.config import Config
from kronos.data.schema import SPLIT_COLUMNS
from kronos.data.sources import DataProcessorFactory
from kronos.data.sources.csv import read_kline_file
from kronos.data.store import dataset_exists, load_manifest, load_split
from kronos.errors import ConfigError, DataError

CSV = Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return pd.read_csv(CSV)


def run_csv(path, dataset, **kw) -> dict:
    cfg = Config(
        csv_data_path=str(path),
        dataset_path=str(dataset),
        lookback_window=20,
        predict_window=5,
        split_ratios=[0.7, 0.15, 0.15],
        **kw,
    )
    return DataProcessorFactory.create_processor("csv", cfg).run_pipeline()


def test_single_csv_file_5min_bars(tmp_path, table):
    manifest = run_csv(CSV, tmp_path / "ds")
    assert manifest["source"] == "csv" and manifest["symbols"] == ["kline_5min"]
    frames = {s: load_split(tmp_path / "ds", s) for s in ("train", "val", "test")}
    assert sum(manifest["splits"][s]["rows"] for s in frames) == 2500 + 2 * 20
    train = frames["train"]
    assert list(train.columns) == list(SPLIT_COLUMNS)
    assert train["minute"].nunique() > 1 and (train["hour"] > 0).all()  # intraday features are real
    src = table.head(len(train))
    np.testing.assert_allclose(train["close"].to_numpy(), src["close"].to_numpy())
    assert (train["timestamps"].to_numpy() == pd.to_datetime(src["timestamps"]).to_numpy()).all()
    assert manifest["median_bar_seconds"] == 300.0


def test_folder_of_mixed_files_with_aliased_headers(tmp_path, table):
    folder = tmp_path / "raw"
    folder.mkdir()
    a = table.iloc[:1500].rename(columns={"timestamps": "DateTime", "volume": "Vol", "amount": "Amt"})
    a.to_csv(folder / "AAA.csv", index=False)
    b = table.iloc[1000:].drop(columns=["amount"]).rename(columns=str.upper)
    b.to_parquet(folder / "BBB.parquet", index=False)
    (folder / "README.md").write_text("not data")
    manifest = run_csv(folder, tmp_path / "ds")
    assert manifest["symbols"] == ["AAA", "BBB"]
    test = load_split(tmp_path / "ds", "test")
    bbb = test[test["symbol"] == "BBB"]
    expected = bbb[["open", "high", "low", "close"]].mean(axis=1) * bbb["volume"]
    np.testing.assert_allclose(bbb["amount"].to_numpy(), expected.to_numpy())  # amount derived


def test_long_file_with_symbol_column_keeps_leading_zeros(tmp_path, table):
    long = pd.concat([table.assign(code="000001"), table.iloc[:800].assign(code="600000")], ignore_index=True)
    long.to_csv(tmp_path / "long.csv", index=False)
    manifest = run_csv(tmp_path / "long.csv", tmp_path / "ds")
    assert manifest["symbols"] == ["000001", "600000"]
    assert set(load_split(tmp_path / "ds", "train")["symbol"]) == {"000001", "600000"}
    assert set(load_split(tmp_path / "ds", "val")["symbol"]) == {"000001"}  # 600000 ends before the cut date
    # an explicit column name overrides auto-detection
    long.rename(columns={"code": "Asset"}).to_csv(tmp_path / "long2.csv", index=False)
    manifest = run_csv(tmp_path / "long2.csv", tmp_path / "ds2", csv_symbol_column="asset")
    assert manifest["symbols"] == ["000001", "600000"]


def test_parquet_file_with_datetime_index_and_no_volume(tmp_path, table):
    frame = table.drop(columns=["volume", "amount"])
    frame = frame.set_index(pd.DatetimeIndex(pd.to_datetime(frame.pop("timestamps")), name="ts"))
    frame.to_parquet(tmp_path / "SYM.pq")
    manifest = run_csv(tmp_path / "SYM.pq", tmp_path / "ds")
    assert manifest["symbols"] == ["SYM"]
    train = load_split(tmp_path / "ds", "train")
    assert (train["volume"] == 0).all() and (train["amount"] == 0).all()  # predictor convention (Q10)


def test_csv_errors_are_one_clear_message(tmp_path, table):
    with pytest.raises(ConfigError, match="csv_data_path"):
        run_csv("", tmp_path / "ds")
    with pytest.raises(DataError, match=r"does not exist"):
        run_csv(tmp_path / "missing.csv", tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no data files"):
        run_csv(tmp_path / "empty", tmp_path / "ds")
    bad_ts = table.copy()
    bad_ts.loc[41, "timestamps"] = "2024-13-45 99:00"
    bad_ts.to_csv(tmp_path / "bad_ts.csv", index=False)
    with pytest.raises(DataError, match=r"bad_ts\.csv.*line 43.*2024-13-45"):
        run_csv(tmp_path / "bad_ts.csv", tmp_path / "ds")
    table.drop(columns=["low"]).to_csv(tmp_path / "no_low.csv", index=False)
    with pytest.raises(DataError, match=r"no_low\.csv.*'low' is missing"):
        run_csv(tmp_path / "no_low.csv", tmp_path / "ds")
    table.assign(high=table["low"] / 2).to_csv(tmp_path / "impossible.csv", index=False)
    with pytest.raises(DataError, match=r"no symbol has 26 clean rows"):
        run_csv(tmp_path / "impossible.csv", tmp_path / "ds")
    (tmp_path / "garbage.parquet").write_bytes(b"\x00\x01 definitely not parquet")
    with pytest.raises(DataError, match=r"cannot read file .*garbage\.parquet"):
        run_csv(tmp_path / "garbage.parquet", tmp_path / "ds")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataError, match=r"blank\.csv.*empty"):
        run_csv(tmp_path / "blank.csv", tmp_path / "ds")
    with pytest.raises(DataError, match=r"split 'test' is empty.*test_time_range"):
        DataProcessorFactory.create_processor(
            "csv",
            Config(
                csv_data_path=str(CSV),
                dataset_path=str(tmp_path / "ds"),
                lookback_window=20,
                predict_window=5,
                train_time_range=["2024-06-01", "2024-07-31"],
                val_time_range=["2024-08-01", "2024-08-31"],
                test_time_range=["2025-01-01", "2025-06-30"],
            ),
        ).run_pipeline()
    with pytest.raises(DataError, match="symbol column 'ticker'"):
        run_csv(CSV, tmp_path / "ds", csv_symbol_column="ticker")
    assert not (tmp_path / "ds").exists()


def test_failed_run_leaves_previous_dataset_untouched(tmp_path, table):
    run_csv(CSV, tmp_path / "ds")
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    bad = table.copy()
    bad.loc[100, "timestamps"] = "garbage"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError):
        run_csv(tmp_path / "bad.csv", tmp_path / "ds")
    after = {str(p.relative_to(tmp_path)): p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    assert after == before and dataset_exists(tmp_path / "ds")
    assert load_manifest(tmp_path / "ds")["symbols"] == ["kline_5min"]


def test_read_kline_file_for_forecast_input(tmp_path, table):
    frame = read_kline_file(CSV)
    assert len(frame) == 2500 and frame["timestamps"].is_monotonic_increasing
    long = pd.concat([table.assign(symbol="A"), table.assign(symbol="B")], ignore_index=True)
    long.to_csv(tmp_path / "long.csv", index=False)
    with pytest.raises(DataError, match="holds 2 symbols"):
        read_kline_file(tmp_path / "long.csv")
    assert len(read_kline_file(tmp_path / "long.csv", symbol="B")) == 2500


def test_same_symbol_in_two_files_is_an_error_naming_both(tmp_path, table):
    folder = tmp_path / "raw"
    folder.mkdir()
    table.iloc[:1500].to_csv(folder / "AAA.csv", index=False)
    table.iloc[1000:].to_parquet(folder / "AAA.parquet", index=False)
    table.iloc[:1500].to_csv(folder / "BBB.csv", index=False)
    with pytest.raises(DataError) as info:
        run_csv(folder, tmp_path / "ds")
    msg = str(info.value)
    assert "symbol 'AAA' comes from more than one file" in msg and "AAA.csv" in msg and "AAA.parquet" in msg
    assert "\n" not in msg and not (tmp_path / "ds").exists()
    # a long export split over two files is one history in parts, not a duplicate
    (folder / "AAA.parquet").unlink()
    (folder / "AAA.csv").unlink()
    table.iloc[:1200].assign(symbol="CCC").to_csv(folder / "part1.csv", index=False)
    table.iloc[1200:].assign(symbol="CCC").to_csv(folder / "part2.csv", index=False)
    assert run_csv(folder, tmp_path / "ds")["symbols"] == ["BBB", "CCC"]


def test_mixed_time_zone_offsets_are_rejected_with_the_line(tmp_path, table):
    t = table.iloc[:300].copy()
    stamps = pd.to_datetime(t["timestamps"])
    t["timestamps"] = stamps.dt.strftime("%Y-%m-%d %H:%M:%S+08:00")
    # one bar written in UTC: by local clock it would sort 8 hours early
    t.loc[t.index[150], "timestamps"] = (stamps.iloc[150] - pd.Timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S+00:00")
    t.to_csv(tmp_path / "AAA.csv", index=False)
    with pytest.raises(DataError, match=r"mixes UTC offsets \+08:00 and \+00:00 \(first at line 152, value "):
        run_csv(tmp_path / "AAA.csv", tmp_path / "ds")
    # daylight-saving offsets whose wall clock agrees with true time keep their local wall time
    dst = pd.Series(["2024-03-08 15:00:00-05:00", "2024-03-11 15:00:00-04:00", "2024-03-12 15:00:00-04:00"])
    from kronos.data.schema import parse_timestamps

    assert parse_timestamps(dst, "x").dt.hour.tolist() == [15, 15, 15]
    fall_back = pd.Series(["2024-11-03 01:30:00-04:00", "2024-11-03 01:10:00-05:00"])
    with pytest.raises(DataError, match="disagree on the order of bars at row 2"):
        parse_timestamps(fall_back, "x")
