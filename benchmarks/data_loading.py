"""Training-data throughput: WindowDataset vs the official per-sample pandas ``iloc`` dataset.

Both serve the same windows (lookback 90, predict 10 -> 101 rows, six features, five time features) of the
bundled Qlib demo data (``examples/data/qlib_cn_demo``, read straight from its ``.bin`` files), tiled into
several renamed copies to reach a few hundred thousand rows. Measured on one core, in windows per second:

* raw ``ds[i]`` in a loop;
* through ``DataLoader(batch_size=50, num_workers=0)`` fed by ``WindowSampler`` (for WindowDataset this uses
  its vectorised ``__getitems__`` batch path);
* through ``window_loader`` (BatchSampler + one ``get_batch`` call per batch, no collate), and ``get_batch``
  called directly (both against the pandas DataLoader rate).

Run: ``python benchmarks/data_loading.py [--copies 6] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
try:
    import kronos  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
from kronos.data.windows import WindowDataset, WindowSampler, window_loader  # noqa: E402

FEATURES = ["open", "high", "low", "close", "vol", "amt"]
TIME_FEATURES = ["minute", "hour", "weekday", "day", "month"]


def read_qlib_frame(provider: Path, copies: int) -> pd.DataFrame:
    """Long frame (symbol, timestamps, OHLCV, amount, time features) from a Qlib provider's day bins."""
    calendar = pd.to_datetime(np.loadtxt(provider / "calendars" / "day.txt", dtype=str))
    parts = []
    for folder in sorted((provider / "features").iterdir()):
        if not all((folder / f"{f}.day.bin").is_file() for f in ("open", "high", "low", "close", "volume")):
            continue  # e.g. a delisted stock without data
        cols = {}
        for field in ("open", "high", "low", "close", "volume"):
            raw = np.fromfile(folder / f"{field}.day.bin", dtype="<f4")  # first value: start index in calendar
            begin = int(raw[0])
            cols[field] = raw[1:].astype(np.float64)
        df = pd.DataFrame(cols)
        df.insert(0, "timestamps", calendar[begin : begin + len(df)])
        # The demo data has no amount field; estimate it like the official Qlib preprocessing.
        df["amount"] = (df["open"] + df["high"] + df["low"] + df["close"]) / 4 * df["volume"]
        df = df.dropna().reset_index(drop=True)
        for c in range(copies):
            parts.append(df.assign(symbol=f"{folder.name.upper()}_{c}"))
    frame = pd.concat(parts, ignore_index=True)
    t = frame["timestamps"].dt
    frame = frame.assign(minute=t.minute, hour=t.hour, weekday=t.day_of_week, day=t.day, month=t.month)
    return frame[
        [
            "symbol",
            "timestamps",
            "open",
            "high",
            "low",
            "close",
            "volume",
            "amount",
            "minute",
            "hour",
            "weekday",
            "day",
            "month",
        ]
    ]


class PandasIlocDataset(Dataset):
    """The official QlibDataset's per-sample path: a frame per symbol, ``iloc`` slice, numpy statistics."""

    def __init__(self, frame: pd.DataFrame, lookback: int, predict: int, clip: float = 5.0) -> None:
        self.lookback, self.clip = lookback, clip
        self.window = lookback + predict + 1
        self.data = {}
        self.indices = []
        for symbol, df in frame.groupby("symbol", sort=False):
            df = df.rename(columns={"volume": "vol", "amount": "amt"}).reset_index(drop=True)
            self.data[symbol] = df
            self.indices.extend((symbol, i) for i in range(len(df) - self.window + 1))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int):
        symbol, start = self.indices[idx]
        win_df = self.data[symbol].iloc[start : start + self.window]
        x = win_df[FEATURES].values.astype(np.float32)
        x_stamp = win_df[TIME_FEATURES].values.astype(np.float32)
        past = x[: self.lookback]
        x = (x - np.mean(past, axis=0)) / (np.std(past, axis=0) + 1e-5)
        x = np.clip(x, -self.clip, self.clip)
        return torch.from_numpy(x), torch.from_numpy(x_stamp)


def rate_items(ds: Dataset, order: np.ndarray, seconds: float) -> float:
    """Windows per second of ``ds[i]`` over ``order`` (stops after ``seconds``)."""
    t0 = time.perf_counter()
    n = 0
    for i in order.tolist():
        ds[i]
        n += 1
        if n % 256 == 0 and time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def rate_loader(
    ds: Dataset, n_windows: int, num_samples: int, seconds: float, batch_size: int = 50, batched: bool = False
) -> float:
    """Windows per second through a DataLoader fed by WindowSampler (``batched``: ``window_loader``)."""
    sampler = WindowSampler(n_windows, num_samples, seed=100)
    if batched:
        loader = window_loader(ds, sampler, batch_size, num_workers=0)
    else:
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=True)
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "examples" / "data" / "qlib_cn_demo"))
    parser.add_argument("--copies", type=int, default=6, help="renamed copies of each symbol (more rows)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per measurement")
    parser.add_argument("--lookback", type=int, default=90)
    parser.add_argument("--predict", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)

    frame = read_qlib_frame(Path(args.data), args.copies)
    t0 = time.perf_counter()
    fast = WindowDataset(frame, args.lookback, args.predict)
    build_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = PandasIlocDataset(frame, args.lookback, args.predict)
    build_slow = time.perf_counter() - t0
    assert len(fast) == len(slow), (len(fast), len(slow))
    n = len(fast)
    order = np.random.default_rng(0).permutation(n)
    for i in order[:200].tolist():  # same windows, same numbers (up to float32 summation order)
        a, b = fast[i], slow[i]
        assert torch.allclose(a[0], b[0], atol=1e-4) and torch.equal(a[1], b[1]), i
    print(f"data: {len(frame):,} rows, {frame['symbol'].nunique()} symbols, {n:,} windows of {fast.window} rows")
    print(f"build: WindowDataset {build_fast:.2f} s, pandas-iloc dataset {build_slow:.2f} s")

    rows = []
    item_fast = rate_items(fast, order, args.seconds)
    item_slow = rate_items(slow, order, args.seconds)
    rows.append(("raw __getitem__", item_fast, item_slow))
    loader_fast = rate_loader(fast, n, min(n, 500_000), args.seconds)
    loader_slow = rate_loader(slow, n, min(n, 500_000), args.seconds)
    rows.append(("DataLoader batch 50, workers 0", loader_fast, loader_slow))
    batched_fast = rate_loader(fast, n, min(n, 500_000), args.seconds, batched=True)
    rows.append(("window_loader batch 50, workers 0", batched_fast, loader_slow))
    t0 = time.perf_counter()
    m = 0
    while time.perf_counter() - t0 < args.seconds:
        fast.get_batch(order[m % (n - 50) : m % (n - 50) + 50])
        m += 50
    rows.append(("get_batch(50) direct", m / (time.perf_counter() - t0), item_slow))

    print(f"{'path':34s} {'WindowDataset':>15s} {'pandas iloc':>13s} {'ratio':>8s}")
    for name, f, s in rows:
        print(f"{name:34s} {f:13,.0f}/s {s:11,.0f}/s {f / s:7.1f}x")


if __name__ == "__main__":
    main()
