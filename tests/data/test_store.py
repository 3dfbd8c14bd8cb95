"""The on-disk dataset: Parquet + manifest round trip, clear errors, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos.config import Config
from kronos.data.processing import process_frames
from kronos.data.schema import SPLIT_COLUMNS, validate_kline_frame
from kronos.data.store import (
    DATASET_FILES,
    FORMAT_VERSION,
    SPLITS,
    dataset_exists,
    load_manifest,
    load_split,
    save_dataset,
)
from kronos.errors import DataError, InputError

CSV = Path(__file__).resolve().parents[1] / "fixtures" / "kline_5min.csv"


@pytest.fixture(scope="module")
def processed():
    bars = validate_kline_frame(pd.read_csv(CSV), "kline_5min.csv")
    raw = {"X": bars, "Y": bars.iloc[500:].reset_index(drop=True)}
    cfg = Config(lookback_window=20, predict_window=5, split_ratios=[0.7, 0.15, 0.15])
    return process_frames(raw, cfg, "csv")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_round_trip_keeps_columns_dtypes_and_values(tmp_path, processed):
    splits, manifest = processed
    save_dataset(tmp_path / "ds", splits, manifest)
    assert dataset_exists(tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(DATASET_FILES)
    for split in SPLITS:
        back = load_split(tmp_path / "ds", split)
        assert list(back.columns) == list(SPLIT_COLUMNS)
        assert str(back["timestamps"].dtype) == "datetime64[ns]"
        assert back["symbol"].map(type).eq(str).all()
        assert back[["minute", "hour", "weekday", "day", "month"]].dtypes.eq(np.int64).all()
        pd.testing.assert_frame_equal(back, splits[split], check_dtype=False)
        assert back.equals(back.sort_values(["symbol", "timestamps"]))
    m = load_manifest(tmp_path / "ds")
    assert m["format_version"] == FORMAT_VERSION == 2 and m["source"] == "csv" and m["symbols"] == ["X", "Y"]
    assert m["splits"]["train"]["rows"] == len(splits["train"])
    assert m == json.loads(json.dumps(manifest))


def test_saved_splits_give_windows_that_never_cross_into_the_next_split(tmp_path, processed):
    from kronos.data.windows import WindowDataset

    splits, manifest = processed
    save_dataset(tmp_path / "ds", splits, manifest)
    dates = load_manifest(tmp_path / "ds")["splits"]
    cfg = Config(dataset_path=str(tmp_path / "ds"), lookback_window=20, predict_window=5)
    # one cut date for both symbols (X and the shorter, later-starting Y)
    for split in SPLITS:
        own = splits[split][splits[split]["timestamps"] >= pd.Timestamp(dates[split]["first"])]
        assert own.groupby("symbol")["timestamps"].max().max() == pd.Timestamp(dates[split]["last"])
    assert pd.Timestamp(dates["train"]["last"]) < pd.Timestamp(dates["val"]["first"])
    assert pd.Timestamp(dates["val"]["last"]) < pd.Timestamp(dates["test"]["first"])
    for split in SPLITS:
        ds = WindowDataset.from_config(cfg, split)
        first, last = (pd.Timestamp(dates[split][k]) for k in ("first", "last"))
        rows = np.array([ds.window_rows(i)[0] for i in range(len(ds))])
        assert len(rows) > 0
        assert ds.timestamps[rows + ds.window - 1].max() <= last  # no window reaches past the split's end
        assert ds.timestamps[rows + 20].min() >= first  # its target bars are the split's own


def test_missing_dataset_errors_name_the_path_and_the_data_step(tmp_path):
    assert not dataset_exists(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"nothing.*train\.parquet.*data step"):
        load_split(tmp_path / "nothing", "train")
    with pytest.raises(DataError, match=r"manifest\.json.*data step"):
        load_manifest(tmp_path / "nothing")
    with pytest.raises(InputError, match="unknown split 'validation'"):
        load_split(tmp_path, "validation")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "val.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"cannot read dataset file .*val\.parquet"):
        load_split(tmp_path / "broken", "val")


def test_failed_write_leaves_previous_dataset_intact(tmp_path, processed, monkeypatch):
    splits, manifest = processed
    target = tmp_path / "ds"
    save_dataset(target, splits, manifest)
    before = snapshot(target)

    calls = {"n": 0}
    real = pd.DataFrame.to_parquet

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # train written, then the disk "fills up"
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing)
    changed = {s: f.assign(close=f["close"] * 2) for s, f in splits.items()}
    with pytest.raises(DataError, match="No space left"):
        save_dataset(target, changed, {**manifest, "source": "other"})
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp folder left behind


def test_rewrite_replaces_dataset_and_keeps_foreign_entries(tmp_path, processed):
    splits, manifest = processed
    target = tmp_path / "ds"
    save_dataset(target, splits, manifest)
    (target / "raw_sina").mkdir()
    (target / "raw_sina" / "sh600000_240_1023.txt").write_text("cached body")
    (target / "notes.txt").write_text("mine")
    fewer = {s: f[f["symbol"] == "X"] for s, f in splits.items()}
    save_dataset(target, fewer, {**manifest, "symbols": ["X"]})
    assert set(load_split(target, "test")["symbol"]) == {"X"}
    assert load_manifest(target)["symbols"] == ["X"]
    assert (target / "raw_sina" / "sh600000_240_1023.txt").read_text() == "cached body"
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_save_rejects_frames_breaking_the_contract(tmp_path, processed):
    splits, manifest = processed
    with pytest.raises(InputError, match="missing"):
        save_dataset(tmp_path / "ds", {"train": splits["train"]}, manifest)
    nan = dict(splits, val=splits["val"].assign(open=np.nan))
    with pytest.raises(DataError, match="NaN"):
        save_dataset(tmp_path / "ds", nan, manifest)
    dup = dict(splits, test=pd.concat([splits["test"], splits["test"].head(1)]))
    with pytest.raises(DataError, match="repeats"):
        save_dataset(tmp_path / "ds", dup, manifest)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        save_dataset(tmp_path / "file", splits, manifest)
    assert not (tmp_path / "ds").exists()
