"""kronos.data.windows: the split's array cache and the memory-mapped WindowDataset (issue 23, item 3).

The trainer's datasets map ``<dataset>/.arrays/<split>/`` read-only, so the ranks of a node share one copy of the
data; these tests check that the windows are bit-identical to the frame-built dataset's, that the cache follows the
split file, that a killed build leaves nothing that is used, and that two processes reading every window hold
almost none of the data privately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _support.training import make_dataset, qlib_frame
from kronos.config import Config
from kronos.data import windows
from kronos.data.store import load_manifest, load_split, save_dataset
from kronos.data.windows import ARRAY_CACHE_DIR, WindowDataset, split_arrays, split_target_range
from kronos.errors import DataError

SRC = Path(__file__).resolve().parents[2] / "src"
TESTS = Path(__file__).resolve().parents[1]


def _config(dataset: Path, **kw) -> Config:
    return Config(dataset_path=str(dataset), lookback_window=30, predict_window=5, **kw)


def _frame_dataset(dataset: Path, split: str, **kw) -> WindowDataset:
    """Today's dataset: the split loaded into this process's memory and converted from the frame."""
    cfg = _config(dataset, **kw)
    return WindowDataset(
        load_split(dataset, split),
        lookback=30,
        predict=5,
        feature_list=cfg.feature_list,
        time_feature_list=cfg.time_feature_list,
        return_index=True,
        name=split,
        target_range=split_target_range(dataset, split),
    )


def _assert_same_items(a: WindowDataset, b: WindowDataset) -> None:
    assert len(a) == len(b) and a.symbols == b.symbols and a.target_range == b.target_range
    every = np.arange(len(a))
    for u, v in zip(a.get_batch(every), b.get_batch(every)):
        assert u.dtype == v.dtype and torch.equal(u, v)  # bit for bit
    for i in (0, 1, len(a) // 3, len(a) - 1):
        (xa, sa, ia), (xb, sb, ib) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(sa, sb) and ia == ib
    assert np.array_equal(a.features, b.features) and np.array_equal(a.timestamps, b.timestamps)


def _meta(dataset: Path, split: str) -> dict:
    return json.loads((dataset / ARRAY_CACHE_DIR / split / "meta.json").read_text())


@pytest.fixture()
def own_dataset(tmp_path: Path) -> Path:
    """A dataset this test may write into (the session's shared one must stay untouched)."""
    return make_dataset(tmp_path / "dataset")


# ---------------------------------------------------------------------- (a) the same items
@pytest.mark.parametrize("split", ["train", "val"])
def test_memory_mapped_items_equal_the_frame_built_ones(own_dataset: Path, split: str) -> None:
    cfg = _config(own_dataset)
    mapped = WindowDataset.from_config(cfg, split, return_index=True)
    assert mapped.memory_mapped and (own_dataset / ARRAY_CACHE_DIR / split / "meta.json").is_file()
    for arr in (mapped._feat_t, mapped.stamps, mapped.timestamps):
        assert not arr.flags.writeable and not arr.flags.owndata  # read-only views of the map, not copies
    reference = _frame_dataset(own_dataset, split)
    _assert_same_items(mapped, reference)
    _assert_same_items(WindowDataset.from_config(cfg, split, return_index=True), reference)  # reopened cache
    in_memory = WindowDataset.from_config(cfg, split, return_index=True, memmap=False)
    assert not in_memory.memory_mapped
    _assert_same_items(in_memory, reference)
    # normalising a window never writes into the mapped data
    before = np.array(mapped.features[:100])
    mapped.get_batch(np.arange(min(len(mapped), 256)))
    assert np.array_equal(mapped.features[:100], before)


def test_seed_feature_names_and_dataset_state_without_pickles(own_dataset: Path) -> None:
    cfg = _config(own_dataset, feature_list=["open", "high", "low", "close", "vol", "amt"])
    mapped = WindowDataset.from_config(cfg, "val", return_index=True)
    assert mapped.memory_mapped and _meta(own_dataset, "val")["feature_columns"][4:] == ["volume", "amount"]
    _assert_same_items(mapped, _frame_dataset(own_dataset, "val", feature_list=cfg.feature_list))
    # what a spawned DataLoader worker receives: the cache's path, not the data; it maps the same files
    state = mapped.__getstate__()
    assert state["_feat_t"] is None and state["stamps"] is None and state["timestamps"] is None
    copy = WindowDataset.__new__(WindowDataset)
    copy.__setstate__(state)
    assert copy.memory_mapped
    _assert_same_items(copy, mapped)
    # a rebuilt cache (another token) is refused instead of silently serving other data
    save_dataset(own_dataset, {s: load_split(own_dataset, s) for s in ("train", "val", "test")}, {})
    WindowDataset.from_config(cfg, "val")
    with pytest.raises(DataError, match="changed or vanished"):
        WindowDataset.__new__(WindowDataset).__setstate__(state)


# ---------------------------------------------------------------------- (b) rebuilt when the split changes
def test_cache_is_reused_until_the_split_changes(own_dataset: Path) -> None:
    cfg = _config(own_dataset)
    old = WindowDataset.from_config(cfg, "train", return_index=True)
    old_items = old.get_batch(np.arange(len(old)))
    token = _meta(own_dataset, "train")["token"]
    features = own_dataset / ARRAY_CACHE_DIR / "train" / "features.npy"
    stat = features.stat()
    for _ in range(2):  # reused: nothing rewritten
        WindowDataset.from_config(cfg, "train")
        assert _meta(own_dataset, "train")["token"] == token
        assert (features.stat().st_ino, features.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    # the data step rewrites the dataset with other prices: the cache follows (it is carried into the new folder)
    splits = {s: load_split(own_dataset, s) for s in ("train", "val", "test")}
    manifest = load_manifest(own_dataset)
    splits["train"] = splits["train"].assign(close=splits["train"]["close"] * 1.5)
    save_dataset(own_dataset, splits, manifest)
    new = WindowDataset.from_config(cfg, "train", return_index=True)
    assert _meta(own_dataset, "train")["token"] != token
    _assert_same_items(new, _frame_dataset(own_dataset, "train"))
    assert not torch.equal(new.get_batch(np.arange(len(new)))[0], old_items[0])
    # the dataset opened before the rewrite still reads its own (old) data: its map outlives the folder
    for u, v in zip(old.get_batch(np.arange(len(old))), old_items):
        assert torch.equal(u, v)

    # a manifest-only change (e.g. other split dates) also rebuilds; so do other feature columns
    token = _meta(own_dataset, "train")["token"]
    manifest["note"] = "edited"
    save_dataset(own_dataset, splits, manifest)
    WindowDataset.from_config(cfg, "train")
    assert _meta(own_dataset, "train")["token"] != token
    token = _meta(own_dataset, "train")["token"]
    swapped = ["close", "high", "low", "open", "volume", "amount"]
    other = WindowDataset.from_config(_config(own_dataset, feature_list=swapped), "train", return_index=True)
    assert _meta(own_dataset, "train")["token"] != token and _meta(own_dataset, "train")["features"] == swapped
    _assert_same_items(other, _frame_dataset(own_dataset, "train", feature_list=swapped))


def test_damaged_cache_is_rebuilt_not_used(own_dataset: Path) -> None:
    cfg = _config(own_dataset)
    reference = _frame_dataset(own_dataset, "val")
    WindowDataset.from_config(cfg, "val")
    cache = own_dataset / ARRAY_CACHE_DIR / "val"
    for damage in ("features.npy", "stamps.npy", "meta.json", "symbol_offsets.npy"):
        path = cache / damage
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        _assert_same_items(WindowDataset.from_config(cfg, "val", return_index=True), reference)
    (cache / "timestamps.npy").unlink()
    _assert_same_items(WindowDataset.from_config(cfg, "val", return_index=True), reference)


def test_no_cache_where_it_cannot_be_written_or_locked(own_dataset: Path, monkeypatch, caplog) -> None:
    cfg = _config(own_dataset)
    (own_dataset / ARRAY_CACHE_DIR).write_text("not a folder")  # the cache folder cannot be made
    ds = WindowDataset.from_config(cfg, "val", return_index=True)
    assert not ds.memory_mapped and "cannot write the array cache" in caplog.text
    _assert_same_items(ds, _frame_dataset(own_dataset, "val"))
    (own_dataset / ARRAY_CACHE_DIR).unlink()
    monkeypatch.setattr(windows, "fcntl", None)  # no file locks (e.g. Windows): each process loads its split
    assert not WindowDataset.from_config(cfg, "val").memory_mapped
    assert not (own_dataset / ARRAY_CACHE_DIR).exists()


def test_bad_data_is_refused_by_every_process(tmp_path: Path) -> None:
    frame = qlib_frame(2)
    frame.loc[frame.index[40], "volume"] = np.inf
    ts = frame["timestamps"]
    splits = {"train": frame[ts < "2023-07-01"], "val": frame[ts >= "2023-07-01"], "test": frame.tail(0)}
    splits = {k: v.reset_index(drop=True) for k, v in splits.items()}
    splits["train"].loc[40, "volume"] = np.inf  # save_dataset refuses NaN only
    save_dataset(tmp_path / "ds", splits, {})
    for _ in range(2):  # nothing is cached, so every opening says the same
        with pytest.raises(DataError, match="non-finite values, first in column 'volume'"):
            WindowDataset.from_config(_config(tmp_path / "ds"), "train")
    assert not (tmp_path / "ds" / ARRAY_CACHE_DIR / "train").exists()


# ---------------------------------------------------------------------- (c) a killed build
_KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from kronos.data import windows

    real_save = np.save
    def save(path, arr, **kw):  # dies in the middle of filling the temporary folder
        real_save(path, arr, **kw)
        if os.environ.get("KILL_IN_FILL"):
            os.kill(os.getpid(), signal.SIGKILL)
    np.save = save
    windows.split_arrays(sys.argv[1], "train")
    """
)


def _run_killed(code: str, dataset: Path, **env: str) -> None:
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", **env}
    proc = subprocess.run([sys.executable, "-c", code, str(dataset)], env=environ, timeout=120, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


@pytest.mark.slow
def test_a_killed_build_leaves_no_cache_that_is_used(own_dataset: Path) -> None:
    cfg = _config(own_dataset)
    reference = _frame_dataset(own_dataset, "train")
    root = own_dataset / ARRAY_CACHE_DIR

    _run_killed(_KILLED_BUILD, own_dataset, KILL_IN_FILL="1")  # killed while writing the first array
    assert not (root / "train").exists()
    assert [p.name for p in root.glob(".train.tmp-*")]  # the half-built temporary is all that is left
    ds = WindowDataset.from_config(cfg, "train", return_index=True)  # the lock died with the writer
    assert ds.memory_mapped and not list(root.glob(".train.tmp-*"))  # built afresh; the leftover removed
    _assert_same_items(ds, reference)

    # killed while a damaged earlier cache is being replaced: the damaged one is still refused, then rebuilt
    (root / "train" / "meta.json").write_text("{}")
    _run_killed(_KILLED_BUILD, own_dataset, KILL_IN_FILL="1")
    assert (root / "train" / "meta.json").read_text() == "{}"
    _assert_same_items(WindowDataset.from_config(cfg, "train", return_index=True), reference)

    # killed right after the folder swap (the crash-test hook of kronos.io): the cache is complete and used
    (root / "train" / "meta.json").write_text("{}")
    _run_killed(_KILLED_BUILD, own_dataset, KRONOS_TEST_KILL_AFTER_RENAME="1")
    token = _meta(own_dataset, "train")["token"]
    _assert_same_items(WindowDataset.from_config(cfg, "train", return_index=True), reference)
    assert _meta(own_dataset, "train")["token"] == token


@pytest.mark.slow
def test_processes_build_one_cache_and_wait_for_it(own_dataset: Path) -> None:
    """Four processes open the same split at once: one builds (under the lock), the others map its cache."""
    code = textwrap.dedent(
        """
        import sys
        from kronos.data import windows
        arrays = windows.split_arrays(sys.argv[1], "train")
        print(arrays.token)
        """
    )
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(own_dataset)], env=environ, stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    tokens = {p.communicate(timeout=120)[0].decode().strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert tokens == {_meta(own_dataset, "train")["token"]}  # every process mapped the one cache built


# ---------------------------------------------------------------------- (d) one copy per node
_RANK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from kronos.config import Config
    from kronos.data.windows import WindowDataset

    def memory():
        out = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0].endswith(":"):
                    out[parts[0][:-1]] = int(parts[1]) * 1024
        return out

    def read_all(split):
        cfg = Config(dataset_path=sys.argv[1], lookback_window=30, predict_window=5)
        ds = WindowDataset.from_config(cfg, split, memmap=sys.argv[2] == "memmap")
        total = 0.0
        for start in range(0, len(ds), 64):
            x, stamp = ds.get_batch(np.arange(start, min(start + 64, len(ds))))
            total += float(x[:, -1, 3].sum())
        return ds, total

    read_all("val")  # the same code paths once, so imports and caches are not counted
    before = memory()
    ds, total = read_all("train")
    print("ready", flush=True)
    sys.stdin.readline()  # the other rank has read everything too
    after = memory()
    private = sum(after[k] - before[k] for k in ("Private_Clean", "Private_Dirty"))
    print(json.dumps({"private": private, "rss": after["Rss"] - before["Rss"], "mapped": ds.memory_mapped,
                      "bytes": ds.features.nbytes + ds.stamps.nbytes + ds.timestamps.nbytes, "total": total}),
          flush=True)
    sys.stdin.readline()  # keeps its maps until every rank has measured
    """
)


def _two_ranks(dataset: Path, mode: str) -> list[dict]:
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(dataset), mode],
            env=environ,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:  # every rank has read every window: now all measure, while all still hold their maps
            assert p.stdin is not None
            p.stdin.write("measure\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs if p.stdout is not None]
        for p in procs:
            p.communicate("exit\n", timeout=120)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="needs Linux /proc/self/smaps_rollup")
def test_two_processes_share_one_copy_of_the_split(tmp_path: Path) -> None:
    base = qlib_frame()
    copies = [base.assign(symbol=base["symbol"] + f"_{c}") for c in range(40)]  # ~190k train rows, ~10 MB
    frame = pd.concat(copies, ignore_index=True)
    ts = frame["timestamps"]
    splits = {"train": frame[ts < "2023-07-01"], "val": frame[ts >= "2024-01-01"].head(20_000), "test": frame.head(0)}
    dates = {s: {"first": f["timestamps"].min(), "last": f["timestamps"].max()} for s, f in splits.items() if len(f)}
    save_dataset(tmp_path / "ds", splits, {"splits": dates})
    for split in ("train", "val"):  # built here, so the ranks only map it
        assert split_arrays(tmp_path / "ds", split) is not None

    mapped = _two_ranks(tmp_path / "ds", "memmap")
    size = mapped[0]["bytes"]
    assert size > 8e6 and all(r["mapped"] for r in mapped) and mapped[0]["total"] == mapped[1]["total"]
    for rank in mapped:
        assert rank["private"] < 0.10 * size, (rank, size)  # the data is shared, not copied
    # the measurement sees a private copy where there is one: today's in-memory loading
    loaded = _two_ranks(tmp_path / "ds", "memory")
    assert not any(r["mapped"] for r in loaded) and loaded[0]["total"] == mapped[0]["total"]
    for rank in loaded:
        assert rank["private"] > 0.9 * size, (rank, size)
