"""Calibrated forecast bands and probability of an up move, fitted on the validation split.

The predictor's sampled paths give bands that are usually far too narrow (an overconfident model, sampling with
``top_p`` < 1). :func:`fit_calibration` takes rolling forecasts on validation anchors (targets inside the
validation split only) and corrects the band of each central level and horizon step. Work is in return space
(``x / last_close - 1``) so one correction serves every symbol.

The default method, ``vol_scaled``, is split-conformal prediction on normalised residuals: the score of a forecast
at step ``h`` is ``|y - m| / d`` with ``m`` the sample median and the difficulty

    d = sqrt(vol^2 * h + sd^2)

where ``vol`` is the recent volatility of the context's closes (:func:`kronos.evaluate.metrics.recent_volatility`,
exponential weights with a 10-bar half-life: ``context_vol`` in records) and ``sd`` the model's own spread (the
half-width of its raw band of that level over the normal quantile of the level). The calibrated band is ``m +- c
d`` with ``c`` the finite-sample conformal quantile of the validation scores for that level and step. The centre
``m`` is the sample median shrunk toward the last close, ``lam * median`` (returns), with ``lam`` in [0, 1] per step
fitted on the validation outcomes (least mean absolute error in units of ``vol``): a median move that carried no
information on validation is not trusted at test time (calibration files without ``center`` keep the median). Because
``d`` follows the volatility of each forecast's own recent bars, a band fitted in a calm validation year widens
by itself in a turbulent test year; a correction in price units (``cqr_additive``) or relative to the model's
spread alone does not. Evidence (README, "Calibrated bands"): on six held-out sets (other stocks, four market
regimes 2015-2024, two indices, 5-minute bars) the test coverage of ``vol_scaled`` was within 3.5 points of
nominal for the 50% band and 3.4 for the 80% band; the other methods missed by up to 12 (``cqr_vol``) to 25 points.

Other methods (``calibration_method``; every one is fitted and reported beside the chosen one):

- ``cqr_vol``: conformalised quantiles with the score ``max(lo - y, y - hi) / (vol sqrt(h))``;
- ``cqr_additive``: conformalised quantiles (Romano et al., 2019): score ``max(lo - y, y - hi)``;
- ``cqr_multiplicative``: the band's distances from the median times the conformal quantile of
  ``max((m - y) / (m - lo), (y - m) / (hi - m))``;
- ``spread_scale``: the sample paths stretched around their median by one factor per step;
- ``none``: the raw bands;
- ``auto``: the candidate whose coverage on the later 40% of the validation anchors (fitted on the earlier 60%)
  is nearest nominal. Measured to be unreliable: a validation split's last months often differ from the test
  split more than its first months do.

P(up), the share of sample paths above the last close, is recalibrated by Platt scaling (a logistic fit on its
logit, pooled over steps). The result is saved as ``calibration.json`` beside the predictor's ``best_model`` with a
fingerprint of the predictor's weights, the lookback and the horizon; a file for another model is refused.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from kronos.config import Config
from kronos.errors import InputError
from kronos.evaluate.metrics import (
    CRPS_GRID,
    CRPS_LEVELS,
    coverage_interval,
    crps_samples,
    dates_per_horizon,
    quantile_crps,
)
from kronos.evaluate.rolling import rolling_paths, select_anchors
from kronos.inference.bands import (
    BAND_METHODS,
    DEFAULT_METHOD,
    METHODS,
    MIN_HALF,
    P_EPS,
    VOL_METHODS,
    Calibration,
    apply_calibration,
    bar_minutes,
    calibration_path,
    check_levels,
    load_calibration,
    model_fingerprint,
    path_returns,
    platt,
    session_time,
    vol_scale,
)
from kronos.inference.outcomes import BandOutcomes, outcomes_path, target_times

log = logging.getLogger(__name__)


def _conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)/n empirical quantile of ``scores`` (finite-sample split-conformal guarantee)."""
    s = np.sort(scores[np.isfinite(scores)])
    n = s.size
    if n == 0:
        return float("nan")
    k = min(n, int(math.ceil((n + 1) * level)))
    return float(s[k - 1])


_CENTER_GRID = np.linspace(0.0, 1.0, 21)


def _center_fit(z: np.ndarray, y: np.ndarray, vol: np.ndarray) -> np.ndarray:
    """Per-step factor ``lam`` in [0, 1] for the band centre ``lam * median`` (returns): the one with the least mean
    absolute error in units of ``vol sqrt(h)`` on the validation outcomes. 1 keeps the model's median, 0 is the last
    close; a model whose median move carries no information on validation gets a small factor."""
    med = np.median(z, axis=1)
    unit = np.asarray(vol, dtype=float)[:, None]  # sqrt(h) is the same for every forecast of a step
    out = []
    for k in range(z.shape[2]):
        errs = [float(np.mean(np.abs(y[:, k] - lam * med[:, k]) / unit[:, 0])) for lam in _CENTER_GRID]
        out.append(float(_CENTER_GRID[int(np.argmin(errs))]))
    return np.array(out)


def _cqr_fit(
    method: str,
    z: np.ndarray,
    y: np.ndarray,
    level: float,
    vol: np.ndarray | None = None,
    center: np.ndarray | None = None,
    power: float = 1.0,
    ref: float = 1.0,
    h: np.ndarray | None = None,
) -> np.ndarray:
    """Per-step conformal correction for one level from paths ``z [N,S,P]`` and outcomes ``y [N,P]`` (returns);
    ``center [P]`` (vol_scaled) shrinks the median toward the last close; ``power``/``ref``: vol_scaled's volatility
    exponent and reference (:func:`~kronos.inference.bands.vol_scale`); ``h [N, P]``: vol_scaled's variance time
    (an intraday profile; default the step count)."""
    lo, hi = np.quantile(z, [(1 - level) / 2, (1 + level) / 2], axis=1)
    med = np.median(z, axis=1)
    if center is not None:
        med = med * np.asarray(center, dtype=float)[None, :]
    if method == "vol_scaled":
        assert vol is not None  # fit_calibration keeps the VOL_METHODS only with context_vol
        steps = np.arange(1, z.shape[2] + 1)[None, :] if h is None else h
        scores = np.abs(y - med) / vol_scale(lo, hi, vol[:, None], steps, level, power, ref)
    elif method in ("cqr_additive", "cqr_vol"):
        scores = np.maximum(lo - y, y - hi)
        if method == "cqr_vol":
            assert vol is not None
            scores = scores / (vol[:, None] * np.sqrt(np.arange(1, z.shape[2] + 1))[None, :])
    else:
        scores = np.maximum((med - y) / np.maximum(med - lo, MIN_HALF), (y - med) / np.maximum(hi - med, MIN_HALF))
    return np.array([_conformal_quantile(scores[:, k], level) for k in range(z.shape[2])])


_POWER_GRID = np.round(np.arange(0.0, 1.2001, 0.05), 2)
MIN_PER_TERCILE = 30  # validation forecasts per volatility tercile needed to fit vol_scaled's exponent


def _power_fit(
    z: np.ndarray,
    y: np.ndarray,
    levels: Sequence[float],
    vol: np.ndarray,
    center: np.ndarray,
    ref: float,
    h: np.ndarray | None = None,
) -> float:
    """vol_scaled's volatility exponent: the one (0 .. 1.2) whose conformal bands cover most evenly across the
    terciles of recent volatility on validation (squared coverage errors per tercile, step and level). 1 (bands in
    proportion to the recent volatility) when there are too few forecasts per tercile; of the values within sampling
    noise of the best, the one nearest 1. Measured (README): realised moves grow less than in proportion to the
    recent volatility (5-minute bars: far less), so a power of 1 can give bands too narrow in calm markets and too
    wide in turbulent ones; the adaptive correction's volatility kernel (kronos.inference.outcomes) does the rest."""
    if len(vol) < 3 * MIN_PER_TERCILE:
        return 1.0
    tercile = np.digitize(vol, np.quantile(vol, [1 / 3, 2 / 3]))
    if min(int((tercile == t).sum()) for t in range(3)) < MIN_PER_TERCILE:
        return 1.0
    # what does not depend on the exponent, once: the centre's distance to each outcome and each level's raw band
    dist = np.abs(y - np.median(z, axis=1) * center[None, :])
    bands = {lv: np.quantile(z, [(1 - lv) / 2, (1 + lv) / 2], axis=1) for lv in levels}
    steps = np.arange(1, z.shape[2] + 1)[None, :] if h is None else h
    errors = {}
    for power in _POWER_GRID:
        err = 0.0
        for lv, (lo, hi) in bands.items():
            scores = dist / vol_scale(lo, hi, vol[:, None], steps, lv, float(power), ref)
            corr = np.array([_conformal_quantile(scores[:, k], lv) for k in range(z.shape[2])])
            inside = scores <= corr[None, :]
            err += sum(float(np.sum((inside[tercile == t].mean(axis=0) - lv) ** 2)) for t in range(3))
        errors[float(power)] = err
    # sampling noise: what the error sums to for bands that are exactly right (p (1 - p) / n per cell). An exponent
    # not better than 1 by more than that is no evidence against bands in proportion to volatility: a validation
    # split without volatility changes must not teach bands to ignore the volatility of a later regime
    noise = sum(lv * (1 - lv) / max(1, int((tercile == t).sum())) for lv in levels for t in range(3)) * z.shape[2]
    best = min(errors.values())
    return min((p for p, e in errors.items() if e <= best + noise), key=lambda p: abs(p - 1.0))


SESSION_MIN_SHARE = 0.1  # a bar slot of the day belongs to the profile when at least this share of days has it
SESSION_CLIP = 50.0  # one bar's squared return counts at most this many times its series' mean (a bad print)
SESSION_MAX_SYMBOLS = 200  # the profile of a whole market is read from this many of its symbols, evenly spread


def fit_session_profile(frame: Any, until: Any = None) -> dict | None:
    """The intraday volatility profile of bars up to ``until`` (never later: the training and validation bars): for
    every bar slot of the trading day (minutes since midnight), the mean squared log-return of the bars ending in that
    slot, each series' returns in units of its own mean square, scaled to a mean of 1 over the slots. ``None`` for
    daily or coarser bars, or when fewer than two slots recur on at least :data:`SESSION_MIN_SHARE` of the days.

    Intraday volatility follows the clock: the first bar of a session carries the night's gap, lunch bars are quiet.
    Used by ``vol_scaled`` (:func:`~kronos.inference.bands.session_time`) so a band anchored late in a session that
    reaches into the next morning is not sized by the afternoon's calm."""
    if frame is None or not len(frame):
        return None
    data = frame[["symbol", "timestamps", "close"]]
    names = pd.unique(data["symbol"])
    if len(names) > SESSION_MAX_SYMBOLS:  # a full market: its clock shows in a sample of it, at a bounded cost
        pick = names[np.linspace(0, len(names) - 1, SESSION_MAX_SYMBOLS).round().astype(int)]
        data = data[data["symbol"].isin(pick)]
    if until is not None:
        data = data[data["timestamps"] <= pd.Timestamp(until)]
    data = data.sort_values(["symbol", "timestamps"], kind="stable")
    times = pd.DatetimeIndex(data["timestamps"])
    same = data["symbol"].to_numpy()[1:] == data["symbol"].to_numpy()[:-1]
    step = np.diff(times.asi8)[same]
    if not len(step) or np.median(step) >= pd.Timedelta(days=1).value:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.diff(np.log(data["close"].to_numpy(dtype=float)))
    ok = same & np.isfinite(r)
    symbols = data["symbol"].to_numpy()[1:][ok]
    r2 = r[ok] ** 2
    minutes = bar_minutes(times)[1:][ok]
    scale = pd.Series(r2).groupby(symbols).transform("mean").to_numpy()
    r2 = np.minimum(np.where(scale > 0, r2 / np.where(scale > 0, scale, 1.0), 0.0), SESSION_CLIP)
    days = pd.DataFrame({"s": data["symbol"].to_numpy(), "d": times.normalize()}).drop_duplicates().shape[0]
    slots, count = np.unique(minutes, return_counts=True)
    keep = slots[count >= SESSION_MIN_SHARE * days]
    if len(keep) < 2:
        return None
    inside = np.isin(minutes, keep)
    mean = pd.Series(r2[inside]).groupby(minutes[inside]).mean().reindex(keep).to_numpy()
    weight = np.maximum(mean / max(float(np.mean(mean)), 1e-12), 0.05)
    weight = weight / float(np.mean(weight))
    return {"minutes": [int(m) for m in keep], "weight": [round(float(w), 6) for w in weight]}


_SCALE_GRID = np.exp(np.linspace(np.log(0.2), np.log(50.0), 241))


def _spread_fit(z: np.ndarray, y: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Per-step stretch factor around the median minimising the squared coverage errors over the levels."""
    med = np.median(z, axis=1)
    scales = []
    for k in range(z.shape[2]):
        half = {lv: np.quantile(z[:, :, k], [(1 - lv) / 2, (1 + lv) / 2], axis=1) - med[None, :, k] for lv in levels}
        dev = y[:, k] - med[:, k]
        best, best_err = 1.0, float("inf")
        for c in _SCALE_GRID:
            err = 0.0
            for lv, (lo, hi) in half.items():
                cov = np.mean((dev >= c * lo) & (dev <= c * hi))
                err += (cov - lv) ** 2
            if err < best_err - 1e-12:
                best, best_err = float(c), err
        scales.append(best)
    return np.array(scales)


def _fit_params(
    method: str,
    z: np.ndarray,
    y: np.ndarray,
    levels: Sequence[float],
    vol: np.ndarray | None = None,
    power_levels: Sequence[float] | None = None,
    session: dict | None = None,
    times: np.ndarray | None = None,
    lookback: int = 2,
) -> dict:
    """One method's parameters for ``levels``; vol_scaled's exponent is chosen on ``power_levels`` (default
    ``levels``: the reported ones, not every level of the CRPS grid). ``session`` (an intraday profile,
    :func:`fit_session_profile`) with the anchor ``times``: vol_scaled's bands follow it."""
    if method == "none":
        return {}
    if method == "spread_scale":
        return {"scale": [float(v) for v in _spread_fit(z, y, levels)]}
    out: dict = {}
    center = None
    power, ref = 1.0, 1.0
    h = None
    if method == "vol_scaled":
        assert vol is not None  # fit_calibration keeps the VOL_METHODS only with context_vol
        # the volatility regimes of the adaptive correction (kronos.inference.outcomes): validation's terciles of
        # the contexts' recent volatility, as forecasts carry it (before any intraday profile)
        cuts = np.quantile(np.maximum(np.asarray(vol, dtype=float), 1e-12), [1 / 3, 2 / 3])
        out["vol_cuts"] = [float(v) for v in cuts]
        if session is not None and times is not None:
            ctx, h = session_time(session, times, z.shape[2], lookback)
            vol = np.asarray(vol, dtype=float) / np.sqrt(ctx)
            out["session"] = session
        center = _center_fit(z, y, vol)
        out["center"] = [float(v) for v in center]
        ref = float(np.median(vol))
        power = _power_fit(z, y, list(power_levels or levels), vol, center, ref, h)
        out["vol_power"], out["vol_ref"] = power, ref
    for lv in levels:
        corr = _cqr_fit(method, z, y, lv, vol, center, power, ref, h)
        out[f"{lv:g}"] = [
            float(v) if np.isfinite(v) else (1.0 if method == "cqr_multiplicative" else 0.0) for v in corr
        ]
    return out


def _coverage(
    cal: Calibration,
    samples: np.ndarray,
    last: np.ndarray,
    true: np.ndarray,
    vol: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
    block: int = 1,
    times: np.ndarray | None = None,
) -> dict:
    """Coverage (overall and per step) and mean relative width of each central level; with ``anchors`` also the
    coverage's 95% interval over dates (:func:`~kronos.evaluate.metrics.coverage_interval`); ``times``: the anchor
    times (an intraday profile needs them)."""
    out = {}
    for lv in cal.levels:
        lo, hi = cal.quantiles(samples, last, [(1 - lv) / 2, (1 + lv) / 2], vol, anchors=times)
        inside = (true >= lo) & (true <= hi)
        out[f"{lv:g}"] = {
            "coverage": float(inside.mean()),
            "by_step": [float(v) for v in inside.mean(axis=0)],
            "width": float(np.mean((hi - lo) / last[:, None])),
        }
        if anchors is not None:
            out[f"{lv:g}"]["interval"] = coverage_interval(inside, anchors, block)
    return out


def candidate(cal: Calibration, method: str) -> Calibration:
    """The calibration as if ``method`` had been chosen (its parameters from ``alternatives``)."""
    if method == cal.method:
        return cal
    if method != "none" and method not in cal.alternatives:
        raise InputError(f"calibration has no fitted parameters for method '{method}'")
    return Calibration(
        method=method,
        levels=cal.levels,
        horizon=cal.horizon,
        lookback=cal.lookback,
        fingerprint=cal.fingerprint,
        params=cal.alternatives.get(method, {}),
        p_up=cal.p_up,
    )


def _platt_fit(p: np.ndarray, up: np.ndarray) -> tuple[float, float]:
    x = np.log(np.clip(p, P_EPS, 1 - P_EPS) / (1 - np.clip(p, P_EPS, 1 - P_EPS)))
    if x.size < 10 or up.min() == up.max():
        return 1.0, 0.0

    def loss(w):
        s = w[0] * x + w[1]
        return float(np.mean(np.logaddexp(0.0, s) - up * s) + 1e-4 * (w[0] - 1.0) ** 2)

    res = minimize(loss, np.array([1.0, 0.0]), method="L-BFGS-B")
    a, b = (float(v) for v in res.x)
    return (a, b) if math.isfinite(a) and math.isfinite(b) else (1.0, 0.0)


def fit_calibration(
    samples: np.ndarray,
    last_close: np.ndarray,
    true: np.ndarray,
    anchors: np.ndarray,
    levels: Sequence[float],
    lookback: int,
    fingerprint: str,
    holdout_fraction: float = 0.4,
    methods: Sequence[str] = METHODS,
    context_vol: np.ndarray | None = None,
    method: str = DEFAULT_METHOD,
    block: int = 1,
    session: dict | None = None,
) -> Calibration:
    """Fit the band correction ``method`` on validation forecasts (``"auto"``: the candidate of ``methods`` whose
    coverage on the later ``holdout_fraction`` of the anchors, fitted on the earlier part, is nearest nominal).

    Every candidate of ``methods`` is fitted too, on all anchors (``alternatives``), and its hold-out coverage kept
    (``holdout``), so a report can show all of them on the test anchors.

    ``samples [N, S, P]`` price paths, ``last_close [N]``, ``true [N, P]`` realised closes (all known), ``anchors
    [N]`` the anchor times (used to split the anchors in time for the method choice), ``context_vol [N]`` the
    context's log-return volatility (without it ``cqr_vol`` is not a candidate); ``block``: anchor dates per
    forecast horizon, for the interval of the fitted coverage (``coverage_after[level]["interval"]``); ``session``:
    an intraday volatility profile (:func:`fit_session_profile`; ``anchors`` are then the anchor times).
    """
    t0 = time.time()
    levels = check_levels(levels)
    samples = np.asarray(samples, dtype=float)
    last = np.asarray(last_close, dtype=float)
    true = np.asarray(true, dtype=float)
    ok = np.isfinite(true).all(axis=1) & np.isfinite(samples).all(axis=(1, 2)) & (last > 0)
    samples, last, true, anchors = samples[ok], last[ok], true[ok], np.asarray(anchors)[ok]
    vol = None if context_vol is None else np.asarray(context_vol, dtype=float)[ok]
    if method != "auto" and method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; expected one of {[*METHODS, 'auto']}")
    if vol is None:
        if method in VOL_METHODS:
            raise InputError(
                f"calibration method '{method}' needs each forecast's context_vol (pass context_vol="
                "kronos.evaluate.metrics.recent_volatility(context closes)), or choose another method"
            )
        methods = [m for m in methods if m not in VOL_METHODS]
    methods = list(dict.fromkeys([*methods, *([method] if method != "auto" else [])]))
    n, _, horizon = samples.shape
    if n < 10:
        raise InputError(
            f"calibration needs at least 10 validation forecasts with known targets, got {n}; "
            "lengthen the validation split or lower eval_stride"
        )
    z = path_returns(samples, last)
    y = true / last[:, None] - 1.0
    times = None  # the anchor times, for an intraday profile
    if session is not None:
        times = np.asarray(pd.DatetimeIndex(anchors).tz_localize(None), dtype="datetime64[ns]")
    base = dict(levels=levels, horizon=horizon, lookback=int(lookback), fingerprint=fingerprint)

    # time-ordered hold-out for the choice of method
    dates = np.unique(anchors)
    cut = dates[int(len(dates) * (1 - holdout_fraction))] if len(dates) >= 4 else None
    fit_rows = anchors < cut if cut is not None else np.ones(n, bool)
    held = ~fit_rows if cut is not None else np.ones(n, bool)
    holdout: dict[str, dict[str, Any]] = {}
    for m in methods:
        vf = None if vol is None else vol[fit_rows]
        vh = None if vol is None else vol[held]
        tf, th = (None, None) if times is None else (times[fit_rows], times[held])
        params = _fit_params(m, z[fit_rows], y[fit_rows], levels, vf, None, session, tf, lookback)
        cal = Calibration(method=m, params=params, **base)
        cov = _coverage(cal, samples[held], last[held], true[held], vh, times=th)
        err = float(np.mean([abs(cov[f"{lv:g}"]["coverage"] - lv) for lv in levels]))
        float(np.mean([cov[f"{lv:g}"]["width"] for lv in levels]))
        holdout[m] = {
            "coverage": {k: v["coverage"] for k, v in cov.items()},
            "width": {k: v["width"] for k, v in cov.items()},
            "mean_abs_error": err,
            "n_fit": int(fit_rows.sum()),
            "n_holdout": int(held.sum()),
        }
    chosen = (
        method
        if method != "auto"
        else min(
            methods,
            key=lambda m: (round(holdout[m]["mean_abs_error"], 3), float(np.mean(list(holdout[m]["width"].values())))),
        )
    )
    fit_levels = sorted(set(levels) | set(CRPS_LEVELS))  # the reported levels and the CRPS grid's
    alternatives = {
        m: _fit_params(m, z, y, fit_levels if m in BAND_METHODS else levels, vol, levels, session, times, lookback)
        for m in methods
        if m != "none"
    }
    cal = Calibration(method=chosen, params=alternatives.get(chosen, {}), score_levels=list(CRPS_LEVELS), **base)
    cal.alternatives = alternatives
    raw = Calibration(method="none", **base)
    cal.coverage_before = _coverage(raw, samples, last, true)
    # the fit's own uncertainty: its in-sample coverage with an interval over the validation dates
    cal.coverage_after = _coverage(cal, samples, last, true, vol, anchors, block, times)
    cal.holdout = holdout
    cal.n_anchors = int(n)

    # P(up): Platt on the logit of the raw share, pooled over steps (rows with no move left out)
    p_raw = cal.p_up_raw(samples, last)  # the raw share, as forecast records carry it
    moved = true != last[:, None]
    up = (true > last[:, None]).astype(float)
    a, b = _platt_fit(p_raw[moved], up[moved])
    cal.p_up = {"method": "platt", "a": a, "b": b}
    p_cal = platt(p_raw, a, b)
    rate = float(up[moved].mean()) if moved.any() else float("nan")
    cal.brier = {
        "raw": float(np.mean((p_raw[moved] - up[moved]) ** 2)) if moved.any() else float("nan"),
        "calibrated": float(np.mean((p_cal[moved] - up[moved]) ** 2)) if moved.any() else float("nan"),
        "base_rate": rate * (1 - rate),
        "up_rate": rate,
    }
    cal.seconds = round(time.time() - t0, 3)
    return cal


def calibrated_crps(
    cal: Calibration,
    samples: np.ndarray,
    last_close: np.ndarray,
    true: np.ndarray,
    context_vol: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
) -> np.ndarray | None:
    """CRPS ``[N, P]`` (price units) of the calibrated distribution at the realised closes ``true``: the grid CRPS
    of its quantiles at :data:`~kronos.evaluate.metrics.CRPS_GRID`; None for a calibration fitted without those
    levels (written before they were added: rerun `kronos calibrate`). ``anchors``: for adaptive bands."""
    if cal.method in BAND_METHODS and not all(f"{lv:g}" in cal.params for lv in CRPS_LEVELS):
        return None
    qv = cal.quantiles(samples, last_close, CRPS_GRID, context_vol, anchors=anchors)
    return quantile_crps(qv, np.asarray(true, dtype=float))


def validation_scores(cal: Calibration, fc: Any) -> dict:
    """CRPS / last close of the validation forecasts ``fc`` (PathForecasts) raw (fair estimator over its sample
    paths) and calibrated (grid CRPS; in-sample, since ``cal`` was fitted on them)."""
    ok = np.isfinite(fc.true).all(axis=1) & (fc.last_close > 0)
    last = fc.last_close[ok][:, None]
    raw = crps_samples(np.moveaxis(fc.samples[ok], 1, -1), fc.true[ok]) / last
    out = {
        "n_forecasts": int(ok.sum()),
        "n_dates": int(len(np.unique(fc.anchor[ok]))),
        "crps_rel": float(raw.mean()) if raw.size else float("nan"),
        "crps_rel_calibrated": None,
    }
    vol = None if fc.vol is None else fc.vol[ok]
    calibrated = calibrated_crps(cal, fc.samples[ok], fc.last_close[ok], fc.true[ok], vol, anchors=fc.anchor[ok])
    if calibrated is not None and calibrated.size:
        out["crps_rel_calibrated"] = float((calibrated / last).mean())
    return out


def calibration_anchors(cfg: Config, frame: Any, bounds: dict) -> Any:
    """The validation anchors the calibration is fitted on: :func:`~kronos.evaluate.rolling.select_anchors` with the
    config's stride and ``eval_max_anchors`` dates, raised to as many dates as ``calibration_min_forecasts`` needs
    when the symbols are few (a fit on 20 forecasts of one series is noise), at most every validation date."""
    ev = cfg.eval
    L, P = ev.lookback, ev.horizon
    after, until = bounds.get("train_end"), bounds.get("val_end")
    anchors = select_anchors(frame, after, until, L, P, ev.stride, ev.max_anchors)
    if ev.max_anchors and len(anchors) < ev.min_calibration_forecasts:
        every = select_anchors(frame, after, until, L, P, ev.stride, 0)
        per_date = len(every) / max(1, every["anchor"].nunique())
        dates = int(math.ceil(ev.min_calibration_forecasts / max(per_date, 1e-9)))
        if dates > ev.max_anchors:
            anchors = select_anchors(frame, after, until, L, P, ev.stride, dates)
            log.info(
                "calibration: %d validation anchor dates (eval_max_anchors=%d gives %d forecasts, fewer than "
                "calibration_min_forecasts=%d)", anchors["anchor"].nunique(), ev.max_anchors,
                int(round(per_date * ev.max_anchors)), ev.min_calibration_forecasts,
            )  # fmt: skip
    return anchors


def calibrate_on_validation(
    cfg: Config, predictor: Any, frame: Any, bounds: dict, out_path: str | os.PathLike | None = None
) -> Calibration:
    """Rolling forecasts at validation anchors (every target inside validation), fit, save ``calibration.json``.

    ``frame`` is the dataset's long frame (all splits, sorted by symbol and time); ``bounds`` the split dates of
    :func:`kronos.evaluate.anchors.split_dates`. Anchors: :func:`kronos.evaluate.rolling.select_anchors` (the one
    rule, with ``eval_stride`` and ``eval_max_anchors``).
    """
    t0 = time.time()
    ev = cfg.eval
    L, P = ev.lookback, ev.horizon
    anchors = calibration_anchors(cfg, frame, bounds)
    if len(anchors) < 10:
        raise InputError(
            f"calibration needs at least 10 validation anchors whose {P} target bars lie inside the validation "
            f"split ({bounds.get('val_start')} .. {bounds.get('val_end')}), found {len(anchors)}; lengthen the "
            "validation split, lower eval_stride or raise eval_max_anchors"
        )
    fc = rolling_paths("validation", predictor, frame, anchors, cfg, cfg.inference_seed)
    fp = model_fingerprint(predictor, L, P)
    # the report's central levels plus the bands the forecasts carry (quantiles q and 1 - q)
    level_set = {round(v, 10) for v in ev.levels}
    level_set |= {round(abs(2 * q - 1), 10) for q in ev.quantiles if 0 < q < 1 and abs(q - 0.5) > 1e-9}
    levels = sorted(level_set)
    cal = fit_calibration(
        fc.samples,
        fc.last_close,
        fc.true,
        fc.anchor,
        levels,
        L,
        fp,
        context_vol=fc.vol,
        method=ev.calibration_method,
        block=dates_per_horizon(frame["timestamps"], fc.anchor, P),
        session=fit_session_profile(frame, bounds.get("val_end")),  # intraday bars only; never a test bar
    )
    cal.validation = validation_scores(cal, fc)
    cal.seconds = round(time.time() - t0, 2)
    path = Path(out_path) if out_path is not None else calibration_path(cfg.finetuned_predictor)
    cal.save(path)
    # the validation outcomes: where the adaptive correction starts (kronos.inference.outcomes)
    kept = outcomes_path(path)
    if ev.half_life > 0 and cal.method == "vol_scaled":
        outcomes = BandOutcomes.from_forecasts(
            cal, fc.samples, fc.last_close, fc.true, fc.vol, target_times(frame, anchors, P),
            calendar=frame["timestamps"].unique(), half_life=ev.half_life, anchors=fc.anchor,
        )  # fmt: skip
        outcomes.save(kept)
    elif kept.is_file():
        kept.unlink()  # a static calibration: no outcomes of an earlier fit may adapt it
    log.info(
        "calibration (%s) fitted on %d validation forecasts in %.1fs: coverage %s -> %s; saved %s",
        cal.method,
        cal.n_anchors,
        cal.seconds,
        {k: round(v["coverage"], 3) for k, v in cal.coverage_before.items()},
        {k: round(v["coverage"], 3) for k, v in cal.coverage_after.items()},
        path,
    )
    return cal


__all__ = [
    "Calibration",
    "DEFAULT_METHOD",
    "METHODS",
    "apply_calibration",
    "calibrate_on_validation",
    "calibrated_crps",
    "calibration_path",
    "candidate",
    "fit_calibration",
    "load_calibration",
    "model_fingerprint",
    "validation_scores",
]
