"""The one GPU check: everything CPU CI cannot prove, run on a machine with CUDA in under 8 minutes.

    make gpu-check                                  # results in $OUT, or ./gpu-check/ when OUT is unset
    python3 benchmarks/gpu_check.py --out DIR       # the same
    python3 benchmarks/gpu_check.py --cpu           # smoke run without a GPU: CUDA-only parts skipped or shrunk

It uses the machine's ``python3`` (which must already have CUDA PyTorch) and installs only what is missing: the
package itself (``pip install -e . --no-deps``; the sources are also put on PYTHONPATH, so an offline machine
works too) and any missing light dependency; it never installs or upgrades torch. Steps, each with its own log
under the results folder (a failing step does not stop the others):

1. ``env``: python, torch, CUDA, GPUs (``env.json``, ``nvidia-smi.txt``);
2. ``gpu-tests``: ``pytest -m gpu`` plus the numerics tests (``gpu-tests.xml`` junit, ``gpu-tests.log``);
3. ``inference``: ``benchmarks/inference.py --device cuda``, cached vs uncached, batch 1/8/64, Kronos-small shape,
   lookback 400 / pred 100, outputs identical (``inference.json``);
4. ``training``: ``benchmarks/training.py --device cuda --batch 50 --compile``: fp32 vs bf16 vs bf16+compile
   tokens/s for Tokenizer-base and Kronos-small (``training.json``);
5. ``pipeline``: the whole pipeline in fast mode on CUDA on the bundled CSV K-lines (``pipeline_result.json``);
6. ``torchrun``: tokenizer training under ``torchrun`` with NCCL on every GPU present (``torchrun_summary.json``).

``summary.json`` and ``summary.md`` list every step (ok / failed / skipped, seconds) and the two targets: the
predictor's bf16 tokens/s at least 2x fp32, and the KV-cached generator at least 8.6x the uncached one at
lookback 400 / pred 100, batch 1 (the upstream KV-cache proposal's A100 figure).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 450  # all steps together (the check must finish in under 8 minutes)
LIGHT_DEPS = {
    "numpy": "numpy>=1.24",
    "pandas": "pandas>=2.2",
    "pyarrow": "pyarrow>=14",
    "safetensors": "safetensors>=0.4",
    "huggingface_hub": "huggingface_hub>=0.20",
    "tqdm": "tqdm>=4.60",
    "matplotlib": "matplotlib>=3.7",
    "yaml": "pyyaml>=6",
    "pytest": "pytest>=7",
}
TARGETS = {"predictor bf16 / fp32 tokens/s": 2.0, "cached / uncached at 400/100, batch 1": 8.6}


class Check:
    def __init__(self, out: Path, cpu: bool) -> None:
        self.out, self.cpu = out, cpu
        self.t0 = time.monotonic()
        self.steps: list[dict] = []
        self.env = dict(os.environ)
        src = str(ROOT / "src")
        self.env["PYTHONPATH"] = (
            src + os.pathsep + self.env.get("PYTHONPATH", "") if self.env.get("PYTHONPATH") else src
        )
        self.env.setdefault("MPLBACKEND", "Agg")

    def left(self) -> float:
        budget = BUDGET_S * 3 if self.cpu else BUDGET_S  # the CPU smoke run is slower and has no deadline to meet
        return budget - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list[str], timeout: float, cwd: Path = ROOT, skip: str = "") -> bool:
        """Run one step, its output in ``<name>.log``; never raises."""
        log = self.out / f"{name}.log"
        if skip:
            self.steps.append({"step": name, "status": "skipped", "why": skip, "seconds": 0.0})
            print(f"[{name}] skipped: {skip}", flush=True)
            return False
        timeout = timeout * 3 if self.cpu else timeout  # the CPU smoke run is slower
        limit = max(10.0, min(timeout, self.left()))
        print(f"[{name}] {' '.join(cmd)}  (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        with log.open("w", encoding="utf-8") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            try:
                rc = subprocess.run(
                    cmd, cwd=cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, timeout=limit
                ).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"failed (timed out after {limit:.0f} s)"
        seconds = round(time.monotonic() - start, 1)
        self.steps.append({"step": name, "status": status, "seconds": seconds, "log": log.name})
        print(f"[{name}] {status} in {seconds} s", flush=True)
        if status != "ok":  # the end of the log, so a failure is visible in the console too
            print("".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:]), flush=True)
        return status == "ok"


def install_missing(check: Check) -> None:
    """pip-install the package (no deps) and missing light dependencies; never torch. Failures are reported only."""
    notes = []
    missing = [spec for mod, spec in LIGHT_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], capture_output=True, text=True)
        notes.append(f"pip install {' '.join(missing)}: {'ok' if r.returncode == 0 else r.stderr.strip()[-300:]}")
    if importlib.util.find_spec("kronos") is None:  # an installed kronos elsewhere is shadowed by PYTHONPATH=src
        r = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
            capture_output=True,
            text=True,
        )
        notes.append(
            "pip install -e . --no-deps: "
            + ("ok" if r.returncode == 0 else "failed, using PYTHONPATH=src (" + r.stderr.strip()[-200:] + ")")
        )
    (check.out / "install.log").write_text("\n".join(notes or ["nothing missing"]) + "\n", encoding="utf-8")
    print("[install]", "; ".join(notes) or "nothing missing", flush=True)


def environment(check: Check) -> int:
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append(
            {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        )
    (check.out / "env.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi], capture_output=True, text=True)
        (check.out / "nvidia-smi.txt").write_text(r.stdout + r.stderr, encoding="utf-8")
    print("[env]", json.dumps(info), flush=True)
    return len(info["gpus"])


def pipeline_config(work: Path, cpu: bool) -> Path:
    """The CSV pipeline on the bundled 5-minute K-lines (two symbols), tiny presets, fast mode."""
    import pandas as pd

    klines = work / "klines"
    klines.mkdir(parents=True, exist_ok=True)
    raw = pd.read_csv(ROOT / "tests" / "fixtures" / "kline_5min.csv")
    raw.to_csv(klines / "AAA.csv", index=False)
    other = raw.copy()
    for c in ("open", "high", "low", "close"):
        other[c] = other[c] * 1.5
    other.to_csv(klines / "BBB.csv", index=False)
    cfg = {
        "data_source": "csv",
        "csv_data_path": "klines",
        "split_ratios": [0.6, 0.2, 0.2],
        "test_time_range": ["2024-08-01", "2024-08-31"],
        "backtest_time_range": ["2024-08-15", "2024-08-31"],
        "dataset_path": "data/processed",
        "save_path": "outputs/models",
        "backtest_result_path": "outputs/backtest_results",
        "lookback_window": 30,
        "predict_window": 5,
        "epochs": 1,
        "batch_size": 8,
        "n_train_iter": 48,
        "n_val_iter": 16,
        "log_interval": 2,
        "pretrained_tokenizer_path": "",
        "pretrained_predictor_path": "",
        "tokenizer_preset": "tiny",
        "predictor_preset": "tiny",
        "tokenizer_learning_rate": 0.002,
        "predictor_learning_rate": 0.002,
        "inference_sample_count": 2,
        "eval_max_anchors": 8,
        "plot_n_symbols": 2,
        "backtest_n_symbol_hold": 1,
        "backtest_n_symbol_drop": 1,
        "backtest_hold_thresh": 1,
        "num_workers": 0,
        "device": "cpu" if cpu else "cuda",
    }
    path = work / "config.json"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summarise(check: Check) -> int:
    inference = _read_json(check.out / "inference.json") or {}
    training = _read_json(check.out / "training.json") or {}
    measured: dict[str, object] = {}
    pred = training.get("stages", {}).get("predictor", {})
    ratio = next((v for k, v in pred.items() if k.endswith("/ fp32")), None)
    measured["predictor bf16 / fp32 tokens/s"] = ratio
    row = next(
        (r for r in inference.get("rows", []) if (r["lookback"], r["pred_len"], r["batch"]) == (400, 100, 1)), None
    )
    measured["cached / uncached at 400/100, batch 1"] = row["speedup"] if row else None
    targets = {}
    for name, goal in TARGETS.items():
        got = measured[name]
        targets[name] = {"target": goal, "measured": got, "met": None if got is None else bool(got >= goal)}
    failed = [s for s in check.steps if s["status"].startswith("failed")]
    summary = {
        "device": "cpu (smoke run)" if check.cpu else "cuda",
        "seconds": round(time.monotonic() - check.t0, 1),
        "steps": check.steps,
        "targets": targets,
        "outputs_identical": inference.get("identical"),
        "ok": not failed,
    }
    (check.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# GPU check",
        "",
        f"device: {summary['device']}; total {summary['seconds']} s",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    lines += [
        f"| {s['step']} | {s['status']}{' (' + s['why'] + ')' if s.get('why') else ''} | {s['seconds']} |"
        for s in check.steps
    ]
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for name, t in targets.items():
        got = "n/a" if t["measured"] is None else f"{t['measured']:.2f}x"
        lines.append(f"| {name} | >= {t['target']}x | {got} | {t['met']} |")
    for name in ("inference.log", "training.log"):
        path = check.out / name
        if path.is_file():
            table = [
                ln
                for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if ln and not ln.startswith("$")
            ][-14:]
            lines += ["", f"## {name}", "", "```", *table, "```"]
    text = "\n".join(lines) + "\n"
    (check.out / "summary.md").write_text(text, encoding="utf-8")
    print("\n" + text, flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "gpu-check"),
        help="results folder (default $OUT, else ./gpu-check/)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="smoke run without a GPU: CUDA-only parts skipped, benchmarks shrunk"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.cpu)
    py = sys.executable
    install_missing(check)
    n_gpus = environment(check)
    if not args.cpu and n_gpus == 0:
        print("no CUDA device visible to this python3; run with --cpu for a smoke run", file=sys.stderr)
        return 2
    dev = "cpu" if args.cpu else "cuda"

    check.run(
        "gpu-tests",
        [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu or not slow",
            "tests/gpu",
            "tests/model/test_numerics.py",
            "tests/train/test_numerics.py",
            f"--junitxml={out / 'gpu-tests.xml'}",
        ],
        timeout=100,
    )
    if args.cpu:
        inference = ["--cases", "32/4", "--batch-sizes", "1", "2"]
        training = ["--stages", "tokenizer", "--batch", "2", "--steps", "1", "--warmup", "1", "--rounds", "1"]
    else:
        inference = ["--cases", "400/100", "--batch-sizes", "1", "8", "64"]
        training = ["--batch", "50", "--steps", "5", "--warmup", "3", "--rounds", "2", "--compile"]
    check.run(
        "inference",
        [
            py,
            "benchmarks/inference.py",
            "--device",
            dev,
            "--no-samples",
            *inference,
            "--json",
            str(out / "inference.json"),
        ],
        timeout=80,
    )
    check.run(
        "training",
        [py, "benchmarks/training.py", "--device", dev, *training, "--json", str(out / "training.json")],
        timeout=140,
    )
    with tempfile.TemporaryDirectory(prefix="kronos-gpu-check-") as tmp:
        work = Path(tmp)
        cfg = pipeline_config(work, args.cpu)
        pipe = [
            py,
            str(ROOT / "finetune" / "train_complete_pipeline.py"),
            "--fast-mode",
            "--data-source",
            "csv",
            "--config-path",
            str(cfg),
        ] + (["--cpu"] if args.cpu else [])
        if check.run("pipeline", pipe, timeout=100, cwd=work):
            for found in work.glob("outputs/backtest_results/*/pipeline_result.json"):
                shutil.copy(found, out / "pipeline_result.json")
        nproc = 2 if args.cpu else n_gpus
        runner = [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "finetune" / "train_tokenizer.py"),
            "--config-path",
            str(cfg),
        ]
        skip = "" if (work / "data" / "processed").exists() else "no dataset (the pipeline step failed)"
        if check.run("torchrun", runner + (["--cpu"] if args.cpu else []), timeout=60, cwd=work, skip=skip):
            for found in work.glob("outputs/models/*/summary.json"):
                shutil.copy(found, out / "torchrun_summary.json")
    return summarise(check)


if __name__ == "__main__":
    sys.exit(main())
