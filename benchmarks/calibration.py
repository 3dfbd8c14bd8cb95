"""Do calibrated bands hold their nominal coverage on data the model and the calibration never saw?

Loads K-lines through the package's own data sources (a Qlib folder, or CSV/Parquet files such as index
histories), forecasts rolling anchors with a trained predictor, fits the calibration on the validation anchors
(every target before ``--test-start``) and scores every method on the test anchors (every target after it): coverage
of the 50% and 80% bands, mean relative width and quantile-CRPS, raw beside calibrated. Prints one table per data
set and a summary; ``--out FILE`` also writes the figures as JSON.

    python benchmarks/calibration.py --run outputs/runs/latest --qlib ../shared/data/qlib_cn_2010_2024 \\
        --instrument all --begin 2022-01-01 --val-start 2023-01-01 --test-start 2024-01-01 --end 2024-12-31
    python benchmarks/calibration.py --run outputs/runs/latest --csv spx.csv ndx.csv --test-fraction 0.5

Anchors every ``--stride`` bars; ``--max-symbols`` keeps the run short.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kronos.config import Config
from kronos.data.processing import clean_kline_frame
from kronos.data.sources import DataProcessorFactory
from kronos.evaluate.calibration import METHODS, candidate, fit_calibration, fit_session_profile
from kronos.evaluate.metrics import naive_scale
from kronos.evaluate.report import relative_quantile_crps
from kronos.evaluate.rolling import contexts, select_anchors
from kronos.inference import KronosPredictor, SamplingConfig
from kronos.inference.bands import recent_volatility
from kronos.inference.outcomes import BandOutcomes, target_times


def load_frame(args) -> pd.DataFrame:
    """The long frame (symbol, timestamps, OHLCV) of the data set the arguments name."""
    if args.qlib:
        cfg = Config.from_dict(
            {
                "data_source": "qlib",
                "qlib_data_path": args.qlib,
                "instrument": args.instrument,
                "dataset_begin_time": args.begin,
                "dataset_end_time": args.end,
            }
        )
        raw = DataProcessorFactory.create_processor("qlib", cfg).load_raw()
    else:
        raw = {}
        for path in args.csv:
            cfg = Config.from_dict({"data_source": "csv", "csv_data_path": path})
            raw.update(DataProcessorFactory.create_processor("csv", cfg).load_raw())
    frames = []
    skip = set()
    if args.exclude_folder:
        skip = {p.name.upper() for p in (Path(args.exclude_folder) / "features").iterdir()}
    for sym in [s for s in sorted(raw) if s.upper() not in skip][: args.max_symbols or None]:
        df = raw[sym].copy()
        if "timestamps" not in df.columns:
            df = df.reset_index().rename(columns={df.index.name or "index": "timestamps"})
        df["timestamps"] = pd.to_datetime(df["timestamps"])
        if args.begin:
            df = df[df["timestamps"] >= pd.Timestamp(args.begin)]
        if args.end:
            df = df[df["timestamps"] <= pd.Timestamp(args.end)]
        df, _ = clean_kline_frame(df, sym)  # the data step's cleaning: bad bars, duplicates, missing amount
        df.insert(0, "symbol", sym)
        frames.append(df)
    if not frames:
        raise SystemExit("error: no series loaded; check --qlib/--instrument or --csv")
    return pd.concat(frames, ignore_index=True).sort_values(["symbol", "timestamps"]).reset_index(drop=True)


def split_dates(frame: pd.DataFrame, args) -> tuple[pd.Timestamp, pd.Timestamp]:
    """(first validation target after, last validation target) from the arguments; dates shared by all symbols."""
    dates = np.sort(frame["timestamps"].unique())
    if args.test_start:
        test_start = pd.Timestamp(args.test_start)
    else:
        test_start = pd.Timestamp(dates[int(len(dates) * (1 - args.test_fraction))])
    val_end = pd.Timestamp(dates[np.searchsorted(dates, np.datetime64(test_start)) - 1])
    if args.val_start:
        val_start = pd.Timestamp(args.val_start)
    else:
        before = dates[dates <= np.datetime64(val_end)]
        val_start = pd.Timestamp(before[int(len(before) * (1 - args.val_fraction))])
    return val_start, val_end


def forecasts(pred, frame, anchors, L, P, args):
    ctx_close, true = contexts(frame, anchors, L, P)
    pairs = list(zip(anchors["symbol"], anchors["anchor"]))
    sampling = SamplingConfig(T=args.T, top_k=0, top_p=args.top_p, sample_count=args.samples, seed=args.seed)
    out = pred.predict_df_paths(
        frame,
        pred_len=P,
        lookback=L,
        quantiles=[0.5],
        anchors=pairs,
        sampling=sampling,
        batch_size=max(1, 256 // args.samples),
        progress=True,
    )
    return np.asarray(out.samples, dtype=float)[:, :, :, 3], ctx_close, true


def score(cal, samples, ctx, true, levels, anchors=None):
    last = ctx[:, -1]
    vol = recent_volatility(ctx)
    qs = cal.quantile_levels()
    qv = cal.quantiles(samples, last, qs, vol, anchors=anchors)
    row = {"crps_q": relative_quantile_crps(qv, qs, true, last)}
    tercile = np.digitize(vol, np.quantile(vol, [1 / 3, 2 / 3]))
    for lv in levels:
        lo, hi = qv[qs.index(round((1 - lv) / 2, 10))], qv[qs.index(round((1 + lv) / 2, 10))]
        inside = (true >= lo) & (true <= hi)
        row[f"coverage_{lv:g}"] = float(inside.mean())
        row[f"coverage_{lv:g}_by_vol_tercile"] = [float(inside[tercile == t].mean()) for t in range(3)]
        row[f"width_{lv:g}"] = float(np.mean((hi - lo) / last[:, None]))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a pipeline run folder (its models/*/checkpoints/best_model)")
    ap.add_argument("--tokenizer", help="tokenizer folder or hub id (instead of --run)")
    ap.add_argument("--predictor", help="predictor folder or hub id (instead of --run)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--qlib", help="a Qlib provider folder")
    src.add_argument("--csv", nargs="+", help="CSV/Parquet files (one symbol each, or long files)")
    ap.add_argument("--instrument", default="all")
    ap.add_argument("--begin", default="")
    ap.add_argument("--end", default="")
    ap.add_argument("--val-start", default="", help="first anchor date of validation (default: --val-fraction)")
    ap.add_argument("--test-start", default="", help="first test target date (default: --test-fraction)")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--val-fraction", type=float, default=0.3, help="of the bars before the test split")
    ap.add_argument("--lookback", type=int, default=90)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--stride", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--T", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-symbols", type=int, default=0)
    ap.add_argument("--exclude-folder", help="leave out the symbols of this Qlib folder (e.g. the training data)")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--half-life", type=int, default=60, help="adaptive bands: bars (0: static only)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)

    if args.run:
        models = Path(args.run) / "models"
        tok = next(models.glob("*tokenizer*/checkpoints/best_model"), None)
        mod = next(models.glob("*predictor*/checkpoints/best_model"), None)
        if tok is None or mod is None:
            raise SystemExit(f"error: no tokenizer/predictor best_model under {models}")
    else:
        tok, mod = args.tokenizer, args.predictor
    pred = KronosPredictor.from_pretrained(str(tok), str(mod), device="cpu", max_context=512)
    frame = load_frame(args)
    L, P = args.lookback, args.horizon
    val_start, val_end = split_dates(frame, args)
    first_val = frame["timestamps"][frame["timestamps"] >= val_start].min()
    val_anchors = select_anchors(frame, first_val - pd.Timedelta(1, "ns"), val_end, L, P, args.stride)
    val_anchors = val_anchors[val_anchors["anchor"] >= val_start].reset_index(drop=True)
    test_anchors = select_anchors(frame, val_end, None, L, P, args.stride)
    print(
        f"{frame['symbol'].nunique()} series; validation anchors {len(val_anchors)} "
        f"({val_start.date()} .. targets to {val_end.date()}), test anchors {len(test_anchors)}",
        flush=True,
    )
    if len(val_anchors) < 10 or test_anchors.empty:
        raise SystemExit("error: too few anchors; lengthen the splits or lower --stride/--lookback")

    t0 = time.time()
    vs, vctx, vtrue = forecasts(pred, frame, val_anchors, L, P, args)
    ts, tctx, ttrue = forecasts(pred, frame, test_anchors, L, P, args)
    t_forecast = time.time() - t0
    cal = fit_calibration(
        vs,
        vctx[:, -1],
        vtrue,
        val_anchors["anchor"].to_numpy(),
        args.levels,
        L,
        "benchmark",
        context_vol=recent_volatility(vctx),
        session=fit_session_profile(frame, val_end),  # intraday bars: the profile of bars up to validation's end
    )
    t_anchor = test_anchors["anchor"].to_numpy()
    rows = {m: score(candidate(cal, m), ts, tctx, ttrue, args.levels, t_anchor) for m in ["none", *cal.alternatives]}
    if cal.method == "vol_scaled" and args.half_life > 0:
        # adaptive: at each test anchor, the validation and test outcomes realised on or before it (never later)
        calendar = frame["timestamps"].unique()
        pool = BandOutcomes.from_forecasts(
            cal, vs, vctx[:, -1], vtrue, recent_volatility(vctx), target_times(frame, val_anchors, P), calendar,
            args.half_life, anchors=val_anchors["anchor"].to_numpy(),
        ).concat(BandOutcomes.from_forecasts(
            cal, ts, tctx[:, -1], ttrue, recent_volatility(tctx), target_times(frame, test_anchors, P), calendar,
            args.half_life, anchors=test_anchors["anchor"].to_numpy(),
        ))  # fmt: skip
        rows["vol_scaled_adaptive"] = score(cal.with_outcomes(pool), ts, tctx, ttrue, args.levels, t_anchor)
    header = (
        "| method | "
        + " | ".join(f"cov {lv:.0%} | by vol tercile {lv:.0%} | width {lv:.0%}" for lv in args.levels)
        + " | CRPS q |"
    )
    print("\n" + header + "\n|" + "---|" * (3 * len(args.levels) + 2))
    for m in ["none", *[m for m in METHODS if m in rows and m != "none"], "vol_scaled_adaptive"]:
        if m not in rows:
            continue
        r = rows[m]
        name = "raw (none)" if m == "none" else m + (" (static)" if m == cal.method else "")
        cells = [
            f"{r[f'coverage_{lv:g}']:.3f} | "
            + " / ".join(f"{v:.3f}" for v in r[f"coverage_{lv:g}_by_vol_tercile"])
            + f" | {r[f'width_{lv:g}']:.4f}"
            for lv in args.levels
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {r['crps_q']:.4f} |")
    print(
        f"\nforecasts {t_forecast:.1f} s ({len(val_anchors) + len(test_anchors)} x {args.samples} paths); "
        f"fitting {cal.seconds:.2f} s; naive scale {np.nanmean(naive_scale(tctx)):.4f}"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "n_val": len(val_anchors),
                    "n_test": len(test_anchors),
                    "method": cal.method,
                    "val_end": str(val_end),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
