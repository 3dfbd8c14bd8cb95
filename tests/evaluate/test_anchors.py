"""Anchors only in the test split (issue 8 §2): no evaluation or backtest target on or before the last validation
bar, on the real Qlib fixture and on the 5-minute CSV; configured ranges that break the rule are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from _support.models import save_tiny_pair
from _support.training import tiny_config
from kronos.config import Config
from kronos.data.processing import process_frames
from kronos.data.schema import validate_kline_frame
from kronos.data.store import load_split, save_dataset
from kronos.errors import DataError
from kronos.evaluate.anchors import eval_periods
from kronos.evaluate.rolling import select_anchors
from kronos.pipeline import KronosPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
CSV = Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv"


def last_val_bar(dataset: Path) -> pd.Timestamp:
    return load_split(dataset, "val")["timestamps"].max()


def pipeline_with_tiny_models(cfg: Config) -> KronosPipeline:
    save_tiny_pair(cfg.finetuned_tokenizer, cfg.finetuned_predictor, seed=0)
    return KronosPipeline(cfg)


def assert_targets_after_validation(records: pd.DataFrame, last_val: pd.Timestamp) -> None:
    assert len(records)
    assert (records["anchor"] >= last_val).all()
    assert (records["timestamps"] > last_val).all()  # every target bar, step 1 included


@pytest.mark.slow
def test_qlib_anchors_follow_the_last_validation_bar(dataset, tmp_path):
    # the test range starts inside validation (history for the first windows), as the official configs do
    cfg = tiny_config(
        tmp_path,
        dataset,
        test_time_range=["2023-10-01", "2024-12-31"],
        backtest_time_range=["2024-06-01", "2024-12-31"],
        eval_stride=15,
        inference_sample_count=1,
        backtest_result_path=str(tmp_path / "res"),
    )
    last_val = last_val_bar(dataset)
    periods = eval_periods(cfg)
    assert periods.last_val == last_val and periods.test[0] == last_val
    pipe = pipeline_with_tiny_models(cfg)
    records = pipe.forecast_records()
    assert_targets_after_validation(records, last_val)
    assert records["anchor"].min() < pd.Timestamp("2024-06-01")  # evaluation anchors before the backtest
    metrics = pipe.evaluate()
    assert metrics["anchors"]["n_dates"] >= 2 and pd.Timestamp(metrics["anchors"]["first"]) >= last_val


def test_ranges_that_reach_validation_targets_are_errors(dataset, tmp_path):
    cfg = tiny_config(tmp_path, dataset, backtest_time_range=["2024-01-01", "2024-12-31"])
    with pytest.raises(DataError, match=r"backtest_time_range .*2024-01-01.*val_time_range") as err:
        eval_periods(cfg)
    assert "\n" not in str(err.value) and "allow_eval_overlap" in str(err.value)
    cfg = tiny_config(tmp_path, dataset, test_time_range=["2023-01-01", "2024-02-01"])
    with pytest.raises(DataError, match="test_time_range .* ends on or before the last validation bar"):
        eval_periods(cfg)
    # the documented, unsafe opt-out keeps the ranges as given
    cfg = tiny_config(tmp_path, dataset, backtest_time_range=["2024-01-01", "2024-12-31"], allow_eval_overlap=True)
    assert eval_periods(cfg).backtest[0] == pd.Timestamp("2024-01-01")


def test_csv_split_ratios_default_to_the_test_split(tmp_path):
    raw = validate_kline_frame(pd.read_csv(CSV), "kline_5min.csv")
    base = dict(data_source="csv", split_ratios=[0.6, 0.2, 0.2], lookback_window=30, predict_window=5)
    cfg = tiny_config(
        tmp_path,
        tmp_path / "ds",
        **base,
        inference_sample_count=1,
        eval_stride=40,
        backtest_result_path=str(tmp_path / "res"),
    )
    splits, manifest = process_frames(
        {"AAA": raw, "BBB": raw.assign(close=raw["close"] * 1.1, high=raw["high"] * 1.1)}, cfg, "csv"
    )
    save_dataset(cfg.dataset_path, splits, manifest)
    last_val = last_val_bar(Path(cfg.dataset_path))
    test_ts = load_split(cfg.dataset_path, "test")["timestamps"]
    assert not cfg.is_set("test_time_range") and cfg.is_set("split_ratios")
    periods = eval_periods(cfg)  # the config's (default, 2024-2025) date ranges are not used
    assert periods.test[1] == periods.backtest[1] == test_ts.max()
    assert periods.test[0] >= last_val and periods.backtest[0] >= last_val
    anchors = select_anchors(
        pipe_frame(cfg),
        periods.last_val,
        None,
        cfg.lookback_window,
        cfg.predict_window,
        cfg.eval_stride,
        0,
        period=periods.test,
    )["anchor"]
    assert anchors.nunique() >= 2 and anchors.min() >= last_val
    records = pipeline_with_tiny_models(cfg).forecast_records()
    assert_targets_after_validation(records, last_val)
    # a range the user sets explicitly is used, and checked
    bad = tiny_config(tmp_path, tmp_path / "ds", **base, backtest_time_range=["2024-06-01", "2024-12-31"])
    with pytest.raises(DataError, match="backtest_time_range"):
        eval_periods(bad)


def pipe_frame(cfg: Config) -> pd.DataFrame:
    return KronosPipeline(cfg).full_frame()


def test_fast_mode_keys_are_not_user_keys(tmp_path):
    from kronos.config import apply_fast_mode

    cfg = apply_fast_mode(Config.from_dict({"epochs": 5}))
    assert cfg.is_set("epochs") and not cfg.is_set("batch_size") and not cfg.is_set("test_time_range")
