"""The streaming data step: a chunk of symbols at a time (any chunk size, any number of ranks) writes the dataset
that the whole-market step writes, with flat memory; datasets of the old one-file layout still load."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from kronos.config import Config
from kronos.data.sources import DataProcessorFactory
from kronos.data.store import SPLITS, dataset_exists, load_manifest, load_split, split_parts

REPO = Path(__file__).resolve().parents[2]
QLIB = REPO / "tests" / "fixtures" / "qlib_cn"
CSV = REPO / "tests" / "fixtures" / "kline_5min.csv"
ALL = 10**6  # a chunk that holds every symbol: the whole market at once, as before streaming
VOLATILE = ("created", "config")  # manifest keys that differ between runs of the same data

QLIB_KEYS = dict(
    data_source="qlib",
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
CSV_KEYS = dict(data_source="csv", lookback_window=20, predict_window=5, split_ratios=[0.7, 0.15, 0.15])


@pytest.fixture(scope="module")
def csv_folder(tmp_path_factory) -> Path:
    """Five symbols of different lengths (so the ratio cut dates depend on all of them)."""
    folder = tmp_path_factory.mktemp("csv")
    bars = pd.read_csv(CSV)
    for i, name in enumerate(["AAA", "BBB", "CCC", "DDD", "EEE"]):
        bars.iloc[i * 150 :].to_csv(folder / f"{name}.csv", index=False)
    return folder


def run(config: Config, chunk: int | str) -> tuple[dict[str, pd.DataFrame], dict]:
    processor = DataProcessorFactory.create_processor(config.data_source, config)
    if chunk == "whole":
        processor.run_whole()  # the in-memory step of before (process_frames + save_dataset)
    else:
        processor.run_pipeline(chunk_symbols=int(chunk))
    manifest = load_manifest(config.dataset_path)
    return {s: load_split(config.dataset_path, s) for s in SPLITS}, manifest


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for split in SPLITS:
        pd.testing.assert_frame_equal(a[0][split], b[0][split])
    strip = [{k: v for k, v in m.items() if k not in VOLATILE} for m in (a[1], b[1])]
    assert strip[0] == strip[1]


@pytest.mark.parametrize("mode", ["time_ranges", "ratios"])
def test_qlib_any_chunk_size_writes_the_whole_market_dataset(tmp_path, mode):
    keys = dict(QLIB_KEYS, **({"split_ratios": [0.6, 0.2, 0.2]} if mode == "ratios" else {}))
    whole = run(Config(**keys, dataset_path=str(tmp_path / "whole")), "whole")
    assert whole[1]["symbols"] and whole[1]["skipped_symbols"]  # the fixture leaves some symbols out
    for chunk in (1, 3, ALL):
        path = tmp_path / f"chunk{chunk}"
        streamed = run(Config(**keys, dataset_path=str(path)), chunk)
        assert_same(streamed, whole)
        n_chunks = -(-len(streamed[1]["symbols"] + list(streamed[1]["skipped_symbols"])) // chunk)
        assert 1 <= len(split_parts(path / "train.parquet")) <= n_chunks
        assert streamed[1]["format_version"] == 2
        for split in SPLITS:  # plain readers read a split folder as one table
            pd.testing.assert_frame_equal(pd.read_parquet(path / f"{split}.parquet"), streamed[0][split])
    assert not list(tmp_path.glob(".*"))  # no temporary folder left beside the datasets


def test_csv_folder_any_chunk_size_writes_the_whole_market_dataset(tmp_path, csv_folder):
    keys = dict(CSV_KEYS, csv_data_path=str(csv_folder))
    whole = run(Config(**keys, dataset_path=str(tmp_path / "whole")), "whole")
    host = socket.gethostname().replace("-", "_")[:40]
    stale = tmp_path / f".chunk1-parts.tmp-{host}-999999999-0123"  # a killed data step's parts (its pid is gone)
    (stale / "spool").mkdir(parents=True)
    cut = pd.Timestamp(whole[1]["splits"]["train"]["last"])
    for chunk in (1, 3, ALL):
        streamed = run(Config(**keys, dataset_path=str(tmp_path / f"chunk{chunk}")), chunk)
        assert_same(streamed, whole)
        assert pd.Timestamp(streamed[1]["splits"]["train"]["last"]) == cut
    assert not stale.exists() and not list(tmp_path.glob(".*"))


def test_old_one_file_layout_still_loads(tmp_path, csv_folder):
    new = tmp_path / "new"
    splits, manifest = run(Config(**CSV_KEYS, csv_data_path=str(csv_folder), dataset_path=str(new)), 2)
    old = tmp_path / "old"  # format 1, written by hand: one <split>.parquet file per split
    old.mkdir()
    for split in SPLITS:
        splits[split].to_parquet(old / f"{split}.parquet", index=False, engine="pyarrow")
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert dataset_exists(old) and dataset_exists(new)
    for split in SPLITS:
        pd.testing.assert_frame_equal(load_split(old, split), splits[split])
    assert load_manifest(old)["splits"] == manifest["splits"]


MEMORY_RUN = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path
    from kronos.config import Config
    from kronos.data.sources import DataProcessorFactory

    def peak_kib():  # this process's peak RSS (VmHWM starts afresh at exec, unlike getrusage's ru_maxrss)
        return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

    cfg = Config(data_source="csv", csv_data_path=sys.argv[1], dataset_path=sys.argv[2], lookback_window=20,
                 predict_window=5, split_ratios=[0.7, 0.15, 0.15])
    processor = DataProcessorFactory.create_processor("csv", cfg)
    before = peak_kib()
    processor.run_pipeline(chunk_symbols=int(sys.argv[3]))
    print((peak_kib() - before) // 1024)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc/self/status")
def test_peak_memory_follows_the_chunk_not_the_market(tmp_path):
    market = tmp_path / "market"  # 300 symbols: copies of one real series under new names
    market.mkdir()
    bars = pd.read_csv(CSV, parse_dates=["timestamps"]).iloc[:1000]
    for i in range(300):
        bars.to_parquet(market / f"S{i:04d}.parquet", index=False)
    growth = {}
    for chunk in (20, 300):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_RUN, str(market), str(tmp_path / f"ds{chunk}"), str(chunk)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1"),
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        growth[chunk] = int(out.stdout.split()[-1])  # MiB the data step added to the process's peak
    assert growth[20] < 0.6 * growth[300], growth
    assert_same(
        ({s: load_split(tmp_path / "ds20", s) for s in SPLITS}, load_manifest(tmp_path / "ds20")),
        ({s: load_split(tmp_path / "ds300", s) for s in SPLITS}, load_manifest(tmp_path / "ds300")),
    )


RANK_RUN = textwrap.dedent(
    """
    import json, sys
    from kronos.config import Config
    from kronos.data.sources import DataProcessorFactory
    from kronos.train import distributed as kd

    cfg = Config(**json.loads(sys.argv[1]))
    with kd.process_group(cfg) as ctx:
        assert ctx.world_size == 2 and ctx.backend == "gloo"
        processor = DataProcessorFactory.create_processor(cfg.data_source, cfg)
        if sys.argv[2] == "fail" and ctx.rank == 1:
            processor.load_symbols = lambda symbols: 1 / 0
        manifest = processor.run_pipeline(kd.data_shard(), chunk_symbols=1)
        print(f"rank {ctx.rank} wrote {len(manifest['symbols'])} symbols", flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(keys: dict, how: str) -> list[tuple[int, str]]:
    port, procs = _free_port(), []
    for rank in (0, 1):
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO / "src"),
            OMP_NUM_THREADS="1",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        args = [sys.executable, "-c", RANK_RUN, json.dumps(keys), how]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out, start = [], time.monotonic()
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1.0, 90 - (time.monotonic() - start)))
            out.append((proc.returncode, stderr + stdout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


@pytest.mark.slow
def test_two_ranks_write_the_one_process_dataset(tmp_path, csv_folder):
    keys = dict(QLIB_KEYS, device="cpu")
    one = run(Config(**keys, dataset_path=str(tmp_path / "one")), 1)
    results = _two_ranks(dict(keys, dataset_path=str(tmp_path / "two")), "ok")
    assert [code for code, _ in results] == [0, 0], results
    assert all(f"wrote {len(one[1]['symbols'])} symbols" in text for _, text in results)
    two = ({s: load_split(tmp_path / "two", s) for s in SPLITS}, load_manifest(tmp_path / "two"))
    assert_same(two, one)
    assert len(split_parts(tmp_path / "two" / "train.parquet")) == len(split_parts(tmp_path / "one" / "train.parquet"))

    # a rank that fails stops both (no hang), and the dataset in place stays as it was
    before = load_manifest(tmp_path / "two")["created"]
    results = _two_ranks(dict(keys, dataset_path=str(tmp_path / "two")), "fail")
    assert all(code != 0 for code, _ in results), results
    assert "ZeroDivisionError" in results[1][1] and "failed on another rank" in results[0][1]
    assert load_manifest(tmp_path / "two")["created"] == before
    assert not list(tmp_path.glob(".*"))
