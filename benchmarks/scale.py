"""Scale measurements; ``--part`` picks one.

``--part ranks`` (issue 23, item 3: one copy of the training data per node): two training ranks -- two processes,
as ``torchrun --nproc-per-node 2`` starts them -- read the same ``train`` split of a synthetic market (renamed
copies of the bundled Qlib demo series, written with :func:`kronos.data.store.save_dataset`), once with the
memory-mapped array cache (``WindowDataset.from_config``, the trainer's path) and once with the old in-memory
loading (``memmap=False``: every rank loads the split file and converts it). Both ranks start together and draw
their disjoint halves of each epoch (``WindowSampler`` + ``window_loader``, batch 64) for ``--seconds``; then,
while both still hold their data, each reads ``/proc/self/smaps_rollup``. Per rank: time to open the split, RSS,
private memory (``Private_Clean + Private_Dirty``), PSS, and windows per second. The array cache is built once
before the memory-mapped run (its build time is shown); the page cache is warm for both.

Run: ``python benchmarks/scale.py --part ranks [--copies 150] [--seconds 10]``.

``--part forecast`` (issue 23, item 4): the latest forecasts of a whole market with the per-series and the NumPy
forecast preparation (:func:`bench_forecast`).

``--part data`` (issue 23, items 1-2): seconds and peak RSS of the data step (``kronos data``: the streaming step,
``data_chunk_symbols`` at a time) on synthetic markets -- daily (Qlib folder and CSV files; targets: 5,000 symbols
under 45 s and 1.5 GB) and 5-minute (one Parquet file per symbol, about a year each; target: 5,000 symbols within
4 GB) -- beside the previous implementation (git revision ``--baseline``), the all-at-once step or one chunk
(:func:`bench_data_step`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
try:
    import kronos  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------- --part ranks
def _market(provider: Path, copies: int) -> pd.DataFrame:
    """Long frame of ``copies`` renamed copies of every series of a Qlib provider's day bins."""
    from kronos.data.processing import add_time_features

    calendar = pd.to_datetime(np.loadtxt(provider / "calendars" / "day.txt", dtype=str))
    parts = []
    for folder in sorted((provider / "features").iterdir()):
        fields = ("open", "high", "low", "close", "volume")
        if not all((folder / f"{f}.day.bin").is_file() for f in fields):
            continue
        cols = {}
        for field in fields:
            raw = np.fromfile(folder / f"{field}.day.bin", dtype="<f4")  # first value: start index in calendar
            begin = int(raw[0])
            cols[field] = raw[1:].astype(np.float64)
        df = pd.DataFrame(cols)
        df.insert(0, "timestamps", calendar[begin : begin + len(df)])
        df["amount"] = (df["open"] + df["high"] + df["low"] + df["close"]) / 4 * df["volume"]
        df = df.dropna()
        df = df[df["volume"] > 0].reset_index(drop=True)
        parts.extend(df.assign(symbol=f"{folder.name.upper()}_{c}") for c in range(copies))
    return add_time_features(pd.concat(parts, ignore_index=True))


def _write_market(path: Path, provider: Path, copies: int) -> dict[str, int]:
    from kronos.data.store import save_dataset

    frame = _market(provider, copies)
    ts = frame["timestamps"]
    cut_val, cut_test = ts.quantile(0.8), ts.quantile(0.9)
    splits = {
        "train": frame[ts < cut_val],
        "val": frame[(ts >= cut_val) & (ts < cut_test)],
        "test": frame[ts >= cut_test],
    }
    dates = {
        s: {"first": f["timestamps"].min(), "last": f["timestamps"].max(), "rows": len(f)} for s, f in splits.items()
    }
    save_dataset(path, splits, {"source": f"{provider} x {copies} copies", "splits": dates})
    return {s: len(f) for s, f in splits.items()}


def _memory() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(":"):
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def _rank_worker(args: argparse.Namespace) -> None:
    """One rank: open the split, wait for the start signal, read windows for ``--seconds``, report (JSON)."""
    import torch

    from kronos.config import Config
    from kronos.data.windows import WindowDataset, WindowSampler, window_loader

    torch.set_num_threads(1)
    cfg = Config(dataset_path=args.dataset, lookback_window=args.lookback, predict_window=args.predict)
    start = _memory()
    t0 = time.perf_counter()
    ds = WindowDataset.from_config(cfg, "train", memmap=args.worker == "memmap")
    open_s = time.perf_counter() - t0
    sampler = WindowSampler(len(ds), len(ds), seed=0, rank=args.rank, world_size=2)
    print("ready", flush=True)
    sys.stdin.readline()  # both ranks start together
    windows, epoch = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        sampler.set_epoch(epoch)
        for x, _stamp in window_loader(ds, sampler, 64):
            windows += x.shape[0]
            if time.perf_counter() - t0 >= args.seconds:
                break
        epoch += 1
    rate = windows / (time.perf_counter() - t0)
    print("done", flush=True)
    sys.stdin.readline()  # the other rank is done too: measure while both hold their data
    mem = _memory()
    private = mem["Private_Clean"] + mem["Private_Dirty"]
    report = {
        "rank": args.rank,
        "mode": args.worker,
        "mapped": ds.memory_mapped,
        "open_s": open_s,
        "windows_per_s": rate,
        "rss": mem["Rss"],
        "private": private,
        "private_growth": private - start["Private_Clean"] - start["Private_Dirty"],
        "pss": mem["Pss"],
        "data_bytes": int(
            ds.features.nbytes + ds.stamps.nbytes + (0 if ds.timestamps is None else ds.timestamps.nbytes)
        ),
    }
    print(json.dumps(report), flush=True)
    sys.stdin.readline()


def _two_ranks(args: argparse.Namespace, dataset: Path, mode: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--part", "ranks", "--dataset", str(dataset), "--worker", mode]
    cmd += ["--seconds", str(args.seconds), "--lookback", str(args.lookback), "--predict", str(args.predict)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd + ["--rank", str(r)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for r in range(2)
    ]

    def expect(word: str) -> None:
        for p in procs:
            line = p.stdout.readline().strip() if p.stdout else ""
            if line != word:
                raise RuntimeError(f"rank worker said {line!r}, expected {word!r}")

    def send(text: str) -> None:
        for p in procs:
            if p.stdin:
                p.stdin.write(text)
                p.stdin.flush()

    try:
        expect("ready")
        send("go\n")
        expect("done")
        send("measure\n")
        results = [json.loads(p.stdout.readline()) for p in procs if p.stdout]
        send("exit\n")
        for p in procs:
            p.wait(timeout=60)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def bench_training_ranks(args: argparse.Namespace) -> None:
    """Two ranks reading one split: memory-mapped array cache vs the old in-memory loading (see the docstring)."""
    if args.worker:
        _rank_worker(args)
        return
    if not Path("/proc/self/smaps_rollup").is_file():
        raise SystemExit("--part ranks needs Linux /proc/self/smaps_rollup")
    from kronos.data.windows import split_arrays

    with tempfile.TemporaryDirectory(prefix="kronos-scale-") as tmp:
        dataset = Path(args.dataset) if args.dataset else Path(tmp) / "market"
        if not args.dataset:
            t0 = time.perf_counter()
            rows = _write_market(dataset, Path(args.data), args.copies)
            print(
                f"synthetic market: {rows} rows ({args.copies} copies of {args.data}), "
                f"written in {time.perf_counter() - t0:.1f}s"
            )
        results = {}
        for mode in ("memory", "memmap"):
            if mode == "memmap":
                t0 = time.perf_counter()
                split_arrays(dataset, "train")  # the first rank's one-off build, outside the measurement
                print(f"array cache of 'train' built in {time.perf_counter() - t0:.2f}s")
            results[mode] = _two_ranks(args, dataset, mode)
        size = results["memmap"][0]["data_bytes"]
        print(
            f"\ntrain split arrays: {size / MIB:.1f} MiB; 2 ranks, {args.seconds:g}s each, batch 64, "
            f"window {args.lookback}+{args.predict}+1"
        )
        head = f"{'loading':<10}{'rank':>5}{'open s':>9}{'RSS MiB':>10}{'private MiB':>13}{'PSS MiB':>10}"
        head += f"{'windows/s':>12}"
        print(head)
        print("-" * len(head))
        for mode, label in (("memory", "in-memory"), ("memmap", "memmap")):
            for r in results[mode]:
                print(
                    f"{label:<10}{r['rank']:>5}{r['open_s']:>9.2f}{r['rss'] / MIB:>10.1f}{r['private'] / MIB:>13.1f}"
                    f"{r['pss'] / MIB:>10.1f}{r['windows_per_s']:>12.0f}"
                )
        for mode in ("memory", "memmap"):
            growth = [r["private_growth"] / MIB for r in results[mode]]
            total = sum(r["windows_per_s"] for r in results[mode])
            print(
                f"{mode}: private growth from opening+reading per rank {growth[0]:.1f} / {growth[1]:.1f} MiB "
                f"(split arrays {size / MIB:.1f} MiB); both ranks {total:.0f} windows/s"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"data_bytes": size, **results}, indent=2))


# ---------------------------------------------------------------------------------------------- --part forecast
def _forecast_market(args: argparse.Namespace) -> pd.DataFrame:
    """Long frame of ``--symbols`` renamed copies of the bundled series: the Qlib demo's day bins (``--bars daily``)
    or the 5-minute fixture CSV (``--bars 5min``), prices scaled a little per copy."""
    series = []
    if args.bars == "5min":
        df = pd.read_csv(ROOT / "tests" / "fixtures" / "kline_5min.csv", parse_dates=["timestamps"])
        series.append(df)
    else:
        provider = Path(args.data)
        calendar = pd.to_datetime(np.loadtxt(provider / "calendars" / "day.txt", dtype=str))
        for folder in sorted((provider / "features").iterdir()):
            fields = ("open", "high", "low", "close", "volume")
            if not all((folder / f"{f}.day.bin").is_file() for f in fields):
                continue
            cols = {}
            for field in fields:
                raw = np.fromfile(folder / f"{field}.day.bin", dtype="<f4")
                begin = int(raw[0])
                cols[field] = raw[1:].astype(np.float64)
            df = pd.DataFrame(cols)
            df.insert(0, "timestamps", calendar[begin : begin + len(df)])
            df["amount"] = (df["open"] + df["high"] + df["low"] + df["close"]) / 4 * df["volume"]
            series.append(df.dropna().query("volume > 0").reset_index(drop=True))
    parts = []
    for i in range(args.symbols):
        df = series[i % len(series)].copy()
        df[["open", "high", "low", "close"]] *= 1 + (i // len(series)) / 1000
        parts.append(df.assign(symbol=f"S{i:05d}"))
    return pd.concat(parts, ignore_index=True)


def _forecast_predictor(shape: str):
    import torch

    from kronos.inference import KronosPredictor
    from kronos.model import Kronos, KronosTokenizer, build_predictor, build_tokenizer

    if shape == "tiny":  # the parity fixture's checkpoints
        folder = ROOT / "tests" / "fixtures" / "parity-tiny" / "tiny"
        tok, model = KronosTokenizer.from_pretrained(folder / "tokenizer"), Kronos.from_pretrained(folder / "predictor")
    else:  # random weights of the official Kronos-small / Kronos-Tokenizer-base configs
        torch.manual_seed(0)
        tok, model = build_tokenizer("base"), build_predictor("small")
    return KronosPredictor(model, tok, device="cpu", max_context=512)


def bench_forecast(args: argparse.Namespace) -> None:
    """Latest forecasts of a whole market (issue 23, item 4): ``predict_df`` at every symbol's last bar, as the
    pipeline's predict step runs it, with the per-series preparation (the former path, ``fast_prepare=False``) and
    with the NumPy preparation. Prints forecasts per second, the time outside the model (everything but
    :func:`~kronos.inference.generate.sample_forecasts`: checks, normalisation, time features, calendar, records)
    per symbol and as a share of the total, and checks that both paths give identical records.

    Run: ``python benchmarks/scale.py --part forecast [--symbols 500] [--shapes tiny small] [--bars daily|5min]``.
    """
    import torch

    import kronos.inference.predictor as predictor_module

    torch.set_num_threads(args.threads)
    frame = _forecast_market(args)
    inner = predictor_module.sample_forecasts
    model_s = [0.0]

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            model_s[0] += time.perf_counter() - t0

    predictor_module.sample_forecasts = timed  # type: ignore[assignment]
    print(
        f"{args.symbols} symbols, {len(frame)} rows of {args.bars} bars; lookback {args.lookback}, pred_len "
        f"{args.predict}, {args.sample_count} sample path(s), {args.batch_size} forecasts a chunk, "
        f"{torch.get_num_threads()} thread(s), CPU"
    )
    head = f"{'shape':<7}{'preparation':<13}{'total s':>9}{'model s':>9}{'forecasts/s':>13}{'outside ms/sym':>16}"
    head += f"{'outside share':>15}"
    print(head)
    print("-" * len(head))
    results: dict[str, Any] = {}
    try:
        for shape in args.shapes:
            predictor = _forecast_predictor(shape)
            outputs = {}
            for mode in ("per-series", "numpy"):
                predictor.fast_prepare = mode == "numpy"
                best: tuple[float, float] | None = None
                for _ in range(args.repeats):
                    model_s[0] = 0.0
                    t0 = time.perf_counter()
                    outputs[mode] = predictor.predict_df(
                        frame, pred_len=args.predict, lookback=args.lookback, sample_count=args.sample_count,
                        seed=0, batch_size=args.batch_size, calendar=args.calendar or None, progress=False,
                    )  # fmt: skip
                    run = (time.perf_counter() - t0, model_s[0])
                    best = run if best is None or run[0] < best[0] else best
                assert best is not None
                total, model = best
                outside = total - model
                row = {
                    "total_s": total,
                    "model_s": model,
                    "forecasts_per_s": args.symbols / total,
                    "outside_ms_per_symbol": 1e3 * outside / args.symbols,
                    "outside_share": outside / total,
                }
                results[f"{shape}/{mode}"] = row
                print(
                    f"{shape:<7}{mode:<13}{total:>9.2f}{model:>9.2f}{row['forecasts_per_s']:>13.1f}"
                    f"{row['outside_ms_per_symbol']:>16.3f}{100 * row['outside_share']:>14.1f}%"
                )
            pd.testing.assert_frame_equal(outputs["per-series"], outputs["numpy"], check_exact=True)
        print("records identical on both paths")
    finally:
        predictor_module.sample_forecasts = inner  # type: ignore[assignment]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


# ---------------------------------------------------------------------------------------------- --part data
DATA_WORKER = """
import json, re, sys, time
from pathlib import Path
from kronos.config import Config
from kronos.data.sources import DataProcessorFactory

def peak_mib():  # VmHWM: this process's peak RSS (it starts afresh at exec)
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

cfg = Config(**json.loads(sys.argv[1]))
mode = sys.argv[2]
processor = DataProcessorFactory.create_processor(cfg.data_source, cfg)
if cfg.data_source == "qlib":  # pyqlib's imports are no part of the data the step holds
    import qlib.data  # noqa: F401
start_mib = peak_mib()
start = time.perf_counter()
if mode == "whole":
    processor.run_whole()
else:
    processor.run_pipeline(chunk_symbols=int(mode))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mib": peak_mib(), "start_mib": start_mib}))
"""


def _data_markets(root: Path, provider: Path, n: int, layouts: list[str]) -> dict[str, dict[str, Any]]:
    """Synthetic markets of ``n`` daily symbols: renamed copies of the provider's real series (indices left out),
    as a Qlib folder (the bin files hard-linked or copied per instrument, membership spans copied) and as a folder
    of one CSV file per symbol. Returns the data-step config keys of each layout."""
    features = provider / "features"
    series = [f for f in sorted(features.iterdir()) if f.is_dir() and not f.name.startswith(("sh000", "sz399"))]
    spans: dict[str, list[str]] = {}
    for line in (provider / "instruments" / "csi300.txt").read_text().splitlines():
        code, *rest = line.split("\t")
        spans.setdefault(code.lower(), []).append("\t".join(rest))
    names = [f"sh{700000 + i}" for i in range(n)]
    out: dict[str, dict[str, Any]] = {}
    if "qlib" in layouts:
        qroot = root / f"qlib-{n}"
        if not qroot.exists():
            (qroot / "instruments").mkdir(parents=True)
            (qroot / "calendars").mkdir()
            (qroot / "calendars" / "day.txt").write_text((provider / "calendars" / "day.txt").read_text())
            lines = []
            for i, name in enumerate(names):
                src = series[i % len(series)]
                dest = qroot / "features" / name
                dest.mkdir(parents=True)
                for f in src.iterdir():
                    try:
                        os.link(f, dest / f.name)
                    except OSError:
                        dest.joinpath(f.name).write_bytes(f.read_bytes())
                lines += [f"{name.upper()}\t{span}" for span in spans.get(src.name, [])]
            (qroot / "instruments" / "csi300.txt").write_text("\n".join(lines) + "\n")
        out["qlib"] = dict(
            data_source="qlib",
            qlib_data_path=str(qroot),
            instrument="csi300",
            dataset_begin_time="2018-01-01",
            dataset_end_time="2024-12-31",
            train_time_range=["2018-01-01", "2022-12-31"],
            val_time_range=["2022-09-01", "2023-12-31"],
            test_time_range=["2023-09-01", "2024-12-31"],
        )
    if "csv" in layouts:
        croot = root / f"csv-{n}"
        if not croot.exists():
            croot.mkdir(parents=True)
            calendar = pd.to_datetime(np.loadtxt(provider / "calendars" / "day.txt", dtype=str))
            texts = []
            for src in series:
                cols = {}
                for field in ("open", "high", "low", "close", "volume"):
                    raw = np.fromfile(src / f"{field}.day.bin", dtype="<f4")
                    cols[field] = raw[1:]
                    first = int(raw[0])
                frame = pd.DataFrame(cols).assign(timestamps=calendar[first : first + len(cols["close"])])
                texts.append(frame[["timestamps", *cols]].dropna().to_csv(index=False))
            for i, name in enumerate(names):
                (croot / f"{name}.csv").write_text(texts[i % len(texts)])
        out["csv"] = dict(data_source="csv", csv_data_path=str(croot), split_ratios=[0.7, 0.15, 0.15])
    return out


FIVE_MIN = ROOT / "tests" / "fixtures" / "kline_5min.csv"  # = shared/data/kline_5min_a_share.csv; see --five-min


def _five_min_market(root: Path, source: Path, n: int, days: int) -> dict[str, Any]:
    """A synthetic 5-minute market of ``n`` symbols, one Parquet file each: ``days`` trading days (weekdays from
    2023-01-02) of the real series' full sessions (48 bars: 09:35-11:30, 13:05-15:00), day ``d`` of symbol ``i``
    taking the bars of real session ``(d + i) % sessions`` (the times moved to that day), prices scaled by
    ``1 + (i // sessions) / 1000``. Returns the data-step config keys (data_source csv, ratio splits)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / f"5min-{n}x{days}"
    keys = dict(data_source="csv", csv_data_path=str(folder), split_ratios=[0.7, 0.15, 0.15])
    if folder.exists():
        return keys
    folder.mkdir(parents=True)
    bars = pd.read_csv(source, parse_dates=["timestamps"])
    day = bars["timestamps"].dt.normalize()
    sizes = day.map(day.value_counts())
    full = bars[sizes == sizes.max()].reset_index(drop=True)  # whole sessions only
    sessions = full["timestamps"].dt.normalize().nunique()
    per_day = len(full) // sessions
    clock = (full["timestamps"] - full["timestamps"].dt.normalize()).to_numpy()[:per_day]
    values = full[["open", "high", "low", "close", "volume", "amount"]].to_numpy().reshape(sessions, per_day, 6)
    dates = pd.bdate_range("2023-01-02", periods=days).to_numpy()
    stamps = (dates[:, None] + clock[None, :]).reshape(-1)
    for i in range(n):
        rows = values[(np.arange(days) + i) % sessions].reshape(-1, 6).copy()
        rows[:, :4] *= 1 + (i // sessions) / 1000
        rows[:, 5] *= 1 + (i // sessions) / 1000
        cols = {"timestamps": pa.array(stamps)}
        cols.update(
            {c: pa.array(rows[:, k]) for k, c in enumerate(("open", "high", "low", "close", "volume", "amount"))}
        )
        pq.write_table(pa.table(cols), folder / f"S{i:05d}.parquet")
    return keys


def _baseline_src(root: Path, rev: str) -> Path:
    """The package source of git revision ``rev`` (``git archive``, nothing checked out), for the old step."""
    dest = root / f"baseline-{rev}"
    if not dest.exists():
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def bench_data_step(args: argparse.Namespace) -> None:
    """``--part data`` (issue 23, items 1-2): the data step's seconds and peak RSS on synthetic markets, each run in
    a fresh subprocess: ``stream`` (this tree's streaming step, ``--chunk`` symbols at a time, as ``kronos data``
    runs it), ``one-chunk`` (every symbol in one chunk), ``whole`` (this tree's all-at-once step, ``run_whole``)
    and ``baseline`` (the streaming step of git revision ``--baseline``, default the first streaming version:
    per-symbol pandas frames, ``D.features``, Parquet spool).

    Daily markets (``--market-sizes``): renamed copies of the provider's real series, as a Qlib folder and as a
    folder of CSV files (``--layouts``). 5-minute markets (``--five-min SYMBOLS ...``): one Parquet file per
    symbol, ``--days`` trading days each, built from ``--five-min-source`` (:func:`_five_min_market`; data_source
    csv, ratio splits). The markets are built under ``--workdir`` (default: a temporary folder, removed after).

    Run: ``python benchmarks/scale.py --part data [--market-sizes 500 1000 5000] [--layouts qlib csv]
    [--five-min 1000 5000 --days 242] [--modes stream whole baseline] [--chunk 300]``.
    """
    if not Path("/proc/self/status").is_file():
        raise SystemExit("--part data needs Linux /proc/self/status (VmHWM)")
    provider = Path(args.data)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kronos-data-bench-", dir=args.workdir or None) as tmp:
        root = Path(tmp)
        baseline = _baseline_src(root, args.baseline) if "baseline" in args.modes else None
        markets: list[tuple[str, str, dict[str, Any]]] = []
        for n in args.market_sizes:
            markets += [
                (f"{n}", layout, keys) for layout, keys in _data_markets(root, provider, n, args.layouts).items()
            ]
        for n in args.five_min:
            t0 = time.perf_counter()
            keys = _five_min_market(root, Path(args.five_min_source), n, args.days)
            print(f"5-minute market of {n} symbols x {args.days} days written in {time.perf_counter() - t0:.1f}s")
            markets.append((f"{n}x{args.days}d", "5min", keys))
        print(f"{'symbols':>10} {'layout':<6} {'mode':<22}{'seconds':>9}{'peak RSS MiB':>14}{'after imports':>15}")
        for size, layout, keys in markets:
            keys = dict(keys, lookback_window=args.lookback, predict_window=args.predict)
            modes = {
                "stream": (f"stream {args.chunk}", str(args.chunk), ROOT / "src"),
                "one-chunk": ("one chunk", str(10**9), ROOT / "src"),
                "whole": ("whole", "whole", ROOT / "src"),
                "baseline": (f"stream {args.chunk} @{args.baseline}", str(args.chunk), baseline),
            }
            for mode in args.modes:
                label, arg, src = modes[mode]
                cfg = dict(keys, dataset_path=str(root / f"ds-{layout}-{size}-{mode}"))
                proc = subprocess.run(
                    [sys.executable, "-c", DATA_WORKER, json.dumps(cfg), arg],
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, PYTHONPATH=str(src), TQDM_DISABLE="1"),
                )
                if proc.returncode != 0:
                    raise SystemExit(f"data step failed ({layout}, {size}, {label}): {proc.stderr[-1500:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                shutil.rmtree(cfg["dataset_path"], ignore_errors=True)
                results[f"{size}/{layout}/{label}"] = row
                print(
                    f"{size:>10} {layout:<6} {label:<22}{row['seconds']:>9.1f}{row['peak_mib']:>14.0f}"
                    f"{row['start_mib']:>15.0f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


PARTS = {"ranks": bench_training_ranks, "forecast": bench_forecast, "data": bench_data_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    ranks = parser.add_argument_group("--part ranks")
    ranks.add_argument("--data", default=str(ROOT / "examples" / "data" / "qlib_cn_demo"), help="Qlib provider")
    ranks.add_argument("--copies", type=int, default=150, help="renamed copies of each series (more rows)")
    ranks.add_argument("--seconds", type=float, default=10.0, help="reading time per rank")
    ranks.add_argument("--lookback", type=int, default=90)
    ranks.add_argument("--predict", type=int, default=10)
    ranks.add_argument("--dataset", default="", help="an existing dataset instead of the synthetic market")
    ranks.add_argument("--json", default="", help="also write the figures here")
    ranks.add_argument("--worker", choices=["memmap", "memory"], default="", help=argparse.SUPPRESS)
    ranks.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    forecast = parser.add_argument_group("--part forecast (also --lookback, --predict, --data, --json)")
    forecast.add_argument("--symbols", type=int, default=500, help="symbols of the market (copies of the series)")
    forecast.add_argument("--shapes", nargs="+", choices=["tiny", "small"], default=["tiny", "small"])
    forecast.add_argument("--bars", choices=["daily", "5min"], default="daily", help="Qlib demo days or 5-min CSV")
    forecast.add_argument("--sample-count", type=int, default=1, help="sample paths per forecast")
    forecast.add_argument("--batch-size", type=int, default=50, help="forecasts per chunk")
    forecast.add_argument("--calendar", default="XSHG", help="exchange calendar of the future bars ('' for none)")
    forecast.add_argument("--threads", type=int, default=2, help="torch threads")
    forecast.add_argument("--repeats", type=int, default=1, help="runs per row (the fastest is shown)")
    data = parser.add_argument_group("--part data (also --data, --lookback, --predict, --json)")
    data.add_argument("--market-sizes", type=int, nargs="*", default=[500, 1000, 5000], help="daily markets")
    data.add_argument("--layouts", nargs="+", choices=["qlib", "csv"], default=["qlib", "csv"])
    data.add_argument("--five-min", type=int, nargs="*", default=[], help="5-minute markets (symbols each)")
    data.add_argument("--days", type=int, default=242, help="trading days of each 5-minute symbol")
    data.add_argument("--five-min-source", default=str(FIVE_MIN), help="the real 5-minute series copied")
    data.add_argument("--chunk", type=int, default=300, help="symbols per chunk of the streaming data step")
    data.add_argument(
        "--modes", nargs="+", choices=["stream", "one-chunk", "whole", "baseline"], default=["stream", "baseline"]
    )
    data.add_argument("--baseline", default="1e573b8", help="git revision of the old streaming step")
    data.add_argument("--workdir", default="", help="folder for the markets and datasets (default: temporary)")
    args = parser.parse_args()
    PARTS[args.part](args)


if __name__ == "__main__":
    main()
