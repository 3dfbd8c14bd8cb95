"""Qlib source through real pyqlib on tests/data/qlib_cn; the same on-disk format as the CSV source; the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos.config import Config
from kronos.data.schema import SPLIT_COLUMNS
from kronos.data.sources import DataProcessorFactory
from kronos.data.store import SPLITS, load_manifest, load_split
from kronos.errors import DataError, DependencyError

pytest.importorskip("qlib")

ROOT = Path(__file__).resolve().parents[2]
QLIB = ROOT / "tests" / "fixtures" / "qlib_cn"
CSV = ROOT / "tests" / "fixtures" / "kline_5min.csv"

QLIB_KEYS = dict(
    qlib_data_path=str(QLIB),
    instrument="csi300",
    lookback_window=20,
    predict_window=5,
    dataset_begin_time="2021-03-01",
    dataset_end_time="2024-06-28",
    train_time_range=["2021-01-01", "2022-12-31"],
    val_time_range=["2022-11-01", "2023-12-31"],
    test_time_range=["2023-11-01", "2024-12-31"],
)


def qlib_config(tmp, **kw) -> Config:
    return Config(**{**QLIB_KEYS, "dataset_path": str(tmp), **kw})


@pytest.fixture(scope="module")
def qlib_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlib") / "ds"
    manifest = DataProcessorFactory.create_processor("qlib", qlib_config(path)).run_pipeline()
    return path, manifest


def instruments_file() -> dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]]:
    spans: dict = {}
    for line in (QLIB / "instruments" / "csi300.txt").read_text().split("\n"):
        if line.strip():
            sym, start, end = line.split("\t")
            spans.setdefault(sym, []).append((pd.Timestamp(start), pd.Timestamp(end)))
    return spans


@pytest.mark.slow
def test_qlib_dataset_has_split_format_and_respects_membership(qlib_dataset):
    path, manifest = qlib_dataset
    calendar = pd.DatetimeIndex(pd.read_csv(QLIB / "calendars" / "day.txt", header=None)[0])
    spans = instruments_file()
    frames = {s: load_split(path, s) for s in SPLITS}
    for _split, frame in frames.items():
        assert list(frame.columns) == list(SPLIT_COLUMNS)
        assert not frame[list(SPLIT_COLUMNS)].isna().any().any()
        assert (frame[["minute", "hour"]] == 0).all().all()  # daily bars
        assert frame.equals(frame.sort_values(["symbol", "timestamps"]).reset_index(drop=True))
        for sym, part in frame.groupby("symbol"):
            ((start, end),) = spans[sym]
            widened = calendar[max(calendar.searchsorted(start) - 20, 0)]
            assert part["timestamps"].min() >= widened and part["timestamps"].max() <= end
    # SH600521 was a member for a single day: too short for one window of 26 rows
    assert "SH600521" in manifest["skipped_symbols"] and "SH600521" not in manifest["symbols"]
    # SH600023 joined on 2023-12-11: it appears no earlier than 20 trading days before that
    sh23 = frames["val"][frames["val"]["symbol"] == "SH600023"]
    assert sh23["timestamps"].min() == calendar[calendar.searchsorted(pd.Timestamp("2023-12-11")) - 20]
    # the test split owns the bars after the last val bar and keeps lookback_window (20) bars of history
    test_first = pd.Timestamp(manifest["splits"]["test"]["first"])
    assert test_first > pd.Timestamp(manifest["splits"]["val"]["last"])
    sh23 = frames["test"][frames["test"]["symbol"] == "SH600023"]
    assert sh23["timestamps"].min() == calendar[calendar.searchsorted(test_first) - 20]
    # the loaded range is widened by predict_window trading days after dataset_end_time
    end = calendar[calendar.searchsorted(pd.Timestamp("2024-06-28")) + 5]
    assert frames["test"]["timestamps"].max() == end
    # amount: mean(OHLC) x volume (the data has no amount field), as in the official pipeline
    t = frames["train"]
    np.testing.assert_allclose(t["amount"], t[["open", "high", "low", "close"]].mean(axis=1) * t["volume"], rtol=1e-12)
    assert manifest["source"] == "qlib" and manifest["source_info"]["instrument"] == "csi300"


def test_qlib_and_csv_write_the_same_format(qlib_dataset, tmp_path):
    qpath, qman = qlib_dataset
    cfg = Config(
        csv_data_path=str(CSV),
        dataset_path=str(tmp_path / "csv"),
        lookback_window=20,
        predict_window=5,
        split_ratios=[0.7, 0.15, 0.15],
    )
    cman = DataProcessorFactory.create_processor("csv", cfg).run_pipeline()
    assert sorted(p.name for p in qpath.iterdir()) == sorted(p.name for p in (tmp_path / "csv").iterdir())
    assert set(qman) == set(cman) == set(load_manifest(qpath))
    for split in SPLITS:
        q, c = load_split(qpath, split), load_split(tmp_path / "csv", split)
        assert list(q.columns) == list(c.columns)
        assert q.dtypes.astype(str).to_dict() == c.dtypes.astype(str).to_dict()
        assert set(qman["splits"][split]) - {"time_range"} == set(cman["splits"][split]) - {"ratio"}


def test_qlib_errors_name_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"'{missing}'.*does not exist"):
        DataProcessorFactory.create_processor(
            "qlib", qlib_config(tmp_path / "ds", qlib_data_path=str(missing))
        ).load_raw()
    (tmp_path / "nocal" / "features").mkdir(parents=True)
    with pytest.raises(DataError, match=r"nocal.*no calendar"):
        DataProcessorFactory.create_processor(
            "qlib", qlib_config(tmp_path / "ds", qlib_data_path=str(tmp_path / "nocal"))
        ).load_raw()
    with pytest.raises(DataError, match=r"instrument pool 'csi9999'.*csi9999\.txt.*\['all', 'csi300'\]"):
        DataProcessorFactory.create_processor("qlib", qlib_config(tmp_path / "ds", instrument="csi9999")).load_raw()
    with pytest.raises(DataError, match=r"no trading days.*2030-01-01"):
        DataProcessorFactory.create_processor(
            "qlib", qlib_config(tmp_path / "ds", dataset_begin_time="2030-01-01", dataset_end_time="2030-12-31")
        ).load_raw()
    monkeypatch.setitem(sys.modules, "qlib", None)  # pyqlib not installed
    monkeypatch.setitem(sys.modules, "qlib.data", None)
    with pytest.raises(DependencyError, match=r"pip install pyqlib"):
        DataProcessorFactory.create_processor("qlib", qlib_config(tmp_path / "ds")).run_pipeline()
    assert not (tmp_path / "ds").exists()


@pytest.mark.slow
def test_preprocess_script_writes_dataset_and_reports_errors(tmp_path):
    cfg = {**QLIB_KEYS, "dataset_path": str(tmp_path / "ds")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = subprocess.run(
        [sys.executable, "qlib_data_preprocess.py", "--config-path", str(tmp_path / "cfg.json")],
        cwd=ROOT / "finetune",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = load_manifest(tmp_path / "ds")
    assert manifest["source"] == "qlib" and manifest["config"]["instrument"] == "csi300"
    assert len(load_split(tmp_path / "ds", "val")) == manifest["splits"]["val"]["rows"]

    bad = {**cfg, "qlib_data_path": str(tmp_path / "no_such_qlib")}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    run = subprocess.run(
        [sys.executable, "finetune/qlib_data_preprocess.py", "--config-path", str(tmp_path / "bad.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_such_qlib" in errors[0] and "Traceback" not in run.stderr


@pytest.mark.slow
def test_upper_case_feature_folders_load_like_lower_case(tmp_path, monkeypatch, qlib_dataset):
    """Some public Qlib dumps write features/SH600000/CLOSE.day.bin; pyqlib alone finds 0 symbols there."""
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    upper = tmp_path / "qlib_upper"
    shutil.copytree(QLIB, upper)
    for folder in list((upper / "features").iterdir()):
        for f in list(folder.iterdir()):
            f.rename(folder / f.name.upper().replace(".DAY.BIN", ".day.bin"))
        folder.rename(folder.with_name(folder.name.upper()))
    path = tmp_path / "ds_upper"
    DataProcessorFactory.create_processor("qlib", qlib_config(path, qlib_data_path=str(upper))).run_pipeline()
    ref_path, _ = qlib_dataset
    for split in SPLITS:
        pd.testing.assert_frame_equal(load_split(path, split), load_split(ref_path, split))
    views = list((tmp_path / "cache" / "kronos" / "qlib-views").iterdir())
    assert len(views) == 1 and all(p.name == p.name.lower() for p in (views[0] / "features").rglob("*"))
    assert all(f.name.upper() == f.name for f in (upper / "features").iterdir())  # the user's data is untouched
