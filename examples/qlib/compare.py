"""Run the Qlib workflows of this folder with ``qrun`` and print one table: Kronos starter (zero-shot), Kronos finetuned
and Qlib's Alpha158 + LightGBM on the same data, segments, strategy and costs.

    python examples/qlib/compare.py                        # from the repository root; a few minutes on 2 CPU cores
    python examples/qlib/compare.py --data /path/to/qlib_data --market csi300 --benchmark SH000300
    python examples/qlib/compare.py --table-only           # the table of the latest runs already recorded

The runs go to Qlib's recorder (mlflow) under ``--mlruns`` (default ``outputs/qlib_mlruns``, git-ignored); the
table reads the metrics Qlib logged there (SigAnaRecord: IC, ICIR, Rank IC; PortAnaRecord: the excess return with
cost, annualised, and its max drawdown).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# (label, experiment name, workflow file, extra environment)
RUNS = [
    ("Kronos starter (zero-shot)", "kronos_zero_shot", "workflow_config_kronos.yaml", {"KRONOS_QLIB_FIT": "false"}),
    ("Kronos finetuned", "kronos_finetuned", "workflow_config_kronos.yaml", {"KRONOS_QLIB_FIT": "true"}),
    ("Alpha158 + LightGBM", "lightgbm_alpha158", "workflow_config_lightgbm_alpha158.yaml", {}),
]
COLUMNS = [
    ("IC", "IC"),
    ("ICIR", "ICIR"),
    ("Rank IC", "Rank IC"),
    ("ann. excess return (with cost)", "1day.excess_return_with_cost.annualized_return"),
    ("max drawdown (excess, with cost)", "1day.excess_return_with_cost.max_drawdown"),
]


def run_workflow(workflow: Path, experiment: str, env: dict, mlruns: str) -> float:
    qrun = Path(sys.executable).parent / "qrun"
    cmd = [str(qrun) if qrun.exists() else "qrun", str(workflow), "--uri_folder", mlruns]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env={**env, "KRONOS_QLIB_EXPERIMENT": experiment}, text=True,
                         capture_output=True)  # fmt: skip
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"qrun {workflow.name} ({experiment}) failed with exit code {out.returncode}")
    return time.perf_counter() - t0


def remove_stray_lock(mlruns: Path) -> None:
    """Qlib 0.9.x takes its experiment lock at the recorder's absolute path read as a path relative to the working
    directory (``<repo>/work/main/outputs/qlib_mlruns/filelock`` here); remove that empty file and its empty folders."""
    absolute = mlruns.resolve()
    stray = REPO / absolute.relative_to(absolute.anchor) / "filelock"
    if stray == absolute / "filelock" or not stray.is_file() or stray.stat().st_size:
        return
    stray.unlink()
    folder = stray.parent
    while folder != REPO and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def latest_metrics(mlruns: Path, experiment: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns.resolve().as_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return dict(runs[0].data.metrics) if runs else {}


def table(rows: list[tuple[str, dict[str, float], float | None]]) -> str:
    head = "| model | " + " | ".join(c for c, _ in COLUMNS) + " | qrun time |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for label, metrics, seconds in rows:
        cells = []
        for _, key in COLUMNS:
            value = metrics.get(key)
            cells.append("n/a" if value is None else f"{value:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.0f} s'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="Qlib data folder (default: the bundled examples/data/qlib_cn_demo)")
    ap.add_argument("--market", default="", help="instrument pool (default csi300)")
    ap.add_argument("--benchmark", default="", help="benchmark index (default SH000300)")
    ap.add_argument("--mlruns", default="outputs/qlib_mlruns", help="Qlib recorder folder, relative to the repo root")
    ap.add_argument("--table-only", action="store_true", help="print the table of the latest recorded runs")
    args = ap.parse_args(argv)

    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}  # mlflow's file store, which Qlib's recorder uses
    for key, value in (("KRONOS_QLIB_DATA", args.data), ("KRONOS_QLIB_MARKET", args.market),
                       ("KRONOS_QLIB_BENCHMARK", args.benchmark)):  # fmt: skip
        if value:
            env[key] = str(Path(value).expanduser().resolve()) if key == "KRONOS_QLIB_DATA" else value
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    rows = []
    for label, experiment, workflow, extra in RUNS:
        seconds = None
        if not args.table_only:
            print(f"running {label}: qrun {workflow} ...", flush=True)
            seconds = run_workflow(HERE / workflow, experiment, {**env, **extra}, args.mlruns)
            remove_stray_lock(REPO / args.mlruns)
        rows.append((label, latest_metrics(REPO / args.mlruns, experiment), seconds))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
