"""Run the Qlib workflows of this folder with ``qrun`` and print one table: Kronos starter (zero-shot), Kronos finetuned
and Qlib's Alpha158 + LightGBM on the same data, segments, strategy and costs.

    python examples/qlib/compare.py                        # from the repository root; a few minutes on 2 CPU cores
    python examples/qlib/compare.py --data /path/to/qlib_data --market csi300 --benchmark SH000300
    python examples/qlib/compare.py --table-only           # the table of the latest runs already recorded

The runs go to Qlib's recorder (mlflow) at ``--mlruns`` (default ``sqlite:///outputs/qlib_mlruns.db``; artifacts
in ``./mlruns/``; both git-ignored); the table reads the metrics Qlib logged there (SigAnaRecord: IC, ICIR, Rank IC;
PortAnaRecord: the excess return with cost, annualised, and its max drawdown).
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


def run_workflow(workflow: Path, experiment: str, env: dict) -> float:
    qrun = Path(sys.executable).parent / "qrun"
    cmd = [str(qrun) if qrun.exists() else "qrun", str(workflow)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env={**env, "KRONOS_QLIB_EXPERIMENT": experiment}, text=True,
                         capture_output=True)  # fmt: skip
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"qrun {workflow.name} ({experiment}) failed with exit code {out.returncode}")
    return time.perf_counter() - t0


def latest_metrics(uri: str, experiment: str) -> dict[str, float]:
    """The metrics of the experiment's latest run in Qlib's recorder (an mlflow tracking URI)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
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
    ap.add_argument(
        "--mlruns",
        default="sqlite:///outputs/qlib_mlruns.db",
        help="Qlib's recorder (an mlflow tracking URI; a relative sqlite path is under the repo root)",
    )
    ap.add_argument("--table-only", action="store_true", help="print the table of the latest recorded runs")
    args = ap.parse_args(argv)

    uri = args.mlruns
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: under the repo root
        db = REPO / uri[len("sqlite:///") :]
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = "sqlite:///" + str(db)
    env = {**os.environ, "KRONOS_QLIB_MLRUNS": uri}
    for key, value in (("KRONOS_QLIB_DATA", args.data), ("KRONOS_QLIB_MARKET", args.market),
                       ("KRONOS_QLIB_BENCHMARK", args.benchmark)):  # fmt: skip
        if value:
            env[key] = str(Path(value).expanduser().resolve()) if key == "KRONOS_QLIB_DATA" else value
    rows = []
    for label, experiment, workflow, extra in RUNS:
        seconds = None
        if not args.table_only:
            print(f"running {label}: qrun {workflow} ...", flush=True)
            seconds = run_workflow(HERE / workflow, experiment, {**env, **extra})
        rows.append((label, latest_metrics(uri, experiment), seconds))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
