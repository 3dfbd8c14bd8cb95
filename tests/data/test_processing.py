"""Schema validation, cleaning, calendar features and splits on real 5-minute bars (tests/data/kline_5min.csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos.config import Config
from kronos.data.processing import (
    BAR_TOLERANCE,
    add_time_features,
    clean_kline_frame,
    process_frames,
    split_frames,
)
from kronos.data.schema import KLINE_COLUMNS, SPLIT_COLUMNS, validate_kline_frame
from kronos.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[1] / "fixtures"
CSV = DATA / "kline_5min.csv"


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return validate_kline_frame(pd.read_csv(CSV), "kline_5min.csv")


def small_config(**kw) -> Config:
    base = dict(lookback_window=20, predict_window=5)
    base.update(kw)
    return Config(**base)


# ---------------------------------------------------------------------------- schema
def test_validate_matches_aliases_case_insensitively(bars):
    raw = pd.read_csv(CSV).rename(
        columns={
            "timestamps": "Date",
            "open": "OPEN",
            "high": "High",
            "low": "low",
            "close": "Close",
            "volume": "Vol",
            "amount": "Turnover",
        }
    )
    out = validate_kline_frame(raw, "renamed")
    assert list(out.columns) == list(KLINE_COLUMNS)
    assert str(out["timestamps"].dtype) == "datetime64[ns]"
    assert all(out[c].dtype == np.float64 for c in KLINE_COLUMNS[1:])
    pd.testing.assert_frame_equal(out, bars)


def test_validate_missing_volume_zeroes_volume_and_amount_and_missing_amount_is_derived(bars):
    raw = pd.read_csv(CSV)
    no_vol = validate_kline_frame(raw.drop(columns=["volume"]), "x")
    assert (no_vol["volume"] == 0).all() and (no_vol["amount"] == 0).all()
    no_amt = validate_kline_frame(raw.drop(columns=["amount"]), "x")
    expected = raw[["open", "high", "low", "close"]].mean(axis=1) * raw["volume"]
    np.testing.assert_allclose(no_amt["amount"].to_numpy(), expected.to_numpy())


def test_validate_tz_aware_and_date_plus_time_columns():
    frame = pd.DataFrame(
        {
            "date": ["2024-06-18", "2024-06-18"],
            "time": ["09:35", "09:40"],
            "open": [1.0, 1.0],
            "high": [1.1, 1.1],
            "low": [0.9, 0.9],
            "close": [1.0, 1.05],
        }
    )
    out = validate_kline_frame(frame, "x")
    assert list(out["timestamps"]) == [pd.Timestamp("2024-06-18 09:35"), pd.Timestamp("2024-06-18 09:40")]
    tz = pd.DataFrame(
        {
            "timestamps": ["2024-03-08 09:30:00-05:00", "2024-03-11 09:30:00-04:00"],
            "open": [1, 1],
            "high": [1, 1],
            "low": [1, 1],
            "close": [1, 1],
            "volume": [1, 1],
        }
    )
    out = validate_kline_frame(tz, "x")  # mixed offsets (DST): local wall time kept, tz dropped
    assert list(out["timestamps"].dt.hour) == [9, 9] and out["timestamps"].dt.tz is None


def test_validate_yyyymmdd_integers():
    frame = pd.DataFrame(
        {
            "trade_date": [20240102, 20240103],
            "open": [1, 2],
            "high": [2, 3],
            "low": [1, 1],
            "close": [2, 2],
            "vol": [10, 20],
        }
    )
    out = validate_kline_frame(frame, "x")
    assert list(out["timestamps"]) == [pd.Timestamp("2024-01-02"), pd.Timestamp("2024-01-03")]


def test_validate_errors_name_the_source_column_and_line():
    raw = pd.read_csv(CSV).head(10)
    raw.loc[3, "timestamps"] = "not a date"
    with pytest.raises(DataError, match=r"file 'a\.csv'.*'timestamps'.*line 5.*not a date"):
        validate_kline_frame(raw, "file 'a.csv'", line_offset=2)
    with pytest.raises(DataError, match=r"'close' is missing"):
        validate_kline_frame(pd.read_csv(CSV).drop(columns=["close"]), "file 'a.csv'")
    with pytest.raises(DataError, match="no timestamp column"):
        validate_kline_frame(pd.read_csv(CSV).drop(columns=["timestamps"]), "x")
    text = pd.read_csv(CSV).head(5).assign(high="n/a")
    with pytest.raises(DataError, match="'high' holds no numbers"):
        validate_kline_frame(text, "x")


# ---------------------------------------------------------------------------- cleaning
def test_clean_sorts_dedupes_keeping_last_and_drops_bad_bars(bars):
    frame = bars.head(50).copy()
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    dup = frame.iloc[[10]].copy()
    dup["close"] = dup["low"]  # a corrected copy of bar 10, later in the file: it must win
    bad = frame.iloc[[20, 21, 22, 23, 24, 25]].copy()
    bad.iloc[0, bad.columns.get_loc("high")] = bad.iloc[0]["low"] * 0.5  # high < low
    bad.iloc[1, bad.columns.get_loc("close")] = bad.iloc[1]["high"] * 1.01  # close above high
    bad.iloc[2, bad.columns.get_loc("volume")] = -1.0
    bad.iloc[3, bad.columns.get_loc("open")] = 0.0
    bad.iloc[4, bad.columns.get_loc("close")] = np.nan
    bad.iloc[5, bad.columns.get_loc("amount")] = np.inf
    bad["timestamps"] = bad["timestamps"] + pd.Timedelta(days=365)  # distinct times, not duplicates
    ok_within_tol = frame.iloc[[30]].copy()
    ok_within_tol["timestamps"] += pd.Timedelta(days=400)
    ok_within_tol["close"] = ok_within_tol["high"] * (1 + BAR_TOLERANCE / 10)
    amt_nan = frame.iloc[[31]].copy()
    amt_nan["timestamps"] += pd.Timedelta(days=401)
    amt_nan["amount"] = np.nan
    messy = pd.concat([shuffled, dup, bad, ok_within_tol, amt_nan], ignore_index=True)

    clean, stats = clean_kline_frame(messy, "T")
    assert stats.duplicates == 1 and stats.missing == 2 and stats.impossible == 4 and stats.amount_derived == 1
    assert stats.rows_out == len(clean) == 50 + 2
    assert clean["timestamps"].is_monotonic_increasing and clean["timestamps"].is_unique
    assert clean.loc[clean["timestamps"] == frame.loc[10, "timestamps"], "close"].item() == dup["close"].item()
    derived = clean.loc[clean["timestamps"] == amt_nan["timestamps"].item(), "amount"].item()
    row = amt_nan.iloc[0]
    assert derived == pytest.approx(np.mean([row.open, row.high, row.low, row.close]) * row.volume)


def test_time_features_intraday_and_daily(bars):
    feats = add_time_features(bars.head(3))
    first = pd.Timestamp(bars["timestamps"].iloc[0])
    assert feats.loc[0, ["minute", "hour", "weekday", "day", "month"]].tolist() == [
        first.minute,
        first.hour,
        first.weekday(),
        first.day,
        first.month,
    ]
    assert all(feats[c].dtype == np.int64 for c in ("minute", "hour", "weekday", "day", "month"))
    daily = add_time_features(pd.DataFrame({"timestamps": pd.to_datetime(["2024-06-17", "2024-06-23"])}))
    assert daily["minute"].tolist() == [0, 0] and daily["hour"].tolist() == [0, 0]
    assert daily["weekday"].tolist() == [0, 6]  # Monday = 0


# ---------------------------------------------------------------------------- splits
def test_time_range_split_is_inclusive_of_intraday_end_day_and_may_overlap(bars):
    frames = {"A": add_time_features(bars)}
    cfg = small_config(
        train_time_range=["2024-06-18", "2024-07-31"],
        val_time_range=["2024-07-25", "2024-08-10"],
        test_time_range=["2024-08-05 10:00:00", "2024-08-29"],
    )
    splits, info = split_frames(frames, cfg)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train["timestamps"].max().date() == pd.Timestamp("2024-07-31").date()
    assert train["timestamps"].max().hour >= 14  # the whole end day, not just midnight
    assert val["timestamps"].min() < train["timestamps"].max()  # overlap kept
    assert test["timestamps"].min() >= pd.Timestamp("2024-08-05 10:00:00")
    assert test["timestamps"].max() == bars["timestamps"].max()
    assert info["val"]["time_range"] == ["2024-07-25", "2024-08-10"]
    assert info["train"]["rows"] == len(train)
    for frame in splits.values():
        assert list(frame.columns) == list(SPLIT_COLUMNS)
        assert not frame.duplicated(["symbol", "timestamps"]).any()


def test_short_symbol_is_dropped_from_a_split_and_recorded(bars):
    cfg = small_config(
        train_time_range=["2024-06-18", "2024-07-31"],
        val_time_range=["2024-08-01", "2024-08-15"],
        test_time_range=["2024-08-16", "2024-08-29"],
    )
    long = add_time_features(bars)
    short = long[long["timestamps"] >= pd.Timestamp("2024-08-15 14:00")].reset_index(drop=True)  # ~few val rows
    splits, info = split_frames({"LONG": long, "SHORT": short}, cfg)
    assert set(splits["val"]["symbol"]) == {"LONG"}
    assert "SHORT" in info["val"]["dropped_symbols"]
    assert set(splits["test"]["symbol"]) == {"LONG", "SHORT"}


def test_ratio_split_cuts_every_symbol_at_one_global_date(bars):
    cfg = small_config(split_ratios=[0.6, 0.2, 0.2])
    a = add_time_features(bars)  # 2500 bars
    b = add_time_features(bars.iloc[1000:].reset_index(drop=True))  # listed later: 1500 bars, same end
    splits, info = split_frames({"A": a, "B": b}, cfg)
    pooled = np.sort(np.concatenate([a["timestamps"].to_numpy(), b["timestamps"].to_numpy()]))
    cut1, cut2 = pd.Timestamp(pooled[round(0.6 * 4000) - 1]), pd.Timestamp(pooled[round(0.8 * 4000) - 1])
    assert pd.Timestamp(info["train"]["last"]) == cut1 and pd.Timestamp(info["val"]["last"]) == cut2
    for sym, frame in (("A", a), ("B", b)):
        train = splits["train"][splits["train"]["symbol"] == sym]
        val = splits["val"][splits["val"]["symbol"] == sym]
        test = splits["test"][splits["test"]["symbol"] == sym]
        assert train["timestamps"].max() == cut1  # one cut date, whatever the symbol's length
        own_val = val[val["timestamps"] > cut1]
        assert own_val["timestamps"].max() == cut2
        assert len(val) - len(own_val) == 20  # lookback_window bars of history from the train period
        assert (test["timestamps"] > cut2).sum() == (frame["timestamps"] > cut2).sum()
        assert len(test) - (test["timestamps"] > cut2).sum() == 20
        assert test["timestamps"].max() == frame["timestamps"].max()
    assert pd.Timestamp(info["val"]["first"]) > cut1 and pd.Timestamp(info["test"]["first"]) > cut2
    assert info["train"]["ratio"] == 0.6
    # about 60/20/20 of all bars, counted over both symbols
    assert abs(info["train"]["target_rows"] - 2400) <= 2 and abs(info["test"]["target_rows"] - 800) <= 2


def test_time_range_split_owns_only_bars_after_the_previous_split(bars):
    cfg = small_config(
        train_time_range=["2024-06-18", "2024-07-31"],
        val_time_range=["2024-07-01", "2024-08-10"],
        test_time_range=["2024-08-05", "2024-08-29"],
    )
    splits, info = split_frames({"A": add_time_features(bars)}, cfg)
    train_last = splits["train"]["timestamps"].max()
    assert pd.Timestamp(info["val"]["first"]) > train_last
    assert pd.Timestamp(info["test"]["first"]) > pd.Timestamp(info["val"]["last"])
    # history = lookback_window bars before the first own bar, not the whole overlapping range
    assert info["val"]["rows"] - info["val"]["target_rows"] == 20
    assert pd.Timestamp(info["val"]["history_from"]) < train_last


def test_empty_split_names_split_range_and_key(bars):
    cfg = small_config(
        train_time_range=["2024-06-18", "2024-07-31"],
        val_time_range=["2024-08-01", "2024-08-15"],
        test_time_range=["2030-01-01", "2030-12-31"],
    )
    with pytest.raises(DataError, match=r"split 'test' is empty.*test_time_range.*2030-01-01.*'test_time_range'"):
        split_frames({"A": add_time_features(bars)}, cfg)
    with pytest.raises(DataError, match=r"split 'test' is empty.*split_ratios"):
        split_frames({"A": add_time_features(bars)}, small_config(split_ratios=[0.9, 0.1, 0.0]))


def test_bad_time_range_is_a_config_error(bars):
    with pytest.raises(ConfigError, match="train_time_range"):  # rejected when the config is built
        small_config(train_time_range=["2024-13-45", "2024-07-31"])
    cfg = small_config()
    cfg.train_time_range = ["2024-08-01", "2024-07-31"]  # set on the object afterwards: caught when used
    with pytest.raises(ConfigError, match="train_time_range"):
        split_frames({"A": add_time_features(bars)}, cfg)


def test_process_frames_skips_short_symbols_and_redacts_secrets(bars):
    cfg = small_config(
        split_ratios=[0.7, 0.15, 0.15], comet_config={"api_key": "SECRET", "project_name": "p", "workspace": "w"}
    )
    raw = {"A": bars, "TINY": bars.head(10), "BAD": bars.head(200).assign(high=0.5 * bars["low"].head(200))}
    splits, manifest = process_frames(raw, cfg, "test-source", skipped={"GONE": "not listed"})
    assert set(manifest["skipped_symbols"]) == {"TINY", "BAD", "GONE"}
    assert manifest["symbols"] == ["A"]
    assert manifest["cleaning"]["impossible"] == 200
    assert manifest["config"]["comet_config"]["api_key"] == "***"
    assert manifest["source"] == "test-source" and manifest["median_bar_seconds"] == 300.0
    assert {s: manifest["splits"][s]["rows"] for s in splits} == {s: len(f) for s, f in splits.items()}


def test_all_rows_filtered_away_is_one_clear_error(bars):
    raw = {"A": bars.assign(close=np.nan)}
    with pytest.raises(DataError, match=r"no symbol has 26 clean rows"):
        process_frames(raw, small_config(split_ratios=[0.7, 0.15, 0.15]), "csv")


# ---------------------------------------------------------------------------- price spikes
def test_price_spikes_are_flagged_then_dropped_or_kept(bars, caplog):
    import logging

    from _support.training import qlib_frame

    spiky = bars.copy()
    spiky.loc[1000, ["high", "close"]] = 1e12  # a vendor error
    spiky.loc[2000, ["open", "low"]] = 1e-6
    with caplog.at_level(logging.WARNING, logger="kronos.data.processing"):
        clean, stats = clean_kline_frame(spiky, "AAA")
    assert stats.spikes == 2 and len(clean) == len(bars) - 2 and clean["high"].max() < 1e3
    assert any(
        "2 price spike(s)" in r.getMessage() and str(bars.loc[1000, "timestamps"]) in r.getMessage()
        for r in caplog.records
    )
    kept, stats = clean_kline_frame(spiky, "AAA", drop_spikes=False)
    assert stats.spikes == 2 and len(kept) == len(bars)
    off, stats = clean_kline_frame(spiky, "AAA", spike_factor=0)
    assert stats.spikes == 0 and len(off) == len(bars)
    # through the data step: config keys and the manifest's cleaning counts
    _, manifest = process_frames({"AAA": spiky}, small_config(split_ratios=[0.7, 0.15, 0.15]), "csv")
    assert manifest["cleaning"]["spikes"] == 2
    splits, manifest = process_frames(
        {"AAA": spiky}, small_config(split_ratios=[0.7, 0.15, 0.15], price_spike_action="keep"), "csv"
    )
    assert manifest["cleaning"]["spikes"] == 2 and max(f["high"].max() for f in splits.values()) == 1e12
    # real data (5-minute bars, daily Qlib bars with limit moves) has none
    assert clean_kline_frame(bars, "real")[1].spikes == 0
    daily = qlib_frame()
    assert sum(clean_kline_frame(g.drop(columns="symbol"), s)[1].spikes for s, g in daily.groupby("symbol")) == 0


@pytest.mark.parametrize(
    "overrides", [{"price_spike_factor": 0.5}, {"price_spike_factor": float("nan")}, {"price_spike_action": "ignore"}]
)
def test_price_spike_keys_are_validated(overrides):
    with pytest.raises(ConfigError, match="price_spike"):
        Config(**overrides)
