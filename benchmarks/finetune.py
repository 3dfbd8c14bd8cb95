"""Does finetuning the starter help? Zero-shot vs full / freeze / lora, on the demo data and on held-out stocks.

Each mode runs the real pipeline (``kronos pipeline --cpu --fast-mode``, backtest skipped) in its own process from
the demo config: the starter pair (examples/models/starter) is the starting point, the tokenizer is kept
(``finetune_tokenizer`` false) and only ``finetune_mode`` changes. The held-out set is a Qlib folder cut from
``--source`` with stocks the demo does not hold (same dates as the demo). Printed per data set and mode: trainable
parameters, peak resident memory of the process, seconds per optimizer step, causal validation loss (start and
finetuned), test CRPS / last close raw and calibrated, each over the random walk's (exact formula), and the
Diebold-Mariano p-value of the finetuned vs the zero-shot model (per-date calibrated CRPS). All figures of one table
come from this one invocation.

    python benchmarks/finetune.py                       # demo + held-out, modes full freeze lora
    python benchmarks/finetune.py --datasets demo --modes lora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "configs" / "demo.json"
CHILD = (
    "import json, resource, sys\n"
    "from kronos.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('BENCH ' + json.dumps({'rc': rc, 'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
)


def heldout_folder(source: Path, work: Path) -> Path:
    """A Qlib folder of stocks the demo does not hold (2018 on, 40 stocks + the two indices), cut once."""
    out = work / "heldout_qlib"
    if not (out / "calendars" / "day.txt").is_file():
        if not (source / "calendars").is_dir():
            sys.exit(
                f"error: --source '{source}' is not a Qlib folder; pass the full A-share folder "
                "(e.g. ../shared/data/qlib_cn_2010_2024) to cut the held-out set from"
            )
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "cut_qlib_sample.py"),
                str(source),
                str(out),
                "--start",
                "2018-01-01",
                "--symbols",
                "40",
                "--exclude-folder",
                str(REPO / "examples" / "data" / "qlib_cn_demo"),
            ],
            check=True,
        )
    return out


def run_mode(config: Path, mode: str, out: Path, qlib: Path | None, extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    sets = {
        "finetune_mode": mode,
        "run_folders": False,
        "save_path": str(out / "models"),
        "backtest_result_path": str(out / "results"),
        "dataset_path": str(out / "dataset"),
    }
    if qlib is not None:
        sets["qlib_data_path"] = str(qlib)
    argv = ["pipeline", "--cpu", "--fast-mode", "-q", "--skip-backtest", "--config-path", str(config)]
    for k, v in sets.items():
        argv += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    argv += extra
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"error: the {mode} run failed:\n{proc.stderr[-3000:]}")
    row = json.loads(line[6:])
    row["wall_s"] = round(time.time() - t0, 1)
    results = out / "results" / "finetune_backtest_demo"
    report = json.loads((results / "report.json").read_text())
    summary = json.loads((out / "models" / "finetune_predictor_demo" / "summary.json").read_text())
    selection = json.loads(
        (out / "models" / "finetune_predictor_demo" / "checkpoints" / "model_selection.json").read_text()
    )
    row.update(report=report, summary=summary, selection=selection)
    return row


def fmt(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="*", default=["demo", "heldout"], choices=["demo", "heldout"])
    ap.add_argument("--modes", nargs="*", default=["full", "freeze", "lora"], choices=["full", "freeze", "lora"])
    ap.add_argument("--config", default=str(DEMO), help="base config (default: the demo's)")
    ap.add_argument(
        "--source",
        default=str(REPO.parent / "shared" / "data" / "qlib_cn_2010_2024"),
        help="full Qlib folder the held-out stocks are cut from",
    )
    ap.add_argument("--work", default=str(REPO / "outputs" / "bench_finetune"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = ap.parse_args()
    work = Path(args.work)
    extra = [x for kv in args.set for x in ("--set", kv)]
    tables = []
    for ds in args.datasets:
        qlib = heldout_folder(Path(args.source), work) if ds == "heldout" else None
        rows = {}
        for mode in args.modes:
            print(f"[{ds}] {mode} ...", flush=True)
            rows[mode] = run_mode(Path(args.config), mode, work / ds / mode, qlib, extra)
        first = next(iter(rows.values()))
        f = first["report"]["forecasters"]
        rw = f["random_walk"]["overall"]["crps_rel"]
        zs = f.get("zero_shot", {}).get("overall", {})
        a = first["report"]["anchors"]
        lines = [
            f"### {ds}: {a['n_forecasts']} test forecasts at {a['n_dates']} dates ({a['first'][:10]} .. "
            f"{a['last'][:10]}), {a['n_symbols']} symbols; random walk CRPS/last close {rw:.4f}",
            "",
            "| model | trainable params | peak RSS MB | s/step | val loss start → best | test CRPS rel (× RW) | "
            "calibrated CRPS rel (× RW) | DM p vs zero-shot | in use |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines.append(
            f"| zero-shot (starter) | 0 | – | – | – | {fmt(zs.get('crps_rel'))} "
            f"({fmt(zs.get('crps_rel', 0) / rw, 3)}) | {fmt(zs.get('crps_rel_calibrated'))} "
            f"({fmt((zs.get('crps_rel_calibrated') or 0) / rw, 3)}) | – | |"
        )
        for mode, r in rows.items():
            o = r["report"]["forecasters"]["finetuned"]["overall"]
            s = r["summary"]
            dm = r["report"].get("dm_finetuned_vs_zero_shot") or {}
            lines.append(
                f"| {mode} | {s.get('trainable_parameters'):,} | {r['maxrss_mb']:.0f} | "
                f"{fmt(s.get('seconds_per_step'), 3)}"
                f" | {fmt(s.get('start_val_loss'))} → {fmt(s.get('best_val_loss'))} | {fmt(o.get('crps_rel'))} "
                f"({fmt(o['crps_rel'] / rw, 3)}) | {fmt(o.get('crps_rel_calibrated'))} "
                f"({fmt((o.get('crps_rel_calibrated') or 0) / rw, 3)}) | {fmt(dm.get('p_value'), 3)} | "
                f"{r['selection'].get('model_in_use')} |"
            )
        lines.append("")
        lines.append("Wall seconds per pipeline run: " + ", ".join(f"{m} {r['wall_s']}" for m, r in rows.items()))
        tables.append("\n".join(lines))
        print(tables[-1], flush=True)
    (work / "finetune_table.md").write_text("\n\n".join(tables) + "\n")
    print(f"\ntables written to {work / 'finetune_table.md'}")


if __name__ == "__main__":
    main()
