"""Forecast scores on sample paths: the walk-forward report's metrics, CRPS, coverage, Diebold-Mariano tests.

Everything works on arrays: N forecasts (one per symbol and anchor), P steps, S sample paths
(:class:`PathForecasts`). The model's scores (CRPS, MASE, direction accuracy, IC, coverage, ...) are computed once,
here, beside the baselines' (:mod:`kronos.evaluate.report`). Forecast records (the long frame of
:meth:`kronos.inference.KronosPredictor.predict_df`) are read by :mod:`kronos.evaluate.records` (IC by date) and
:mod:`kronos.evaluate.signals` (backtest signals). Undefined values (one symbol, no realised data, ...) are NaN,
never exceptions.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from kronos import io as kio
from kronos.inference.bands import check_levels, log_returns, prob_up


def _nan() -> float:
    return float("nan")


def _f(x: Any) -> float:
    """Plain Python float (NaN for None/inf-free undefined values)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _nan()
    return v if math.isfinite(v) else _nan()


# ---------------------------------------------------------------------- correlations
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equal-length arrays; NaN for fewer than 2 points or a constant series."""
    if len(a) < 2:
        return _nan()
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if den <= 0 or not math.isfinite(den):
        return _nan()  # a constant signal or return has no correlation
    return float((a * b).sum()) / den


def daily_ic(frame: pd.DataFrame, signal: str, target: str, by: str = "anchor") -> pd.DataFrame:
    """Per-date cross-sectional IC (Pearson) and RankIC (Spearman) of ``signal`` against ``target``.

    Rows with a non-finite signal or target are dropped; dates with fewer than two symbols, or a constant
    signal/target, get NaN.
    """
    ok = np.isfinite(frame[signal].to_numpy(dtype=float)) & np.isfinite(frame[target].to_numpy(dtype=float))
    sub = frame.loc[ok, [by, signal, target]]
    rows = []
    for date, g in sub.groupby(by, sort=True):
        x = g[signal].to_numpy(dtype=float)
        y = g[target].to_numpy(dtype=float)
        rx = g[signal].rank(method="average").to_numpy(dtype=float)
        ry = g[target].rank(method="average").to_numpy(dtype=float)
        rows.append((date, pearson(x, y), pearson(rx, ry), len(g)))
    return pd.DataFrame(rows, columns=[by, "ic", "rank_ic", "n"]).set_index(by)


def ic_summary(ic: pd.Series) -> tuple[float, float, float, int]:
    """Mean, std, IR (mean / std) and count of a per-date IC series (NaN dates left out)."""
    ic = ic.dropna()
    n = int(len(ic))
    if n == 0:
        return _nan(), _nan(), _nan(), 0
    mean = float(ic.mean())
    std = float(ic.std(ddof=1)) if n >= 2 else _nan()
    ir = mean / std if (n >= 2 and std > 1e-12) else _nan()  # no spread (e.g. all ICs 1.0): ICIR undefined
    return mean, std, ir, n


# ---------------------------------------------------------------------- quantile scores
def pinball_loss(y: np.ndarray, pred: np.ndarray, q: float) -> np.ndarray:
    """Elementwise quantile (pinball) loss of forecasting ``pred`` as the ``q``-quantile of ``y``."""
    diff = y - pred
    return np.maximum(q * diff, (q - 1.0) * diff)


def save_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a metrics dict as strict JSON (NaN -> null), atomically."""
    kio.write_json(path, metrics)


# ====================================================================== sample-path forecasts (walk-forward report)
# Everything below works on arrays: N forecasts (one per symbol and anchor), P steps, S sample paths.
@dataclass
class PathForecasts:
    """N forecasts of P steps from one model or baseline, on the same anchors as every other forecaster.

    ``samples`` ``[N, S, P]`` are the sampled close paths (a point forecast is one path, S = 1); ``point`` ``[N, P]``
    is the point forecast (the predictor's mean path); ``true`` ``[N, P]`` the realised closes; ``last_close``
    ``[N]`` the close at the anchor; ``scale`` ``[N]`` the in-sample naive error of the context (mean absolute
    one-bar change of close), the MASE denominator.
    """

    name: str
    symbol: np.ndarray
    anchor: np.ndarray
    last_close: np.ndarray
    scale: np.ndarray
    true: np.ndarray
    point: np.ndarray
    samples: np.ndarray
    vol: np.ndarray | None = None  # [N] the context's recent log-return volatility (recent_volatility)
    crps: np.ndarray | None = None  # [N, P] exact CRPS when the forecaster has a closed form (random walk)
    crps_calibrated: np.ndarray | None = None  # [N, P] CRPS of its calibrated bands (set by the report)
    records: pd.DataFrame | None = None  # a model's forecast records (predict_df's schema) at these anchors

    @property
    def horizon(self) -> int:
        return int(self.true.shape[1])


def naive_scale(context_close: np.ndarray) -> np.ndarray:
    """MASE denominator per context ``[N, L]``: mean |close_t - close_{t-1}| over the context (in-sample naive)."""
    c = np.asarray(context_close, dtype=float)
    if c.shape[-1] < 2:
        return np.full(c.shape[:-1], np.nan)
    return np.nanmean(np.abs(np.diff(c, axis=-1)), axis=-1)


def context_volatility(close: np.ndarray) -> np.ndarray:
    """Standard deviation (ddof 1) of the log-returns of context closes ``[..., L]``; tiny floor so it divides."""
    r = log_returns(close)
    if r.shape[-1] < 2:
        return np.full(r.shape[:-1], 1e-8)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            vol = np.nanstd(r, axis=-1, ddof=1)
    return np.maximum(np.nan_to_num(vol, nan=1e-8), 1e-8)


def crps_samples(samples: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The fair (unbiased) ensemble CRPS of ``samples`` (last axis, S members) at ``y``:
    E|X - y| - sum_{i != j} |x_i - x_j| / (2 S (S - 1)).

    The plain empirical CRPS (denominator S^2) overstates the CRPS of the distribution the samples come from by
    E|X - X'| / (2S), so a 16-path model would lose to a 200-path baseline for its path count alone; the fair form
    removes that (Ferro, 2014). Uses the sorted-sample identity sum_{i,j} |x_i - x_j| = 2 sum_i (2i - S - 1) x_(i).
    A point forecast (S = 1) scores |x - y|.
    """
    x = np.sort(np.asarray(samples, dtype=float), axis=-1)
    y = np.asarray(y, dtype=float)
    s = x.shape[-1]
    term1 = np.mean(np.abs(x - y[..., None]), axis=-1)
    if s < 2:
        return term1
    weights = 2.0 * np.arange(1, s + 1) - s - 1
    spread = 2.0 * np.sum(weights * x, axis=-1) / (s * (s - 1))
    return term1 - 0.5 * spread


def crps_lognormal(mu: np.ndarray, sigma: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact CRPS of a log-normal forecast (log X ~ N(mu, sigma^2)) at ``y`` > 0 (Baran and Lerch, 2015): the random
    walk baseline's closed form. ``sigma`` 0 is a point mass at exp(mu)."""
    mu, sigma, y = np.broadcast_arrays(np.asarray(mu, float), np.asarray(sigma, float), np.asarray(y, float))
    out = np.abs(np.exp(mu) - y)
    pos = (sigma > 0) & (y > 0)
    m, sd, v = mu[pos], sigma[pos], y[pos]
    z = (np.log(v) - m) / sd
    out = out.copy()
    out[pos] = v * (2 * stats.norm.cdf(z) - 1) - 2 * np.exp(m + sd**2 / 2) * (
        stats.norm.cdf(z - sd) + stats.norm.cdf(sd / np.sqrt(2)) - 1
    )
    return out


# Quantile levels of quantile_crps: the midpoints of K = 20 equal slices of (0, 1). A calibrated forecast is a set of
# quantiles, not sample paths; its CRPS is 2 * integral of the pinball loss over levels, here by the midpoint rule
# (within 1% of the exact value for a log-normal: tests/evaluate/test_path_metrics.py).
CRPS_GRID = tuple(round((i + 0.5) / 20, 10) for i in range(20))
CRPS_LEVELS = tuple(sorted({round(abs(2 * q - 1), 10) for q in CRPS_GRID}))  # central levels 0.05 .. 0.95


def quantile_crps(quantiles: np.ndarray, y: np.ndarray, grid: Sequence[float] = CRPS_GRID) -> np.ndarray:
    """CRPS from quantile forecasts ``[K, ...]`` at the levels ``grid`` (midpoints of K equal slices): the mean of
    2 * pinball loss over the levels."""
    q = np.asarray(quantiles, dtype=float)
    y = np.asarray(y, dtype=float)
    return 2.0 * np.mean([pinball_loss(y, q[k], float(t)) for k, t in enumerate(grid)], axis=0)


def pit_values(samples: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Probability integral transform: share of samples below ``y`` (ties count half)."""
    x = np.asarray(samples, dtype=float)
    y = np.asarray(y, dtype=float)[..., None]
    return np.mean(x < y, axis=-1) + 0.5 * np.mean(x == y, axis=-1)


def diebold_mariano(loss_a: np.ndarray, loss_b: np.ndarray, h: int = 1) -> dict[str, Any]:
    """Diebold-Mariano test of equal predictive accuracy with the Harvey-Leybourne-Newbold correction.

    ``loss_a`` and ``loss_b`` are aligned loss series (time order). d = loss_a - loss_b; the long-run variance
    uses autocovariances up to lag h-1 (with Bartlett weights when the plain sum is not positive, as happens with few
    dates and many lags; ``kernel`` says which); the statistic is scaled by sqrt((T + 1 - 2h + h(h-1)/T) / T) and
    compared with Student's t on T-1 degrees of freedom (two-sided). A negative statistic means ``a`` has the lower
    loss.
    """

    d = np.asarray(loss_a, dtype=float) - np.asarray(loss_b, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    h = max(1, int(h))
    out: dict[str, Any] = {
        "dm_stat": _nan(),
        "p_value": _nan(),
        "mean_loss_diff": _f(d.mean()) if n else _nan(),
        "n": float(n),
        "lags": float(h - 1),
    }
    if n < 3 or h >= n:
        return out
    dc = d - d.mean()
    gamma = [float(np.dot(dc[k:], dc[: n - k]) / n) for k in range(h)]
    var = (gamma[0] + 2.0 * sum(gamma[1:])) / n
    out["kernel"] = "rectangular"
    if not var > 0:  # few dates and many lags can make it negative: Newey-West (Bartlett) weights never do
        var = (gamma[0] + 2.0 * sum((1 - k / h) * g for k, g in enumerate(gamma) if k)) / n
        out["kernel"] = "bartlett"
    if not var > 0:
        return out
    stat = d.mean() / math.sqrt(var)
    stat *= math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    out["dm_stat"] = _f(stat)
    out["p_value"] = _f(2.0 * stats.t.sf(abs(stat), df=n - 1))
    return out


def _pearson_per_anchor(anchor: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean cross-sectional IC, RankIC and ICIR (IC mean / IC std) over anchors with >= 2 symbols."""
    frame = pd.DataFrame({"anchor": anchor, "s": a, "t": b})
    ics = daily_ic(frame, "s", "t")
    ic_mean, _, ic_ir, _ = ic_summary(ics["ic"])
    ric_mean, _, _, _ = ic_summary(ics["rank_ic"])
    return ic_mean, ric_mean, ic_ir


def nanmean(x: np.ndarray, axis=None):
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(x, axis=axis)


def score_paths(
    fc: PathForecasts, quantiles: Sequence[float], levels: Sequence[float], pit_bins: int = 10
) -> dict[str, Any]:
    """Every point and probabilistic metric of one forecaster: ``{"overall": {...}, "by_step": {...}, "pit": [...]}``.

    Point metrics on price and on return (``x / last_close - 1``): MSE, MAE, MASE, direction accuracy (rows whose
    realised or forecast move is zero are left out), IC/RankIC/ICIR (cross-sectional per anchor; overall on the
    horizon's final step). Probabilistic: CRPS (price and relative to last close), pinball per quantile, WQL,
    coverage and relative width of each central interval, PIT histogram, P(up) Brier score, realised vs forecast
    volatility of the horizon's log-returns (mean absolute error and correlation across forecasts).
    """
    levels = check_levels(levels)
    y = fc.true
    last = fc.last_close[:, None]
    ok = np.isfinite(y) & np.isfinite(fc.point)
    yr = y / last - 1.0
    pr = fc.point / last - 1.0
    e_price = np.where(ok, fc.point - y, np.nan)
    e_ret = np.where(ok, pr - yr, np.nan)
    scale = np.where(fc.scale > 0, fc.scale, np.nan)[:, None]
    by: dict[str, Any] = {}
    by["mse"] = nanmean(e_price**2, 0)
    by["mae"] = nanmean(np.abs(e_price), 0)
    by["mse_ret"] = nanmean(e_ret**2, 0)
    by["mae_ret"] = nanmean(np.abs(e_ret), 0)
    by["mase"] = nanmean(np.abs(e_price) / scale, 0)
    sp, st = np.sign(pr), np.sign(yr)
    dir_ok = ok & (sp != 0) & (st != 0)
    by["direction_accuracy"] = np.array(
        [
            _f((sp[dir_ok[:, k], k] == st[dir_ok[:, k], k]).mean()) if dir_ok[:, k].any() else _nan()
            for k in range(fc.horizon)
        ]
    )
    ic_rows = [_pearson_per_anchor(fc.anchor[ok[:, k]], pr[ok[:, k], k], yr[ok[:, k], k]) for k in range(fc.horizon)]
    by["ic"] = np.array([r[0] for r in ic_rows])
    by["rank_ic"] = np.array([r[1] for r in ic_rows])
    by["icir"] = np.array([r[2] for r in ic_rows])
    # probabilistic
    s = fc.samples
    exact = fc.crps if fc.crps is not None else crps_samples(np.moveaxis(s, 1, -1), np.nan_to_num(y))
    crps = np.where(ok, exact, np.nan)
    by["crps"] = nanmean(crps, 0)
    by["crps_rel"] = nanmean(crps / last, 0)
    qs = np.quantile(s, list(quantiles), axis=1) if len(quantiles) else np.empty((0,) + y.shape)
    denom = np.nansum(np.abs(np.where(ok, y, np.nan)), 0)
    wql = []
    for q, qv in zip(quantiles, qs):
        loss = np.where(ok, pinball_loss(y, qv, q), np.nan)
        by[f"pinball_q{q:g}"] = nanmean(loss, 0)
        wql.append(2.0 * np.nansum(loss, 0) / np.where(denom > 0, denom, np.nan))
    if wql:
        by["wql"] = np.mean(wql, axis=0)
    for lv in levels:
        lo, hi = np.quantile(s, [(1 - lv) / 2, (1 + lv) / 2], axis=1)
        inside = np.where(ok, ((y >= lo) & (y <= hi)).astype(float), np.nan)
        by[f"coverage_{lv:g}"] = nanmean(inside, 0)
        by[f"width_{lv:g}"] = nanmean(np.where(ok, (hi - lo) / last, np.nan), 0)

    p_up = prob_up(s, fc.last_close)
    moved = ok & (y != last)
    up = (y > last).astype(float)
    by["brier_up"] = np.array(
        [
            _f(np.mean((p_up[moved[:, k], k] - up[moved[:, k], k]) ** 2)) if moved[:, k].any() else _nan()
            for k in range(fc.horizon)
        ]
    )
    overall: dict[str, float] = {k: _f(nanmean(v)) for k, v in by.items() if k not in ("ic", "rank_ic", "icir", "wql")}
    overall["ic"], overall["rank_ic"], overall["icir"] = ic_rows[-1]
    if "wql" in by:
        loss_all = [np.where(ok, pinball_loss(y, qv, q), np.nan) for q, qv in zip(quantiles, qs)]
        tot = float(np.nansum(np.abs(np.where(ok, y, np.nan))))
        overall["wql"] = _f(np.mean([2.0 * np.nansum(loss) / tot for loss in loss_all])) if tot > 0 else _nan()
    all_moved = moved
    overall["brier_up"] = _f(np.mean((p_up[all_moved] - up[all_moved]) ** 2)) if all_moved.any() else _nan()
    overall["up_rate"] = _f(up[all_moved].mean()) if all_moved.any() else _nan()
    overall["brier_base_rate"] = _f(overall["up_rate"] * (1 - overall["up_rate"])) if all_moved.any() else _nan()
    pit = pit_values(np.moveaxis(s, 1, -1), np.nan_to_num(y))[ok]
    hist, _ = np.histogram(pit, bins=pit_bins, range=(0.0, 1.0))
    # volatility over the horizon: std of log-returns of [last, x_1..x_P]
    full_ok = ok.all(axis=1)
    vol = {"realised_vol": _nan(), "forecast_vol": _nan(), "vol_mae": _nan(), "vol_corr": _nan()}
    if fc.horizon >= 2 and full_ok.sum() >= 1:
        true_path = np.concatenate([fc.last_close[full_ok, None], y[full_ok]], axis=1)
        rv = np.std(np.diff(np.log(true_path), axis=1), axis=1, ddof=1)
        sp_path = np.concatenate([np.repeat(fc.last_close[full_ok, None, None], s.shape[1], 1), s[full_ok]], axis=2)
        with np.errstate(all="ignore"):
            fv = np.mean(np.std(np.diff(np.log(sp_path), axis=2), axis=2, ddof=1), axis=1)
        vol = {
            "realised_vol": _f(np.nanmean(rv)),
            "forecast_vol": _f(np.nanmean(fv)),
            "vol_mae": _f(np.nanmean(np.abs(fv - rv))),
            "vol_corr": pearson(fv, rv) if rv.size >= 3 else _nan(),
        }
    overall.update(vol)
    overall["n_forecasts"] = float(ok.any(axis=1).sum())
    overall["n_samples"] = float(s.shape[1])
    return {
        "overall": overall,
        "by_step": {k: [_f(x) for x in v] for k, v in by.items()},
        "pit": [int(c) for c in hist],
        "p_up": p_up,
    }


def dm_versus(model: PathForecasts, reference: PathForecasts, stride: int = 1) -> dict[str, Any]:
    """DM test of ``model`` against ``reference`` on squared return errors averaged per anchor date (time order)."""
    last = model.last_close[:, None]
    ok = np.isfinite(model.true) & np.isfinite(model.point) & np.isfinite(reference.point)
    la = np.where(ok, (model.point / last - model.true / last) ** 2, np.nan)
    lb = np.where(ok, (reference.point / last - model.true / last) ** 2, np.nan)
    return dm_by_date(model.anchor, la, lb, model.horizon, stride)


def dm_by_date(
    anchor: np.ndarray, loss_a: np.ndarray, loss_b: np.ndarray, horizon: int, stride: int = 1
) -> dict[str, Any]:
    """DM test of two forecasters' losses ``[N, P]`` averaged per anchor date (time order). Forecasts from anchors
    less than a horizon apart overlap, so the long-run variance keeps ceil(P / stride) - 1 autocovariance lags."""
    frame = pd.DataFrame({"anchor": anchor, "a": nanmean(loss_a, 1), "b": nanmean(loss_b, 1)}).dropna()
    per = frame.groupby("anchor", sort=True)[["a", "b"]].mean()
    h = max(1, math.ceil(int(horizon) / max(1, int(stride))))
    return diebold_mariano(per["a"].to_numpy(), per["b"].to_numpy(), h=h)


def coverage_interval(inside: np.ndarray, dates: np.ndarray, block: int = 1, n_boot: int = 2000, seed: int = 0) -> list:
    """95% interval ``[low, high]`` of a coverage by a moving-block bootstrap over anchor dates: a market-wide move
    hits every symbol of a date at once, and forecasts whose horizons overlap share outcomes, so whole runs of
    ``block`` consecutive dates are resampled (``block``: dates per forecast horizon)."""
    inside = np.asarray(inside, dtype=float).reshape(len(dates), -1)
    codes, idx = np.unique(np.asarray(dates), return_inverse=True)
    n = len(codes)
    if n < 2:
        return [float("nan"), float("nan")]
    hits = np.bincount(idx, weights=inside.sum(axis=1), minlength=n)
    counts = np.bincount(idx, minlength=n) * inside.shape[1]
    b = int(min(max(1, block), max(1, n // 2)))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - b + 1, size=(n_boot, -(-n // b)))
    pick = (starts[:, :, None] + np.arange(b)[None, None, :]).reshape(n_boot, -1)[:, :n]
    cov = hits[pick].sum(axis=1) / counts[pick].sum(axis=1)
    return [float(v) for v in np.quantile(cov, [0.025, 0.975])]


def dates_per_horizon(all_dates: Any, anchor_dates: Any, horizon: int) -> int:
    """How many of the anchor dates fall within one forecast horizon (bars of ``all_dates``), at their median gap."""
    grid = np.sort(pd.DatetimeIndex(pd.unique(np.asarray(all_dates))).as_unit("ns").asi8)
    a = np.unique(pd.DatetimeIndex(np.asarray(anchor_dates)).as_unit("ns").asi8)
    if len(a) < 2:
        return 1
    gap = float(np.median(np.diff(np.searchsorted(grid, a))))
    return max(1, int(math.ceil(horizon / max(gap, 1.0))))
