"""Shared helpers of the training tests (no tests here): a real daily dataset from tests/fixtures/qlib_cn and tiny
configs.

Tests take the processed dataset from the session fixture ``dataset`` (tests/conftest.py), written once by
:func:`make_dataset`; tiny random models come from :mod:`_support.models`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kronos.config import Config
from kronos.data.processing import add_time_features
from kronos.data.store import save_dataset

REPO = Path(__file__).resolve().parents[2]
QLIB = REPO / "tests" / "fixtures" / "qlib_cn"
PYTHON = Path(sys.executable)


def qlib_frame(symbols: int = 8) -> pd.DataFrame:
    """Long frame of the real Qlib daily bars (stocks only), amount = mean(OHLC) * volume."""
    calendar = pd.to_datetime(pd.Series((QLIB / "calendars" / "day.txt").read_text().split()))
    frames = []
    stocks = sorted(p.name for p in (QLIB / "features").iterdir() if p.name.startswith("sh6"))[:symbols]
    for sym in stocks:
        cols = {}
        for field in ("open", "high", "low", "close", "volume"):
            raw = np.fromfile(QLIB / "features" / sym / f"{field}.day.bin", dtype="<f4")
            start = int(raw[0])
            cols[field] = pd.Series(
                raw[1:].astype(np.float64), index=calendar.iloc[start : start + len(raw) - 1].values
            )
        df = pd.DataFrame(cols).dropna()
        df = df[df["volume"] > 0]
        df.index.name = "timestamps"
        df = df.reset_index()
        df["amount"] = df[["open", "high", "low", "close"]].mean(axis=1) * df["volume"]
        df.insert(0, "symbol", sym.upper())
        frames.append(df)
    return add_time_features(pd.concat(frames, ignore_index=True))


def make_dataset(path: Path) -> Path:
    """Write train (2021-01..2023-06), val (2023-07..2024-03) and test (2024-04..) splits of the real data."""
    frame = qlib_frame()
    ts = frame["timestamps"]
    splits = {
        "train": frame[ts < "2023-07-01"],
        "val": frame[(ts >= "2023-07-01") & (ts < "2024-04-01")],
        "test": frame[ts >= "2024-04-01"],
    }
    dates = {
        s: {"first": f["timestamps"].min().isoformat(), "last": f["timestamps"].max().isoformat(), "rows": len(f)}
        for s, f in splits.items()
    }  # disjoint splits: every bar is the split's own
    save_dataset(path, splits, {"source": "tests/fixtures/qlib_cn", "splits": dates})
    return path


def tiny_config(tmp: Path, dataset: Path, **overrides) -> Config:
    """Tiny-preset CPU config: 30+5+1-row windows, a few steps per epoch."""
    base = dict(
        dataset_path=str(dataset),
        save_path=str(tmp / "out"),
        device="cpu",
        precision="fp32",
        lookback_window=30,
        predict_window=5,
        batch_size=16,
        n_train_iter=16 * 8,
        n_val_iter=64,
        epochs=2,
        log_interval=2,
        pretrained_tokenizer_path="",
        pretrained_predictor_path="",
        tokenizer_preset="tiny",
        predictor_preset="tiny",
        tokenizer_learning_rate=2e-3,
        predictor_learning_rate=2e-3,
        seed=7,
        checkpoint_interval=0,
        use_comet=False,
    )
    base.update(overrides)
    return Config.from_dict(base)
