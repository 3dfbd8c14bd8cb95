"""Walk-forward report: the model beside simple baselines on the same test anchors.

Anchors are bars whose whole forecast horizon lies after the last validation bar and within the test split (their
context may reach back into earlier splits), every ``eval_stride`` anchor dates, at most ``eval_max_anchors`` dates
spread over the split. At each anchor the finetuned predictor and, when a pretrained predictor is configured, the
zero-shot starting model sample
paths (repeated over ``eval_seeds``); the baselines of :mod:`kronos.evaluate.baselines` forecast from the same
context. :func:`kronos.evaluate.metrics.score_paths` scores each; a calibration (``calibration.json``) is applied
to the finetuned model's bands and P(up) and reported beside the raw figures.

Outputs in ``out_dir``: ``report.json`` (everything), ``report.md`` (the table a person reads), and the PNGs
``error_by_horizon.png``, ``pit_histogram.png``, ``coverage_by_horizon.png``, ``reliability.png``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kronos import io as kio
from kronos.config import Config
from kronos.evaluate.baselines import baseline_forecasts
from kronos.evaluate.calibration import Calibration, calibrated_crps, candidate
from kronos.evaluate.metrics import (
    PathForecasts,
    coverage_interval,
    crps_samples,
    dates_per_horizon,
    dm_by_date,
    dm_versus,
    nanmean,
    pinball_loss,
    score_paths,
)
from kronos.evaluate.plots import save_figure
from kronos.evaluate.rolling import SplitForecasts

log = logging.getLogger(__name__)

HEADLINE = (
    "mse_ret",
    "mae_ret",
    "mase",
    "direction_accuracy",
    "ic",
    "rank_ic",
    "crps_rel",
    "wql",
    "coverage_0.5",
    "coverage_0.8",
    "width_0.8",
    "brier_up",
    "vol_corr",
)


# ---------------------------------------------------------------------- scoring helpers
def _seed_summary(runs: list[dict]) -> dict:
    """Mean and spread (sample std; 0 with one seed) of each overall metric over seeds; by-step means."""
    keys = runs[0]["overall"].keys()
    mean = {
        k: float(nanmean(np.array([r["overall"][k] for r in runs])))
        if any(np.isfinite(r["overall"][k]) for r in runs)
        else float("nan")
        for k in keys
    }
    std = {k: float(np.nanstd([r["overall"][k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in keys}
    by_step = {
        k: [float(v) for v in nanmean(np.array([r["by_step"][k] for r in runs], dtype=float), axis=0)]
        for k in runs[0]["by_step"]
    }
    pit = [int(v) for v in np.sum([r["pit"] for r in runs], axis=0)]
    return {"overall": mean, "overall_std": std, "by_step": by_step, "pit": pit, "n_seeds": len(runs)}


def relative_quantile_crps(qv: np.ndarray, qs: Sequence[float], y: np.ndarray, last: np.ndarray) -> float:
    """2 * mean pinball over the quantile set, relative to last close (a quantile approximation of CRPS)."""
    losses = [pinball_loss(y, v, q) / last[:, None] for q, v in zip(qs, qv)]
    return float(2.0 * np.nanmean(losses))


def calibration_comparison(fc: PathForecasts, cal: Any, block: int = 1) -> dict:
    """Raw vs calibrated coverage (with its interval, ``block`` dates per horizon), width, quantile-CRPS (and P(up)
    Brier, reliability bins) of one forecaster."""
    raw = Calibration(
        method="none", levels=cal.levels, horizon=cal.horizon, lookback=cal.lookback, fingerprint=cal.fingerprint
    )
    y, last = fc.true, fc.last_close
    qs = cal.quantile_levels()
    out: dict[str, Any] = {"method": cal.method, "levels": cal.levels, "quantiles": qs}
    # volatility regimes: terciles of each forecast's recent volatility at its anchor (its context's last bars)
    vol = np.asarray(fc.vol if fc.vol is not None else np.zeros(len(last)), dtype=float)
    edges = [float(v) for v in np.quantile(vol, [1 / 3, 2 / 3])] if len(vol) else [float("nan")] * 2
    tercile = np.digitize(vol, edges) if len(vol) else np.zeros(0, int)
    out["vol_tercile_edges"] = edges
    out["adaptive"] = _adaptive_info(cal, fc.anchor, fc.vol)
    for tag, c in (("raw", raw), ("calibrated", cal)):
        qv = c.quantiles(fc.samples, last, qs, fc.vol, anchors=fc.anchor)
        row: dict[str, Any] = {"crps_q": relative_quantile_crps(qv, qs, y, last)}
        for lv in cal.levels:
            lo, hi = qv[qs.index(round((1 - lv) / 2, 10))], qv[qs.index(round((1 + lv) / 2, 10))]
            inside = (y >= lo) & (y <= hi)
            row[f"coverage_{lv:g}"] = float(inside.mean())
            row[f"coverage_{lv:g}_ci"] = coverage_interval(inside, fc.anchor, block)
            row[f"coverage_{lv:g}_by_step"] = [float(v) for v in inside.mean(axis=0)]
            row[f"coverage_{lv:g}_by_step_ci"] = [
                coverage_interval(inside[:, k : k + 1], fc.anchor, block) for k in range(inside.shape[1])
            ]
            row[f"coverage_{lv:g}_by_vol_tercile"] = [
                float(inside[tercile == t].mean()) if (tercile == t).any() else float("nan") for t in range(3)
            ]
            row[f"coverage_{lv:g}_by_vol_tercile_ci"] = [
                coverage_interval(inside[tercile == t], fc.anchor[tercile == t], block)
                if (tercile == t).any()
                else [float("nan"), float("nan")]
                for t in range(3)
            ]
            row[f"width_{lv:g}"] = float(np.mean((hi - lo) / last[:, None]))
        p = c.p_up_raw(fc.samples, last) if tag == "raw" else cal.p_up_calibrated(fc.samples, last)
        moved = y != last[:, None]
        up = (y > last[:, None]).astype(float)
        row["brier_up"] = float(np.mean((p[moved] - up[moved]) ** 2)) if moved.any() else float("nan")
        row["reliability"] = _reliability(p[moved], up[moved])
        out[tag] = row
    # every candidate method on the test anchors (parameters fitted on all validation anchors): the evidence
    # (static: fitted once on validation; the adaptive correction of the calibrated row is shown as its own row)
    out["candidates"] = {}
    names = ["none", *cal.alternatives] + (["vol_scaled_adaptive"] if cal.outcomes is not None else [])
    for method in names:
        c = cal if method == "vol_scaled_adaptive" else candidate(cal.static(), method)
        row = {}
        for lv in cal.levels:
            lo, hi = c.quantiles(fc.samples, last, [(1 - lv) / 2, (1 + lv) / 2], fc.vol, anchors=fc.anchor)
            row[f"coverage_{lv:g}"] = float(((y >= lo) & (y <= hi)).mean())
            row[f"width_{lv:g}"] = float(np.mean((hi - lo) / last[:, None]))
        out["candidates"][method] = row
    moved = y != last[:, None]
    rate = float((y > last[:, None])[moved].mean()) if moved.any() else float("nan")
    out["up_rate"] = rate
    out["brier_base_rate"] = rate * (1 - rate)
    return out


def _adaptive_info(cal: Any, anchors: np.ndarray, vol: np.ndarray | None) -> dict | None:
    """What the adaptive correction did at the test anchors: outcomes, half-life, the multipliers' range per level
    (None: static bands)."""
    pool = cal.outcomes
    if pool is None:
        return None
    mult = cal.multipliers(anchors, len(anchors), vol, cal.levels) or {}  # the ones the bands used
    out = {
        "half_life_bars": pool.half_life,
        "n_outcomes": len(pool),
        "last_outcome": str(pd.Timestamp(pool.target.max())) if len(pool) else None,
        "multiplier": {
            k: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
            for k, v in mult.items()
            if len(v)
        },
    }
    cuts = cal.params.get("vol_cuts") if cal.method == "vol_scaled" else None
    if cuts is not None and vol is not None and pool.anchor is not None and len(anchors):
        # each volatility regime's running factor at the last test anchor (low / mid / high)
        last = np.repeat(np.asarray(anchors).max(), 3)
        probe = np.array([cuts[0] / 2.0, (cuts[0] + cuts[1]) / 2.0, cuts[1] * 2.0])
        factors = pool.regime_factors(last, probe, cuts, [f"{lv:g}" for lv in cal.levels])
        out["regime_factor"] = {k: [float(x) for x in v] for k, v in factors.items()}
    return out


def _reliability(p: np.ndarray, up: np.ndarray, bins: int = 10) -> dict:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    mean_p, freq, count = [], [], []
    for b in range(bins):
        m = idx == b
        count.append(int(m.sum()))
        mean_p.append(float(p[m].mean()) if m.any() else float("nan"))
        freq.append(float(up[m].mean()) if m.any() else float("nan"))
    return {"mean_p": mean_p, "observed": freq, "count": count}


# ---------------------------------------------------------------------- the report
def build_report(
    cfg: Config,
    frame: pd.DataFrame,
    bounds: dict,
    forecasts: SplitForecasts,
    out_dir: str,
    calibrations: dict | None = None,
    skipped: dict | None = None,
    in_use: str = "finetuned",
    starting_cutoff: dict | None = None,
    selection: dict | None = None,
) -> dict:
    """Score the models of the test pass ``forecasts`` (:func:`kronos.evaluate.rolling.forecast_split`) and the
    baselines on the same anchors; write the outputs.

    ``calibrations`` ({name: Calibration or None}): each model's own calibration, fitted on validation, applied to
    its bands; ``in_use``: the model the run's forecasts use; ``starting_cutoff`` ({"data_end", "source"}): the last
    bar the zero-shot model saw (a zero-shot row whose test targets fall on or before it is in-sample);
    ``selection``: the run's model_selection.json (shown in the report).
    """
    t0 = time.time()
    ev = cfg.eval
    L, P = ev.lookback, ev.horizon
    anchors, ctx_close, true = forecasts.anchors, forecasts.ctx_close, forecasts.true
    seeds = forecasts.seeds
    models = forecasts.paths
    quantiles = list(ev.quantiles)
    levels = list(ev.levels)
    symbols, dates = anchors["symbol"].to_numpy(), anchors["anchor"].to_numpy()
    calibrations = {k: v for k, v in (calibrations or {}).items() if v is not None and k in models}
    report: dict[str, Any] = {
        "anchors": {
            "n_forecasts": int(len(anchors)),
            "n_dates": int(anchors["anchor"].nunique()),
            "n_symbols": int(anchors["symbol"].nunique()),
            "first": str(anchors["anchor"].min()),
            "last": str(anchors["anchor"].max()),
            "eval_stride": ev.stride,
            "eval_max_anchors": ev.max_anchors,
        },
        "splits": {k: str(v) for k, v in bounds.items()},
        "seeds": seeds,
        "quantiles": quantiles,
        "levels": levels,
        "lookback_window": L,
        "predict_window": P,
        "sample_count": int(cfg.inference_sample_count),
        "forecasters": {},
        "skipped": dict(skipped or {}),
        "crps_estimator": CRPS_ESTIMATOR,
        "model_in_use": in_use if in_use in models else None,
        "model_selection": selection or None,
        "warnings": [],
    }
    base = baseline_forecasts(ctx_close, true, symbols, dates, n_samples=200, seed=int(cfg.inference_seed))
    for name, fc in base.items():
        res = score_paths(fc, quantiles, levels)
        summary = _seed_summary([res])
        summary["kind"] = "baseline"
        report["forecasters"][name] = summary
    model_fc: dict[str, PathForecasts] = {}
    for name, runs_fc in models.items():
        runs, dms = [], []
        for fc in runs_fc:
            runs.append(score_paths(fc, quantiles, levels))
            dms.append(dm_versus(fc, base["last_value"], stride=ev.stride))
        model_fc[name] = runs_fc[0]
        summary = _seed_summary(runs)
        summary["kind"] = "model"
        fc0 = model_fc[name]
        moved = fc0.true != fc0.last_close[:, None]
        summary["reliability"] = _reliability(runs[0]["p_up"][moved], (fc0.true > fc0.last_close[:, None])[moved])
        summary["dm_vs_last_value"] = {k: float(np.nanmean([d[k] for d in dms])) for k in dms[0] if k != "kernel"}
        summary["dm_vs_last_value"]["kernel"] = dms[0].get("kernel")
        summary["dm_vs_last_value"]["p_value_by_seed"] = [d["p_value"] for d in dms]
        report["forecasters"][name] = summary
    if calibrations:
        block = dates_per_horizon(frame["timestamps"], anchors["anchor"], P)
        report["calibration"] = {}
        for name, cal in calibrations.items():
            comparison = calibration_comparison(model_fc[name], cal, block)
            comparison["interval_block_dates"] = block
            comparison["validation"] = {
                "n_anchors": cal.n_anchors,
                "coverage_before": cal.coverage_before,
                "coverage_after": cal.coverage_after,
                "holdout": cal.holdout,
                "scores": cal.validation,
            }
            report["calibration"][name] = comparison
            crps_cal = calibrated_crps(
                cal,
                model_fc[name].samples,
                model_fc[name].last_close,
                model_fc[name].true,
                model_fc[name].vol,
                anchors=model_fc[name].anchor,
            )
            if crps_cal is not None:
                ok = np.isfinite(model_fc[name].true)
                rel = np.where(ok, crps_cal / model_fc[name].last_close[:, None], np.nan)
                report["forecasters"][name]["overall"]["crps_rel_calibrated"] = float(np.nanmean(rel))
                model_fc[name].crps_calibrated = crps_cal
    if "finetuned" in model_fc and "zero_shot" in model_fc:
        report["dm_finetuned_vs_zero_shot"] = _dm_crps(model_fc["finetuned"], model_fc["zero_shot"], ev.stride)
    if "zero_shot" in models:
        report["zero_shot_cutoff"] = _cutoff_status(starting_cutoff, frame, anchors)
        if report["zero_shot_cutoff"]["warning"]:
            report["warnings"].append(report["zero_shot_cutoff"]["warning"])
    report["seconds"] = round(time.time() - t0, 2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {
        "json": str(out / "report.json"),
        "markdown": str(out / "report.md"),
        "plots": _plots(report, out),
    }
    report["headline"] = headline(report)
    kio.write_text(out / "report.md", render_markdown(report))
    kio.write_json(out / "report.json", report)
    return report


CRPS_ESTIMATOR = (
    "CRPS / last close. Models: the fair (unbiased) ensemble estimator over their sample paths; random "
    "walk: the exact log-normal formula; calibrated bands: 2 x mean pinball loss over the 20 quantile "
    "levels 0.025, 0.075, .., 0.975 of the calibrated distribution (within 1% of the exact CRPS for a "
    "log-normal); last value and drift: absolute error (point forecasts)."
)


def _dm_crps(a: PathForecasts, b: PathForecasts, stride: int) -> dict:
    """Diebold-Mariano of ``a`` vs ``b`` on per-date mean CRPS (calibrated when both have it, else raw fair CRPS)."""

    def loss(fc: PathForecasts, calibrated: bool) -> np.ndarray:
        if calibrated:
            return fc.crps_calibrated / fc.last_close[:, None]
        return crps_samples(np.moveaxis(fc.samples, 1, -1), np.nan_to_num(fc.true)) / fc.last_close[:, None]

    calibrated = a.crps_calibrated is not None and b.crps_calibrated is not None
    ok = np.isfinite(a.true)
    la, lb = np.where(ok, loss(a, calibrated), np.nan), np.where(ok, loss(b, calibrated), np.nan)
    out = dm_by_date(a.anchor, la, lb, a.horizon, stride)
    out["loss"] = "calibrated CRPS / last close" if calibrated else "CRPS / last close (raw paths)"
    return out


def _cutoff_status(cutoff: dict | None, frame: pd.DataFrame, anchors: pd.DataFrame) -> dict:
    """Whether the zero-shot model's pretraining data reach into the test targets (then its row is in-sample)."""
    end = (cutoff or {}).get("data_end")
    source = (cutoff or {}).get("source", "unknown")
    ts = np.sort(pd.DatetimeIndex(frame["timestamps"].unique()))
    first_anchor = pd.Timestamp(anchors["anchor"].min())
    later = ts[ts > first_anchor]
    first_target = pd.Timestamp(later[0]) if len(later) else first_anchor
    if not end:
        return {
            "data_end": None,
            "source": source,
            "in_sample": None,
            "first_test_target": str(first_target),
            "warning": "",
        }
    in_sample = pd.Timestamp(end) >= first_target
    warning = ""
    if in_sample:
        warning = (
            f"zero-shot row is in-sample: the starting model saw data up to {end} ({source}), on or after "
            f"the first test target {first_target.date()}; its scores overstate its skill on unseen data"
        )
    return {
        "data_end": end,
        "source": source,
        "in_sample": bool(in_sample),
        "first_test_target": str(first_target),
        "warning": warning,
    }


def headline(report: dict) -> dict:
    """{forecaster: {metric: mean}} for the headline metrics (what the CLI prints), plus ``crps_rel_calibrated``
    for calibrated models; the keys ``model_in_use`` and ``dm_finetuned_vs_zero_shot`` beside them."""
    out: dict[str, Any] = {
        name: {k: s["overall"].get(k) for k in (*HEADLINE, "crps_rel_calibrated") if k in s["overall"]}
        for name, s in report["forecasters"].items()
    }
    out["model_in_use"] = report.get("model_in_use")
    dm = report.get("dm_finetuned_vs_zero_shot")
    if dm:
        out["dm_finetuned_vs_zero_shot"] = {k: dm.get(k) for k in ("dm_stat", "p_value", "loss", "n", "kernel")}
    cut = report.get("zero_shot_cutoff")
    if cut:
        out["zero_shot_in_sample"] = cut.get("in_sample")
    return out


HEADLINE_EXTRA = ("model_in_use", "dm_finetuned_vs_zero_shot", "zero_shot_in_sample")  # not forecasters


def _fmt(v: Any, sd: Any = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    txt = f"{v:.4g}"
    if sd is not None and isinstance(sd, float) and math.isfinite(sd) and sd > 0:
        txt += f" ± {sd:.2g}"
    return txt


_LABELS = {
    "mse_ret": "MSE (return)",
    "mae_ret": "MAE (return)",
    "mse": "MSE (price)",
    "mae": "MAE (price)",
    "mase": "MASE",
    "direction_accuracy": "direction accuracy",
    "ic": "IC (final step)",
    "rank_ic": "RankIC (final step)",
    "icir": "ICIR",
    "crps_rel": "CRPS / last close",
    "wql": "WQL",
    "coverage_0.5": "coverage 50%",
    "coverage_0.8": "coverage 80%",
    "width_0.5": "width 50% / last close",
    "width_0.8": "width 80% / last close",
    "brier_up": "P(up) Brier",
    "crps_rel_calibrated": "CRPS / last close, calibrated",
    "vol_corr": "volatility corr.",
    "vol_mae": "volatility MAE",
}


def render_markdown(report: dict) -> str:
    names = list(report["forecasters"])
    keys = (
        [
            "crps_rel",
            "crps_rel_calibrated",
            "mse_ret",
            "mae_ret",
            "mse",
            "mae",
            "mase",
            "direction_accuracy",
            "ic",
            "rank_ic",
            "icir",
            "wql",
        ]
        + [f"coverage_{lv:g}" for lv in report["levels"]]
        + [f"width_{lv:g}" for lv in report["levels"]]
        + ["brier_up", "vol_mae", "vol_corr"]
    )
    in_use = report.get("model_in_use")
    cut = report.get("zero_shot_cutoff") or {}

    def title(n: str) -> str:
        marks = []
        if n == in_use:
            marks.append("in use")
        if n == "zero_shot" and cut.get("in_sample"):
            marks.append("IN-SAMPLE")
        return f"{n} ({', '.join(marks)})" if marks else n

    a = report["anchors"]
    lines = [
        "# Walk-forward report",
        "",
        f"{a['n_forecasts']} forecasts at {a['n_dates']} anchor dates ({a['first']} .. {a['last']}, every "
        f"{a['eval_stride']} bar(s)) over {a['n_symbols']} symbol(s); lookback {report['lookback_window']}, horizon "
        f"{report['predict_window']}, {report['sample_count']} sample paths, seeds {report['seeds']} (mean ± std). "
        f"Every target lies after the last validation bar ({report['splits'].get('val_end')}).",
        "",
        "| metric | " + " | ".join(title(n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in keys:
        cells = []
        for n in names:
            s = report["forecasters"][n]
            cells.append(_fmt(s["overall"].get(k), s["overall_std"].get(k)))
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {_LABELS.get(k, k)} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        dm = report["forecasters"][n].get("dm_vs_last_value")
        if dm:
            lines.append(
                f"- Diebold-Mariano, {n} vs last value (squared return error, HLN): statistic "
                f"{_fmt(dm['dm_stat'])}, p-value {_fmt(dm['p_value'])} (negative: {n} more accurate)."
            )
    for n, why in report.get("skipped", {}).items():
        lines.append(f"- {n}: not scored ({why}).")
    dm = report.get("dm_finetuned_vs_zero_shot")
    if dm:
        lines.append(
            f"- Diebold-Mariano, finetuned vs zero_shot ({dm.get('loss')}, per anchor date): statistic "
            f"{_fmt(dm['dm_stat'])}, p-value {_fmt(dm['p_value'])} (negative: finetuned better)."
        )
    if cut:
        if cut.get("data_end") is None:
            lines.append(
                "- zero_shot: the starting model's pretraining cutoff is unknown (no model card; set "
                "pretrained_data_end), so whether its test targets were in its training data is unknown."
            )
        else:
            state = (
                "IN-SAMPLE: its training data reach the test targets"
                if cut.get("in_sample")
                else "out of sample: every test target is after it"
            )
            lines.append(
                f"- zero_shot: pretrained on data up to {cut['data_end']} ({cut['source']}); first test "
                f"target {cut['first_test_target'][:10]}: {state}."
            )
    sel = report.get("model_selection")
    if sel and sel.get("reason"):
        lines.append(f"- Model in use: {sel.get('model_in_use')} ({sel['reason']}).")
    lines += ["", f"CRPS: {report.get('crps_estimator', '')}"]
    for name, cal in (report.get("calibration") or {}).items():
        lines += [
            "",
            f"## Calibration of {name} ({cal['method']}, fitted on {cal['validation']['n_anchors']} "
            "validation forecasts)",
            "",
            _fit_line(cal["validation"]),
            "",
            _adaptive_line(cal.get("adaptive")),
            "",
            "| | uncalibrated | calibrated |",
            "|---|---|---|",
        ]

        def cov(row, lv):
            ci = row.get(f"coverage_{lv:g}_ci")
            text = _fmt(row[f"coverage_{lv:g}"])
            ok = ci and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci)
            return f"{text} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ok else text

        for lv in cal["levels"]:
            lines.append(
                f"| coverage {lv:.0%} [95% interval over dates] | {cov(cal['raw'], lv)} | "
                f"{cov(cal['calibrated'], lv)} |"
            )
            for t, name in enumerate(("low", "mid", "high")):
                key = f"coverage_{lv:g}_by_vol_tercile"
                if key in cal["calibrated"]:
                    cells = []
                    for tag in ("raw", "calibrated"):
                        ci = cal[tag][f"{key}_ci"][t]
                        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci)
                        value = _fmt(cal[tag][key][t])
                        cells.append(f"{value} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ok else value)
                    lines.append(f"| coverage {lv:.0%}, {name} recent volatility | {cells[0]} | {cells[1]} |")
            lines.append(
                f"| width {lv:.0%} / last close | {_fmt(cal['raw'][f'width_{lv:g}'])} | "
                f"{_fmt(cal['calibrated'][f'width_{lv:g}'])} |"
            )
        lines.append(
            f"| quantile CRPS / last close | {_fmt(cal['raw']['crps_q'])} | {_fmt(cal['calibrated']['crps_q'])} |"
        )
        lines.append(
            f"| P(up) Brier (base rate {_fmt(cal['brier_base_rate'])}) | {_fmt(cal['raw']['brier_up'])} | "
            f"{_fmt(cal['calibrated']['brier_up'])} |"
        )
        hold = cal["validation"]["holdout"]
        lv_keys = [f"{lv:g}" for lv in cal["levels"]]
        lines += [
            "",
            f"The method is the config's `calibration_method` ({cal['method']}). Every candidate: coverage "
            "(width / last close) on the later 40% of validation anchors after fitting on the earlier 60%, "
            "and on these test anchors after fitting on all validation anchors:",
            "",
            "| method | "
            + " | ".join(f"validation {float(k):.0%}" for k in lv_keys)
            + " | "
            + " | ".join(f"test {float(k):.0%}" for k in lv_keys)
            + " |",
            "|---|" + "---|" * (2 * len(lv_keys)),
        ]
        for method, row in cal.get("candidates", {}).items():
            h = hold.get(method, {})
            val_cells = [f"{_fmt(h.get('coverage', {}).get(k))} ({_fmt(h.get('width', {}).get(k))})" for k in lv_keys]
            test_cells = [f"{_fmt(row[f'coverage_{k}'])} ({_fmt(row[f'width_{k}'])})" for k in lv_keys]
            used = "vol_scaled_adaptive" if cal.get("adaptive") else cal["method"]
            mark = " (used)" if method == used else ""
            lines.append(f"| {method}{mark} | " + " | ".join(val_cells + test_cells) + " |")
    lines += ["", "Figures: " + ", ".join(Path(p).name for p in report["files"]["plots"]), ""]
    return "\n".join(lines)


def _adaptive_line(info: dict | None) -> str:
    """One line on the adaptive correction (or that the bands are the static validation fit)."""
    if not info:
        return "Bands: the static validation fit (no realised outcomes; calibration_half_life 0 or none saved)."
    spans = ", ".join(
        f"{float(k):.0%} x{_fmt(v['min'])}..{_fmt(v['max'])} (median {_fmt(v['median'])})"
        for k, v in info["multiplier"].items()
    )
    line = (
        f"Bands adapted to realised outcomes: at each test anchor the validation fit is rescaled by the "
        f"{info['n_outcomes']} outcomes (validation and earlier test forecasts) realised on or before that anchor, "
        f"weights halving every {_fmt(info['half_life_bars'])} bars; multipliers {spans}."
    )
    if info.get("regime_factor"):
        regimes = ", ".join(
            f"{float(k):.0%} x" + " / ".join(_fmt(x) for x in v) for k, v in info["regime_factor"].items()
        )
        line += (
            " The multipliers include each volatility regime's running correction (low / mid / high recent "
            f"volatility; factors at the last test anchor: {regimes})."
        )
    return line


def _fit_line(validation: dict) -> str:
    """The fit's own coverage on the validation forecasts it was fitted on, with its interval over dates."""
    parts = []
    for lv, row in (validation.get("coverage_after") or {}).items():
        ci = row.get("interval") or []
        ok = len(ci) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci)
        parts.append(
            f"{float(lv):.0%}: {_fmt(row.get('coverage'))}" + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ok else "")
        )
    if not parts:
        return "Fitted coverage on validation: not recorded."
    return (
        "Fitted coverage on validation (in-sample, 95% interval over validation dates): "
        + ", ".join(parts)
        + ". A wide interval means too few validation dates for a stable fit (raise eval_max_anchors)."
    )


def _plots(report: dict, out: Path) -> list[str]:
    files = []
    steps = np.arange(1, report["predict_window"] + 1)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, s in report["forecasters"].items():
        ax.plot(steps, s["by_step"]["mase"], marker="o", label=name)
    ax.set(xlabel="horizon step", ylabel="MASE", title="Error by horizon (lower is better)")
    ax.legend()
    files.append(str(save_figure(fig, out / "error_by_horizon.png")))

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, s in report["forecasters"].items():
        if s["kind"] == "model" or name == "random_walk":
            pit = np.asarray(s["pit"], dtype=float)
            if pit.sum() > 0:
                centers = (np.arange(len(pit)) + 0.5) / len(pit)
                ax.plot(centers, pit / pit.sum() * len(pit), drawstyle="steps-mid", label=name)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="uniform (calibrated)")
    ax.set(xlabel="PIT", ylabel="density", title="PIT histogram")
    ax.legend()
    files.append(str(save_figure(fig, out / "pit_histogram.png")))

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    cal = report.get("calibration")
    for lv in report["levels"]:
        key = f"coverage_{lv:g}"
        ax.axhline(lv, ls="--", lw=1, color="gray")
        for name, s in report["forecasters"].items():
            if s["kind"] == "model" or name == "random_walk":
                ax.plot(steps, s["by_step"][key], marker="o", label=f"{name} {lv:.0%}")
        for name, c in (cal or {}).items():
            ax.plot(steps, c["calibrated"][f"{key}_by_step"], marker="s", label=f"{name} calibrated {lv:.0%}")
    ax.set(xlabel="horizon step", ylabel="coverage", ylim=(0, 1), title="Coverage by horizon (dashed: nominal)")
    ax.legend(fontsize=7)
    files.append(str(save_figure(fig, out / "coverage_by_horizon.png")))

    curves = [
        (f"{n} raw", s["reliability"], s["overall"].get("brier_up"))
        for n, s in report["forecasters"].items()
        if s.get("reliability")
    ]
    for name, c in (cal or {}).items():
        curves.append((f"{name} calibrated", c["calibrated"]["reliability"], c["calibrated"]["brier_up"]))
    if curves:
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        for label, r, brier in curves:
            x, y = np.asarray(r["mean_p"], dtype=float), np.asarray(r["observed"], dtype=float)
            keep = np.isfinite(x) & np.isfinite(y)  # empty bins have no point
            ax.plot(x[keep], y[keep], marker="o", label=f"{label} (Brier {_fmt(brier)})")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
        first = next(iter(report["forecasters"].values()))["overall"]
        ax.axhline(
            first.get("up_rate", float("nan")),
            color="gray",
            lw=1,
            label=f"base rate (Brier {_fmt(first.get('brier_base_rate'))})",
        )
        ax.set(
            xlabel="forecast P(up)", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title="P(up) reliability"
        )
        ax.legend(fontsize=8)
        files.append(str(save_figure(fig, out / "reliability.png")))
    return files


__all__ = ["build_report", "calibration_comparison", "coverage_interval", "headline", "render_markdown"]
