"""kronos.data.windows: the sliding-window dataset and the epoch sampler (spec 6.1, Q15)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from kronos.config import Config
from kronos.data.windows import WindowDataset, WindowSampler, window_loader
from kronos.errors import ConfigError, DataError, InputError

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "fixtures"
FEATS = ["open", "high", "low", "close", "volume", "amount"]
TIME = ["minute", "hour", "weekday", "day", "month"]


def _time_features(df: pd.DataFrame) -> pd.DataFrame:
    t = df["timestamps"].dt
    return df.assign(minute=t.minute, hour=t.hour, weekday=t.day_of_week, day=t.day, month=t.month)


@pytest.fixture(scope="module")
def qlib_frame() -> pd.DataFrame:
    """The bundled Qlib sample (10 instruments, 2021-2024 daily) as the store's long frame."""
    root = DATA / "qlib_cn"
    calendar = pd.to_datetime(np.loadtxt(root / "calendars" / "day.txt", dtype=str))
    parts = []
    for folder in sorted((root / "features").iterdir()):
        cols = {}
        for field in ("open", "high", "low", "close", "volume"):
            raw = np.fromfile(folder / f"{field}.day.bin", dtype="<f4")
            begin = int(raw[0])  # first value: start index into the calendar
            cols[field] = raw[1:].astype(np.float64)
        df = pd.DataFrame(cols)
        df.insert(0, "timestamps", calendar[begin : begin + len(df)])
        df.insert(0, "symbol", folder.name.upper())
        df["amount"] = (df["open"] + df["high"] + df["low"] + df["close"]) / 4 * df["volume"]
        parts.append(df.dropna())
    return _time_features(pd.concat(parts, ignore_index=True))


@pytest.fixture(scope="module")
def kline_frame() -> pd.DataFrame:
    df = pd.read_csv(DATA / "kline_5min.csv", parse_dates=["timestamps"])
    return _time_features(df.assign(symbol="KLINE5"))


def reference_window(frame: pd.DataFrame, symbol: str, start: int, lookback: int, predict: int, clip: float):
    """The official per-sample computation, straight from the frame (spec 6.1)."""
    sub = frame[frame["symbol"] == symbol]
    win = sub.iloc[start : start + lookback + predict + 1]
    x = win[FEATS].to_numpy().astype(np.float32)
    past = x[:lookback]
    x = np.clip((x - past.mean(axis=0)) / (past.std(axis=0) + 1e-5), -clip, clip)
    return x, win[TIME].to_numpy().astype(np.float32)


# ---------------------------------------------------------------------- dataset
def test_windows_match_the_official_computation(qlib_frame):
    ds = WindowDataset(qlib_frame, lookback=90, predict=10)
    assert ds.window == 101 and ds.symbols == sorted(qlib_frame["symbol"].unique())
    sizes = qlib_frame.groupby("symbol").size()
    assert len(ds) == int((sizes - 100).clip(lower=0).sum())
    for i in [0, 1, 868, 869, len(ds) // 2, len(ds) - 1] + list(np.random.default_rng(0).integers(0, len(ds), 20)):
        x, stamp = ds[int(i)]
        assert x.dtype == torch.float32 and x.shape == (101, 6) and stamp.shape == (101, 5)
        sym = ds.window_symbol(int(i))
        sub = qlib_frame[qlib_frame["symbol"] == sym].reset_index(drop=True)
        start = int(np.flatnonzero(sub["timestamps"] == ds.window_start_time(int(i)))[0])
        ref_x, ref_stamp = reference_window(qlib_frame, sym, start, 90, 10, 5.0)
        np.testing.assert_allclose(x.numpy(), ref_x, atol=2e-5, rtol=0)  # float32 summation order only
        np.testing.assert_array_equal(stamp.numpy(), ref_stamp)


def test_intraday_stamps_and_single_series(kline_frame):
    seed_names = ["open", "high", "low", "close", "vol", "amt"]
    ds = WindowDataset(kline_frame, lookback=30, predict=5, feature_list=seed_names)
    assert len(ds) == len(kline_frame) - 35
    x, stamp = ds[100]
    np.testing.assert_array_equal(stamp.numpy(), kline_frame[TIME].to_numpy()[100:136].astype(np.float32))
    assert stamp[:, 1].max() > 9  # real hours, not daily zeros
    ref, _ = reference_window(kline_frame, "KLINE5", 100, 30, 5, 5.0)
    np.testing.assert_allclose(x.numpy(), ref, atol=2e-5, rtol=0)
    # Without a symbol column (and without time-feature columns) the frame is one series with derived stamps.
    bare = kline_frame[["timestamps"] + FEATS]
    ds2 = WindowDataset(bare, lookback=30, predict=5)
    assert len(ds2) == len(ds)
    torch.testing.assert_close(ds2[100], ds[100], rtol=0, atol=0)


def test_statistics_use_only_the_lookback_rows(qlib_frame):
    lookback, predict = 60, 20
    ds = WindowDataset(qlib_frame, lookback, predict)
    i = 500
    lo, _ = ds.window_rows(i)
    changed = qlib_frame.copy()
    col = changed.columns.get_loc("close")
    changed.iloc[lo + lookback + 3, col] = changed.iloc[lo + lookback + 3, col] * 1000  # far-future spike
    ds2 = WindowDataset(changed, lookback, predict)
    a, b = ds[i][0], ds2[i][0]
    torch.testing.assert_close(a[:lookback], b[:lookback], rtol=0, atol=0)
    assert b[lookback + 3, 3] == 5.0 and a[lookback + 3, 3] < 5.0
    # Direct numpy: mean/std of the first `lookback` rows only.
    raw = ds.features[lo : lo + ds.window].astype(np.float32)
    mu, sd = raw[:lookback].mean(0), raw[:lookback].std(0)
    np.testing.assert_allclose(a.numpy(), np.clip((raw - mu) / (sd + 1e-5), -5, 5), atol=2e-5, rtol=0)
    # A change inside the lookback does move the statistics.
    changed.iloc[lo + 3, col] = changed.iloc[lo + 3, col] * 1000
    assert not torch.equal(WindowDataset(changed, lookback, predict)[i][0][:lookback], a[:lookback])


def test_clipping(qlib_frame):
    tight = WindowDataset(qlib_frame, 90, 10, clip=1.5)
    loose = WindowDataset(qlib_frame, 90, 10, clip=1e6)
    x_t, _ = tight.get_batch(np.arange(0, len(tight), 37))
    x_l, _ = loose.get_batch(np.arange(0, len(loose), 37))
    assert x_t.abs().max() == 1.5 and (x_t.abs() == 1.5).any()
    assert x_l.abs().max() > 1.5
    torch.testing.assert_close(x_t, x_l.clamp(-1.5, 1.5), rtol=0, atol=0)


def test_windows_never_cross_symbols(qlib_frame):
    short = qlib_frame[qlib_frame["symbol"] == "SH600004"].head(50).assign(symbol="SHORT")
    frame = pd.concat([qlib_frame, short], ignore_index=True)
    shuffled = frame.sample(frac=1.0, random_state=1)  # order must not matter
    ds = WindowDataset(shuffled, 90, 10, return_index=True)
    assert "SHORT" not in ds.symbols  # 50 rows < 101: no window
    sizes = frame.groupby("symbol").size()
    assert len(ds) == int((sizes - 100).clip(lower=0).sum())
    sym_of_row = np.repeat(np.arange(len(ds.symbols) + 1), [*(sizes[s] for s in ds.symbols), 50])
    starts = np.array([ds.window_rows(i)[0] for i in range(len(ds))])
    assert (sym_of_row[starts] == sym_of_row[starts + ds.window - 1]).all()
    # Windows are consecutive rows in time of one symbol; the last window of a symbol ends on its last row.
    assert np.all(np.diff(starts) >= 1)
    first_of_next = int(sizes["SH000300"]) - 100  # SH000300's windows come first (sorted by symbol)
    assert ds.window_symbol(first_of_next - 1) == "SH000300" and ds.window_symbol(first_of_next) == "SH000905"
    sub = frame[frame["symbol"] == "SH000300"]
    end = ds.window_rows(first_of_next - 1)[1] - 1
    assert pd.Timestamp(ds.timestamps[end]) == sub["timestamps"].max()
    assert ds.window_start_time(first_of_next) == frame.loc[frame["symbol"] == "SH000905", "timestamps"].min()
    assert ds[-1][2] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_batch_paths_equal_single_items(qlib_frame):
    ds = WindowDataset(qlib_frame, 90, 10, return_index=True)
    idx = [5, 0, len(ds) - 1, 869, 5]
    x, stamp, index = ds.get_batch(idx)
    assert x.shape == (5, 101, 6) and stamp.shape == (5, 101, 5) and index.tolist() == idx
    for j, i in enumerate(idx):
        torch.testing.assert_close(x[j], ds[i][0], rtol=0, atol=0)
        torch.testing.assert_close(stamp[j], ds[i][1], rtol=0, atol=0)
    sampler = WindowSampler(len(ds), 120, seed=3)
    expected = list(sampler)
    plain = DataLoader(ds, batch_size=50, sampler=sampler, drop_last=True)  # uses __getitems__
    fast = window_loader(ds, sampler, batch_size=50)
    assert len(plain) == len(fast) == 2
    for (xa, sa, ia), (xb, sb, ib) in zip(plain, fast):
        torch.testing.assert_close((xa, sa), (xb, sb), rtol=0, atol=0)
        assert ia.tolist() == ib.tolist()
    assert [i for _, _, ib in fast for i in ib.tolist()] == expected[:100]


# ---------------------------------------------------------------------- sampler
def test_sampler_is_reproducible_per_seed_and_epoch():
    s = WindowSampler(1000, 300, seed=7)
    s.set_epoch(2)
    a = list(s)
    assert len(a) == len(s) == 300 and len(set(a)) == 300 and all(0 <= i < 1000 for i in a)
    s.set_epoch(2)
    assert list(s) == a
    assert list(WindowSampler(1000, 300, seed=7).rank_indices(2)) == a  # a fresh sampler agrees
    s.set_epoch(3)
    assert list(s) != a
    assert list(WindowSampler(1000, 300, seed=8).rank_indices(2)) != a
    # More samples than windows: whole permutations, then a fresh partial one.
    big = WindowSampler(100, 250, seed=1).epoch_indices(0)
    assert sorted(big[:100]) == list(range(100)) and sorted(big[100:200]) == list(range(100))
    assert len(set(big[200:].tolist())) == 50


def test_sampler_ranks_are_disjoint_and_cover_the_epoch():
    for num_samples, world in [(300, 2), (301, 3), (1000, 4)]:
        samplers = [WindowSampler(1000, num_samples, seed=5, rank=r, world_size=world) for r in range(world)]
        for s in samplers:
            s.set_epoch(4)
        parts = [list(s) for s in samplers]
        per_rank = num_samples // world
        assert all(len(p) == per_rank for p in parts) and all(len(s) == per_rank for s in samplers)
        union = [i for p in parts for i in p]
        assert len(set(union)) == len(union)  # disjoint (and no repeats within a rank)
        glob = samplers[0].epoch_indices()
        assert sorted(union) == sorted(glob.tolist())
        assert parts[1] == glob[1::world].tolist()
        single = WindowSampler(1000, per_rank * world, seed=5)
        single.set_epoch(4)
        assert list(single) == glob.tolist()  # same global sequence as one process


class _WorkerTagged(Dataset):
    """Wraps a dataset: each sample also says which DataLoader worker produced it."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        info = get_worker_info()
        return self.inner[i][-1], -1 if info is None else info.id


class _OfficialStyle(Dataset):
    """The official design: ``__getitem__`` ignores its index and draws from its own RNG (Q15)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rng = random.Random(100)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        info = get_worker_info()
        return self.rng.randint(0, self.n - 1), -1 if info is None else info.id


def _collect(dataset: Dataset, sampler) -> tuple[list, list]:
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2, multiprocessing_context="fork")
    indices, workers = [], []
    for index, worker in loader:
        indices += index.tolist()
        workers += worker.tolist()
    return indices, workers


def test_dataloader_workers_get_disjoint_samples(qlib_frame):
    ds = WindowDataset(qlib_frame, 90, 10, return_index=True)
    sampler = WindowSampler(len(ds), 96, seed=11)
    sampler.set_epoch(1)
    indices, workers = _collect(_WorkerTagged(ds), sampler)
    assert set(workers) == {0, 1}
    assert len(indices) == 96 and len(set(indices)) == 96
    assert indices == list(sampler)
    by_worker = [{i for i, w in zip(indices, workers) if w == k} for k in (0, 1)]
    assert not by_worker[0] & by_worker[1]
    # The same check catches the official per-worker RNG copies: both workers replay one stream (Q15).
    official, workers = _collect(_OfficialStyle(len(ds)), WindowSampler(len(ds), 96, seed=11))
    assert set(workers) == {0, 1} and len(set(official)) < len(official)


def test_resume_continues_the_interrupted_epoch(qlib_frame):
    s = WindowSampler(5000, 1000, seed=9, rank=1, world_size=2)
    s.set_epoch(6)
    full = list(s)
    resumed = WindowSampler(5000, 1000, seed=9, rank=1, world_size=2)
    resumed.load_state_dict({**s.state_dict(), "start": 150})
    resumed.set_epoch(6)  # the training loop's usual call keeps the start within the same epoch
    assert len(resumed) == 350 and list(resumed) == full[150:]
    resumed.set_epoch(7)  # next epoch starts from its beginning
    assert len(resumed) == 500 and list(resumed) == list(s.rank_indices(7))
    # Through the batched loader: the resumed run sees exactly the remaining batches.
    ds = WindowDataset(qlib_frame, 90, 10, return_index=True)
    base = WindowSampler(len(ds), 400, seed=2)
    base.set_epoch(1)
    all_batches = [b[2].tolist() for b in window_loader(ds, base, 50)]
    again = WindowSampler(len(ds), 400, seed=2)
    again.set_epoch(1)
    again.set_start(3 * 50)
    assert [b[2].tolist() for b in window_loader(ds, again, 50)] == all_batches[3:]
    with pytest.raises(InputError):
        again.set_start(401)


# ---------------------------------------------------------------------- errors and config
def test_errors_are_actionable(qlib_frame):
    with pytest.raises(ConfigError, match=r"'turnover'.*columns are \[.*'close'"):
        WindowDataset(qlib_frame, 90, 10, feature_list=["open", "high", "low", "close", "vol", "turnover"])
    one = qlib_frame[qlib_frame["symbol"].isin(["SH600004", "SH600011"])].groupby("symbol").head(60)
    with pytest.raises(DataError, match=r"split 'val'.*SH600004.*lookback_window.*predict_window"):
        WindowDataset(one, 90, 10, name="val")
    with pytest.raises(DataError, match="empty"):
        WindowDataset(qlib_frame.head(0), 90, 10, name="test")
    holes = qlib_frame.copy()
    holes.iloc[1234, holes.columns.get_loc("volume")] = np.nan
    with pytest.raises(DataError, match=r"column 'volume' of symbol SH000905"):
        WindowDataset(holes, 90, 10)
    with pytest.raises(ConfigError, match="lookback_window"):
        WindowDataset(qlib_frame, 0, 10)
    with pytest.raises(InputError):
        WindowSampler(10, 5, seed=0, rank=2, world_size=2)
    with pytest.raises(InputError):
        WindowSampler(0, 5, seed=0)


@pytest.fixture()
def fake_store(monkeypatch, qlib_frame):
    """A stand-in for kronos.data.store.load_split that serves the sample frame and records calls."""
    calls = []
    module = types.ModuleType("kronos.data.store")

    def load_split(path, split):
        calls.append((path, split))
        return qlib_frame

    module.load_split = load_split
    module.load_manifest = lambda path: {"splits": {}}  # a dataset written before per-split dates
    monkeypatch.setitem(sys.modules, "kronos.data.store", module)
    return calls


def test_windows_stay_inside_the_split_dates_history_may_reach_back(qlib_frame):
    first, last = pd.Timestamp("2023-03-01"), pd.Timestamp("2023-09-29")
    lookback, predict = 20, 5
    ds = WindowDataset(qlib_frame, lookback, predict, return_index=True, target_range=(first, last))
    full = WindowDataset(qlib_frame, lookback, predict)
    expected = 0
    for _, part in qlib_frame.groupby("symbol"):
        ts = part["timestamps"].sort_values().to_numpy()
        n = len(ts) - ds.window + 1
        expected += sum(1 for r in range(max(n, 0)) if ts[r + lookback] >= first and ts[r + ds.window - 1] <= last)
    assert len(ds) == expected and 0 < len(ds) < len(full)
    for i in range(len(ds)):
        a, b = ds.window_rows(i)
        stamps = ds.timestamps[a:b]
        assert stamps[lookback] >= first and stamps[-1] <= last  # every target bar inside the split
    assert min(pd.Timestamp(ds.timestamps[ds.window_rows(i)[0]]) for i in range(len(ds))) < first  # history
    # the values match the unrestricted dataset's window with the same rows
    j = next(k for k in range(len(full)) if full.window_rows(k) == ds.window_rows(0))
    torch.testing.assert_close(ds[0][0], full[j][0])
    with pytest.raises(DataError, match="no window whose 6 target bars lie in its own dates"):
        WindowDataset(qlib_frame, lookback, predict, target_range=("2023-03-01", "2023-03-03"))


def test_from_config_limits_windows_to_the_manifest_dates(fake_store, monkeypatch):
    store = sys.modules["kronos.data.store"]
    monkeypatch.setattr(
        store,
        "load_manifest",
        lambda path: {"splits": {"val": {"first": "2023-01-03T00:00:00", "last": "2023-06-30T00:00:00"}}},
        raising=False,
    )
    ds = WindowDataset.from_config(Config(dataset_path="/p", lookback_window=20, predict_window=5), "val")
    assert ds.target_range == (pd.Timestamp("2023-01-03"), pd.Timestamp("2023-06-30"))
    assert max(pd.Timestamp(ds.timestamps[ds.window_rows(i)[1] - 1]) for i in range(len(ds))) <= ds.target_range[1]


def test_from_config_uses_the_config_keys(fake_store):
    cfg = Config(
        dataset_path="/somewhere/processed",
        lookback_window=40,
        predict_window=7,
        clip=3.0,
        feature_list=["open", "high", "low", "close", "volume", "amt"],
    )
    ds = WindowDataset.from_config(cfg, "val")
    assert fake_store == [("/somewhere/processed", "val")]
    assert (ds.lookback, ds.predict, ds.window, ds.clip, ds.name) == (40, 7, 48, 3.0, "val")
    assert float(ds.get_batch(range(0, len(ds), 50))[0].abs().max()) == 3.0


def test_finetune_qlib_dataset(fake_store):
    spec = importlib.util.spec_from_file_location("finetune_dataset", ROOT / "finetune" / "dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = Config(dataset_path="/p", n_train_iter=500, n_val_iter=100_000)
    train = mod.QlibDataset("train", cfg)
    assert isinstance(train, WindowDataset) and fake_store[-1] == ("/p", "train")
    assert train.n_samples == 500 and len(train.sampler(rank=1, world_size=2)) == 250
    val = mod.QlibDataset.from_config(cfg, "val")
    assert val.n_samples == len(val)  # capped at the number of windows, like the seed
    with pytest.raises(InputError):
        mod.QlibDataset("training", cfg)


@pytest.mark.slow
def test_finetune_import_works_as_the_seed_scripts_do():
    # A script in finetune/ (run from there or from the root) has finetune/ first on sys.path.
    code = (
        "from dataset import QlibDataset; from kronos.data.windows import WindowDataset; "
        "assert issubclass(QlibDataset, WindowDataset)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT / "finetune", check=True, timeout=120)
