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

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from kronos.errors import CheckpointError, InputError
from kronos import io as kio
from kronos.evaluate.metrics import check_levels

METHODS = ("vol_scaled", "cqr_vol", "cqr_additive", "cqr_multiplicative", "spread_scale", "none")
DEFAULT_METHOD = "vol_scaled"
BAND_METHODS = ("vol_scaled", "cqr_vol", "cqr_additive", "cqr_multiplicative")  # per-level parameters
VOL_METHODS = ("vol_scaled", "cqr_vol")  # need each forecast's context_vol
FORMAT_VERSION = 2
_EPS = 1e-9
_P_EPS = 1e-3


def model_fingerprint(model: Any, lookback: int, horizon: int) -> str:
    """sha256 of the predictor's weights (names, dtypes, shapes, bytes) plus the lookback and the horizon."""
    from kronos.model.hub import weights_sha256

    net = getattr(model, "model", model)  # a KronosPredictor or the Kronos module
    h = hashlib.sha256(weights_sha256(net).encode())
    h.update(f"lookback={int(lookback)}|horizon={int(horizon)}".encode())
    return h.hexdigest()


def _conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)/n empirical quantile of ``scores`` (finite-sample split-conformal guarantee)."""
    s = np.sort(scores[np.isfinite(scores)])
    n = s.size
    if n == 0:
        return float("nan")
    k = min(n, int(math.ceil((n + 1) * level)))
    return float(s[k - 1])


def _rel(samples: np.ndarray, last: np.ndarray) -> np.ndarray:
    return np.asarray(samples, dtype=float) / np.asarray(last, dtype=float)[:, None, None] - 1.0


@dataclass
class Calibration:
    """A fitted band correction (see the module docstring); load with :meth:`load`, apply with :meth:`quantiles`."""

    method: str
    levels: list
    horizon: int
    lookback: int
    fingerprint: str
    params: dict = field(default_factory=dict)  # {"<level>": [per-step value]} (cqr) | {"scale": [per step]}
    p_up: dict = field(default_factory=lambda: {"method": "platt", "a": 1.0, "b": 0.0})
    n_anchors: int = 0
    coverage_before: dict = field(default_factory=dict)
    coverage_after: dict = field(default_factory=dict)
    holdout: dict = field(default_factory=dict)  # method -> held-out coverage per level, error, width
    alternatives: dict = field(default_factory=dict)  # method -> params refitted on all anchors (for reports)
    brier: dict = field(default_factory=dict)
    seconds: float = 0.0
    version: int = FORMAT_VERSION
    # central levels also fitted (params) so the calibrated distribution has quantiles on the CRPS grid
    # (kronos.evaluate.metrics.CRPS_GRID); empty in files written before they were added
    score_levels: list = field(default_factory=list)
    # the model's scores on the validation forecasts it was fitted on: n_forecasts, crps_rel (raw paths, fair
    # estimator), crps_rel_calibrated (grid CRPS of the calibrated quantiles; in-sample for the fit)
    validation: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ checks and I/O
    def check(self, model: Any = None, lookback: Optional[int] = None, horizon: Optional[int] = None,
              source: str = "calibration") -> "Calibration":
        """Refuse (one line) a calibration fitted for another predictor, lookback or horizon."""
        if horizon is not None and int(horizon) != self.horizon:
            raise CheckpointError(f"{source} was fitted for a horizon of {self.horizon} bars, not {horizon}; "
                                  "rerun `kronos calibrate` with this predict_window")
        if lookback is not None and int(lookback) != self.lookback:
            raise CheckpointError(f"{source} was fitted for a lookback of {self.lookback} bars, not {lookback}; "
                                  "give that many bars of context or rerun `kronos calibrate`")
        if model is not None:
            fp = model_fingerprint(model, self.lookback, self.horizon)
            if fp != self.fingerprint:
                raise CheckpointError(f"{source} was fitted for another predictor (weights hash {self.fingerprint[:12]}"
                                      f" != {fp[:12]}); rerun `kronos calibrate` for this model")
        return self

    def to_dict(self) -> dict:
        return kio.to_jsonable(asdict(self))

    def save(self, path: Union[str, os.PathLike]) -> str:
        kio.write_json(path, self.to_dict())
        return str(path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} is not a calibration object; rerun `kronos calibrate`")
        try:
            obj = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise CheckpointError(f"{source} lacks required fields ({exc}); rerun `kronos calibrate`") from None
        if obj.version != FORMAT_VERSION:
            raise CheckpointError(f"{source} has format version {obj.version}, this kronos reads version "
                                  f"{FORMAT_VERSION}; rerun `kronos calibrate` to refit it")
        if obj.method not in METHODS:
            raise CheckpointError(f"{source} names an unknown method '{obj.method}'; expected one of {list(METHODS)}")
        try:
            obj.levels = check_levels(obj.levels, what=f"{source}: nominal level")
        except InputError as exc:
            raise CheckpointError(str(exc)) from None
        if not isinstance(obj.horizon, int) or obj.horizon < 1 or not isinstance(obj.lookback, int):
            raise CheckpointError(f"{source} has an invalid horizon/lookback; rerun `kronos calibrate`")
        need = [f"{lv:g}" for lv in obj.levels] if obj.method in BAND_METHODS else (
            ["scale"] if obj.method == "spread_scale" else [])
        for key in need:
            vals = obj.params.get(key) if isinstance(obj.params, dict) else None
            if not isinstance(vals, list) or len(vals) != obj.horizon or not all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
                raise CheckpointError(f"{source}: parameter '{key}' must list {obj.horizon} finite numbers; "
                                      "rerun `kronos calibrate`")
        center = obj.params.get("center") if isinstance(obj.params, dict) else None
        if center is not None and (not isinstance(center, list) or len(center) != obj.horizon or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in center)):
            raise CheckpointError(f"{source}: parameter 'center' must list {obj.horizon} finite numbers; "
                                  "rerun `kronos calibrate`")
        if not all(isinstance(obj.p_up.get(k), (int, float)) for k in ("a", "b")):
            raise CheckpointError(f"{source}: p_up needs numbers 'a' and 'b'; rerun `kronos calibrate`")
        return obj

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Calibration":
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"calibration file '{p}' not found; run `kronos calibrate` first")
        try:
            data = kio.read_json(p)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"calibration file '{p}' is not valid JSON ({exc}); rerun `kronos calibrate`") from None
        return cls.from_dict(data, source=f"calibration file '{p}'")

    # ------------------------------------------------------------------ application
    def _level_of(self, q: float) -> Optional[float]:
        if abs(q - 0.5) < 1e-12:
            return None
        lv = abs(2.0 * q - 1.0)
        for fitted in self.levels:
            if abs(fitted - lv) < 1e-9:
                return fitted
        return lv

    def quantiles(self, samples: np.ndarray, last_close: np.ndarray, qs: Sequence[float],
                  context_vol: Optional[np.ndarray] = None) -> np.ndarray:
        """Calibrated quantiles ``[len(qs), N, P]`` (price units) from sample paths ``[N, S, P]``; ``context_vol
        [N]`` (:func:`kronos.evaluate.metrics.recent_volatility` of each context's closes) is needed by
        ``vol_scaled`` and ``cqr_vol``."""
        samples = np.asarray(samples, dtype=float)
        last = np.asarray(last_close, dtype=float)
        if samples.ndim != 3 or samples.shape[2] != self.horizon:
            raise InputError(f"calibration expects sample paths [N, S, {self.horizon}], got {samples.shape}")
        z = _rel(samples, last)
        med = np.median(z, axis=1)
        steps = np.broadcast_to(np.arange(self.horizon), med.shape)
        out = []
        for q in qs:
            q = float(q)
            if not 0.0 <= q <= 1.0:
                raise InputError(f"quantile {q} is outside [0, 1]")
            lv = self._level_of(q)
            if lv is None or self.method in ("none", "spread_scale"):
                lo = hi = None
            else:
                lo, hi = np.quantile(z, [(1 - lv) / 2, (1 + lv) / 2], axis=1)
            vol = None if context_vol is None else np.asarray(context_vol, dtype=float)[:, None]
            out.append(last[:, None] * (1.0 + self._adjust(q, np.quantile(z, q, axis=1), lo, hi, med, steps, vol)))
        return np.stack(out)

    def _adjust(self, q: float, r_q: np.ndarray, r_lo: Optional[np.ndarray], r_hi: Optional[np.ndarray],
                med: np.ndarray, step_idx: np.ndarray, vol: Optional[np.ndarray] = None,
                use_center: bool = True) -> np.ndarray:
        """The calibrated q-quantile in return space from the raw one (and the raw band of its level, the median);
        ``step_idx`` (0-based horizon step) picks the per-step parameter."""
        lv = self._level_of(q)
        if use_center and self.method == "vol_scaled" and "center" in self.params:  # centre shrunk toward last close
            med = med * np.asarray(self.params["center"], dtype=float)[step_idx]
            if lv is None:
                return med
        if lv is None or self.method == "none":
            return r_q
        if self.method in VOL_METHODS and vol is None:
            raise InputError(f"this calibration ({self.method}) needs the recent volatility of each forecast's "
                             "context (context_vol: kronos.evaluate.metrics.recent_volatility of its closes)")
        if self.method == "spread_scale":
            k = np.asarray(self.params["scale"], dtype=float)[step_idx]
            return med + k * (r_q - med)
        key = f"{lv:g}"
        if key not in self.params:
            raise InputError(f"quantile {q:g} (central level {lv:g}) was not calibrated; calibrated quantiles: "
                             f"{self.quantile_levels()} (levels {self.levels})")
        corr = np.asarray(self.params[key], dtype=float)[step_idx]
        lower = q < 0.5
        if self.method == "vol_scaled":
            half = corr * _vol_scale(r_lo, r_hi, vol, step_idx + 1.0, lv)
            return np.maximum(med - half, _MIN_RETURN) if lower else med + half
        if self.method == "cqr_vol":
            corr = corr * vol * np.sqrt(step_idx + 1.0)
        if self.method in ("cqr_additive", "cqr_vol"):
            return np.minimum(r_lo - corr, med) if lower else np.maximum(r_hi + corr, med)
        return med - corr * np.maximum(med - r_lo, _MIN_HALF) if lower else med + corr * np.maximum(r_hi - med, _MIN_HALF)

    def quantile_levels(self) -> list:
        return sorted({round((1 - lv) / 2, 10) for lv in self.levels} | {0.5} | {round((1 + lv) / 2, 10)
                                                                                 for lv in self.levels})

    def calibrated_samples(self, samples: np.ndarray, last_close: np.ndarray) -> np.ndarray:
        """Sample paths with the spread correction applied (unchanged for the CQR methods and ``none``)."""
        if self.method != "spread_scale":
            return np.asarray(samples, dtype=float)
        last = np.asarray(last_close, dtype=float)
        z = _rel(samples, last)
        med = np.median(z, axis=1, keepdims=True)
        k = np.asarray(self.params["scale"], dtype=float)[None, None, :]
        return last[:, None, None] * (1.0 + med + k * (z - med))

    def crps(self, samples: np.ndarray, last_close: np.ndarray, true: np.ndarray,
             context_vol: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """CRPS ``[N, P]`` (price units) of the calibrated distribution at the realised closes ``true``: the grid CRPS
        of its quantiles at :data:`~kronos.evaluate.metrics.CRPS_GRID`; None for a calibration fitted without those
        levels (written before they were added: rerun `kronos calibrate`)."""
        from kronos.evaluate.metrics import CRPS_GRID, CRPS_LEVELS, quantile_crps

        if self.method in BAND_METHODS and not all(f"{lv:g}" in self.params for lv in CRPS_LEVELS):
            return None
        qv = self.quantiles(samples, last_close, CRPS_GRID, context_vol)
        return quantile_crps(qv, np.asarray(true, dtype=float))

    def p_up_raw(self, samples: np.ndarray, last_close: np.ndarray) -> np.ndarray:
        """The package's P(up) rule (:func:`kronos.inference.predictor.prob_up`) on close paths ``[N, S, P]``."""
        from kronos.inference.predictor import prob_up

        return prob_up(samples, np.asarray(last_close, dtype=float))

    def p_up_calibrated(self, samples: np.ndarray, last_close: np.ndarray) -> np.ndarray:
        """Platt-scaled P(close at step h > last close) ``[N, P]``."""
        return _platt(self.p_up_raw(samples, last_close), self.p_up["a"], self.p_up["b"])


_MIN_RETURN = -0.9999  # a lower band never reaches a price of zero
_MIN_HALF = 1e-4  # cqr_multiplicative: a raw half-band narrower than 0.01% counts as 0.01% (no division by ~0)


def _vol_scale(r_lo: np.ndarray, r_hi: np.ndarray, vol: np.ndarray, h: Any, level: float) -> np.ndarray:
    """``vol_scaled``'s difficulty: sqrt(vol^2 h + sd^2), a random walk's spread at step ``h`` combined with the
    model's own (``sd``: the half-width of its raw ``level`` band over the normal quantile of that level)."""
    from scipy.stats import norm

    sd = np.maximum(np.asarray(r_hi, dtype=float) - np.asarray(r_lo, dtype=float), 0.0) / (2.0 * norm.ppf(
        (1.0 + level) / 2.0))
    return np.sqrt(np.asarray(vol, dtype=float) ** 2 * h + sd ** 2) + _EPS


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


def _cqr_fit(method: str, z: np.ndarray, y: np.ndarray, level: float, vol: Optional[np.ndarray] = None,
             center: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-step conformal correction for one level from paths ``z [N,S,P]`` and outcomes ``y [N,P]`` (returns);
    ``center [P]`` (vol_scaled) shrinks the median toward the last close."""
    lo, hi = np.quantile(z, [(1 - level) / 2, (1 + level) / 2], axis=1)
    med = np.median(z, axis=1)
    if center is not None:
        med = med * np.asarray(center, dtype=float)[None, :]
    if method == "vol_scaled":
        scores = np.abs(y - med) / _vol_scale(lo, hi, vol[:, None], np.arange(1, z.shape[2] + 1)[None, :], level)
    elif method in ("cqr_additive", "cqr_vol"):
        scores = np.maximum(lo - y, y - hi)
        if method == "cqr_vol":
            scores = scores / (vol[:, None] * np.sqrt(np.arange(1, z.shape[2] + 1))[None, :])
    else:
        scores = np.maximum((med - y) / np.maximum(med - lo, _MIN_HALF), (y - med) / np.maximum(hi - med, _MIN_HALF))
    return np.array([_conformal_quantile(scores[:, k], level) for k in range(z.shape[2])])


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


def _fit_params(method: str, z: np.ndarray, y: np.ndarray, levels: Sequence[float],
                vol: Optional[np.ndarray] = None) -> dict:
    if method == "none":
        return {}
    if method == "spread_scale":
        return {"scale": [float(v) for v in _spread_fit(z, y, levels)]}
    out: dict = {}
    center = None
    if method == "vol_scaled":
        center = _center_fit(z, y, vol)
        out["center"] = [float(v) for v in center]
    for lv in levels:
        corr = _cqr_fit(method, z, y, lv, vol, center)
        out[f"{lv:g}"] = [float(v) if np.isfinite(v) else (1.0 if method == "cqr_multiplicative" else 0.0)
                          for v in corr]
    return out


def _coverage(cal: Calibration, samples: np.ndarray, last: np.ndarray, true: np.ndarray,
              vol: Optional[np.ndarray] = None) -> dict:
    """Coverage (overall and per step) and mean relative width of each central level."""
    out = {}
    for lv in cal.levels:
        lo, hi = cal.quantiles(samples, last, [(1 - lv) / 2, (1 + lv) / 2], vol)
        inside = (true >= lo) & (true <= hi)
        out[f"{lv:g}"] = {"coverage": float(inside.mean()), "by_step": [float(v) for v in inside.mean(axis=0)],
                          "width": float(np.mean((hi - lo) / last[:, None]))}
    return out


def candidate(cal: "Calibration", method: str) -> "Calibration":
    """The calibration as if ``method`` had been chosen (its parameters from ``alternatives``)."""
    if method == cal.method:
        return cal
    if method != "none" and method not in cal.alternatives:
        raise InputError(f"calibration has no fitted parameters for method '{method}'")
    return Calibration(method=method, levels=cal.levels, horizon=cal.horizon, lookback=cal.lookback,
                       fingerprint=cal.fingerprint, params=cal.alternatives.get(method, {}), p_up=cal.p_up)


def _platt(p: np.ndarray, a: float, b: float) -> np.ndarray:
    x = np.log(np.clip(p, _P_EPS, 1 - _P_EPS) / (1 - np.clip(p, _P_EPS, 1 - _P_EPS)))
    return 1.0 / (1.0 + np.exp(-(a * x + b)))


def _platt_fit(p: np.ndarray, up: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import minimize

    x = np.log(np.clip(p, _P_EPS, 1 - _P_EPS) / (1 - np.clip(p, _P_EPS, 1 - _P_EPS)))
    if x.size < 10 or up.min() == up.max():
        return 1.0, 0.0

    def loss(w):
        s = w[0] * x + w[1]
        return float(np.mean(np.logaddexp(0.0, s) - up * s) + 1e-4 * (w[0] - 1.0) ** 2)

    res = minimize(loss, np.array([1.0, 0.0]), method="L-BFGS-B")
    a, b = (float(v) for v in res.x)
    return (a, b) if math.isfinite(a) and math.isfinite(b) else (1.0, 0.0)


def fit_calibration(samples: np.ndarray, last_close: np.ndarray, true: np.ndarray, anchors: np.ndarray,
                    levels: Sequence[float], lookback: int, fingerprint: str, holdout_fraction: float = 0.4,
                    methods: Sequence[str] = METHODS, context_vol: Optional[np.ndarray] = None,
                    method: str = DEFAULT_METHOD) -> Calibration:
    """Fit the band correction ``method`` on validation forecasts (``"auto"``: the candidate of ``methods`` whose
    coverage on the later ``holdout_fraction`` of the anchors, fitted on the earlier part, is nearest nominal).

    Every candidate of ``methods`` is fitted too, on all anchors (``alternatives``), and its hold-out coverage kept
    (``holdout``), so a report can show all of them on the test anchors.

    ``samples [N, S, P]`` price paths, ``last_close [N]``, ``true [N, P]`` realised closes (all known), ``anchors
    [N]`` the anchor times (used to split the anchors in time for the method choice), ``context_vol [N]`` the
    context's log-return volatility (without it ``cqr_vol`` is not a candidate).
    """
    import time

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
            raise InputError(f"calibration method '{method}' needs each forecast's context_vol (pass context_vol="
                             "kronos.evaluate.metrics.recent_volatility(context closes)), or choose another method")
        methods = [m for m in methods if m not in VOL_METHODS]
    methods = list(dict.fromkeys([*methods, *([method] if method != "auto" else [])]))
    n, _, horizon = samples.shape
    if n < 10:
        raise InputError(f"calibration needs at least 10 validation forecasts with known targets, got {n}; "
                         "lengthen the validation split or lower eval_stride")
    z = _rel(samples, last)
    y = true / last[:, None] - 1.0
    base = dict(levels=levels, horizon=horizon, lookback=int(lookback), fingerprint=fingerprint)

    # time-ordered hold-out for the choice of method
    dates = np.unique(anchors)
    cut = dates[int(len(dates) * (1 - holdout_fraction))] if len(dates) >= 4 else None
    fit_rows = anchors < cut if cut is not None else np.ones(n, bool)
    held = ~fit_rows if cut is not None else np.ones(n, bool)
    holdout = {}
    for m in methods:
        vf = None if vol is None else vol[fit_rows]
        vh = None if vol is None else vol[held]
        cal = Calibration(method=m, params=_fit_params(m, z[fit_rows], y[fit_rows], levels, vf), **base)
        cov = _coverage(cal, samples[held], last[held], true[held], vh)
        err = float(np.mean([abs(cov[f"{lv:g}"]["coverage"] - lv) for lv in levels]))
        width = float(np.mean([cov[f"{lv:g}"]["width"] for lv in levels]))
        holdout[m] = {"coverage": {k: v["coverage"] for k, v in cov.items()},
                      "width": {k: v["width"] for k, v in cov.items()}, "mean_abs_error": err,
                      "n_fit": int(fit_rows.sum()), "n_holdout": int(held.sum())}
    chosen = method if method != "auto" else min(methods, key=lambda m: (
        round(holdout[m]["mean_abs_error"], 3), float(np.mean(list(holdout[m]["width"].values())))))
    from kronos.evaluate.metrics import CRPS_LEVELS

    fit_levels = sorted(set(levels) | set(CRPS_LEVELS))  # the reported levels and the CRPS grid's
    alternatives = {m: _fit_params(m, z, y, fit_levels if m in BAND_METHODS else levels, vol)
                    for m in methods if m != "none"}
    cal = Calibration(method=chosen, params=alternatives.get(chosen, {}), score_levels=list(CRPS_LEVELS), **base)
    cal.alternatives = alternatives
    raw = Calibration(method="none", **base)
    cal.coverage_before = _coverage(raw, samples, last, true)
    cal.coverage_after = _coverage(cal, samples, last, true, vol)
    cal.holdout = holdout
    cal.n_anchors = int(n)

    # P(up): Platt on the logit of the raw share, pooled over steps (rows with no move left out)
    p_raw = cal.p_up_raw(samples, last)  # the raw share, as forecast records carry it
    moved = true != last[:, None]
    up = (true > last[:, None]).astype(float)
    a, b = _platt_fit(p_raw[moved], up[moved])
    cal.p_up = {"method": "platt", "a": a, "b": b}
    p_cal = _platt(p_raw, a, b)
    rate = float(up[moved].mean()) if moved.any() else float("nan")
    cal.brier = {"raw": float(np.mean((p_raw[moved] - up[moved]) ** 2)) if moved.any() else float("nan"),
                 "calibrated": float(np.mean((p_cal[moved] - up[moved]) ** 2)) if moved.any() else float("nan"),
                 "base_rate": rate * (1 - rate), "up_rate": rate}
    cal.seconds = round(time.time() - t0, 3)
    return cal


_QCOL = re.compile(r"^(open|high|low|close)_q(\d*\.?\d+(?:[eE][-+]?\d+)?)$")


def apply_calibration(records: Any, calibration: Any, model: Any = None, lookback: Optional[int] = None) -> Any:
    """Calibrate the quantile columns (``open/high/low/close_q{q}``) and ``p_up`` of forecast records in place of
    the raw ones, which are kept as ``{column}_raw``; ``p_up_calibrated`` holds the calibrated P(up).

    Records are long (one row per forecast and ``step``) with ``last_close``; the band of every price column is
    corrected in return space relative to ``last_close`` with the parameters fitted on close. The median comes
    from the ``close_q0.5`` column (the mean ``close`` when absent). ``model``/``lookback`` (optional) are checked
    against the calibration's fingerprint.
    """
    import pandas as pd

    cal = load_calibration(calibration)
    if model is not None or lookback is not None:
        cal.check(model, lookback=lookback, source="calibration")
    if not isinstance(records, pd.DataFrame):
        raise InputError(f"records must be a DataFrame, got {type(records).__name__}")
    missing = [c for c in ("step", "last_close") if c not in records.columns]
    if missing:
        raise InputError(f"records lack column(s) {missing} needed to apply a calibration")
    out = records.copy()
    steps = out["step"].to_numpy(dtype=int)
    if len(steps) and (steps.min() < 1 or steps.max() > cal.horizon):
        raise CheckpointError(f"calibration was fitted for a horizon of {cal.horizon} bars; records reach step "
                              f"{steps.max()}; rerun `kronos calibrate` with this predict_window")
    idx = steps - 1
    last = out["last_close"].to_numpy(dtype=float)
    vol = None
    if cal.method in VOL_METHODS:
        if "context_vol" not in out.columns:
            raise InputError(f"this calibration ({cal.method}) needs a 'context_vol' column in the records (the "
                             "recent volatility of each context's closes; predict_df writes it)")
        vol = out["context_vol"].to_numpy(dtype=float)
    cols: dict[str, dict[float, str]] = {}
    for c in out.columns:
        m = _QCOL.match(str(c))
        if m:
            cols.setdefault(m.group(1), {})[float(m.group(2))] = c
    for base, qcols in cols.items():
        rel = {q: out[c].to_numpy(dtype=float) / last - 1.0 for q, c in qcols.items()}
        if 0.5 in rel:
            med = rel[0.5]
        else:
            med = out[base].to_numpy(dtype=float) / last - 1.0 if base in out.columns else None
            if med is None:
                raise InputError(f"records need '{base}_q0.5' (or '{base}') to apply a calibration")
        new = {}
        for q, c in qcols.items():
            lv = cal._level_of(q)
            r_lo = r_hi = None
            if lv is not None and cal.method in BAND_METHODS:
                q_lo, q_hi = round((1 - lv) / 2, 10), round((1 + lv) / 2, 10)
                partner = [qq for qq in (q_lo, q_hi) if not any(abs(qq - k) < 1e-9 for k in rel)]
                if partner:
                    raise InputError(f"calibrating '{c}' needs the column '{base}_q{partner[0]:g}' too "
                                     f"(the other end of its {lv:g} band)")
                r_lo = next(v for k, v in rel.items() if abs(k - q_lo) < 1e-9)
                r_hi = next(v for k, v in rel.items() if abs(k - q_hi) < 1e-9)
            # the centre's shrink was fitted on close; open/high/low keep their own medians (high sits above close)
            new[c] = last * (1.0 + cal._adjust(q, rel[q], r_lo, r_hi, med, idx, vol, use_center=base == "close"))
        for c, v in new.items():
            out[f"{c}_raw"] = out[c]
            out[c] = v
    if "p_up" in out.columns:
        out["p_up_raw"] = out["p_up"]
        out["p_up_calibrated"] = _platt(out["p_up"].to_numpy(dtype=float), cal.p_up["a"], cal.p_up["b"])
    return out


def load_calibration(calibration: Union[str, os.PathLike, Calibration, dict, None]) -> Optional[Calibration]:
    """A :class:`Calibration` from a path, a dict or an object (None stays None)."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, dict):
        return Calibration.from_dict(calibration)
    if isinstance(calibration, (str, os.PathLike)):
        return Calibration.load(calibration)
    raise InputError(f"calibration must be a path, a dict or a Calibration, got {type(calibration).__name__}")


def calibration_path(predictor_path: Union[str, os.PathLike]) -> Path:
    """Where ``calibration.json`` lives: beside the predictor's ``best_model`` folder."""
    return Path(predictor_path).parent / "calibration.json"


def validation_scores(cal: Calibration, fc: Any) -> dict:
    """CRPS / last close of the validation forecasts ``fc`` (PathForecasts) raw (fair estimator over its sample
    paths) and calibrated (grid CRPS; in-sample, since ``cal`` was fitted on them)."""
    from kronos.evaluate.metrics import crps_samples

    ok = np.isfinite(fc.true).all(axis=1) & (fc.last_close > 0)
    last = fc.last_close[ok][:, None]
    raw = crps_samples(np.moveaxis(fc.samples[ok], 1, -1), fc.true[ok]) / last
    out = {"n_forecasts": int(ok.sum()), "n_dates": int(len(np.unique(fc.anchor[ok]))),
           "crps_rel": float(raw.mean()) if raw.size else float("nan"), "crps_rel_calibrated": None}
    vol = None if fc.vol is None else fc.vol[ok]
    calibrated = cal.crps(fc.samples[ok], fc.last_close[ok], fc.true[ok], vol)
    if calibrated is not None and calibrated.size:
        out["crps_rel_calibrated"] = float((calibrated / last).mean())
    return out


def calibrate_on_validation(cfg: Any, predictor: Any, frame: Any, bounds: dict,
                            out_path: Union[str, os.PathLike, None] = None) -> Calibration:
    """Rolling forecasts at validation anchors (every target inside validation), fit, save ``calibration.json``.

    ``frame`` is the dataset's long frame (all splits, sorted by symbol and time); ``bounds`` the split dates of
    :func:`kronos.evaluate.report.split_bounds`. Anchors follow ``eval_stride`` and ``eval_max_anchors``.
    """
    import logging
    import time

    from kronos.evaluate.report import model_paths, select_anchors

    t0 = time.time()
    L, P = int(cfg.lookback_window), int(cfg.predict_window)
    anchors = select_anchors(frame, bounds.get("train_end"), bounds.get("val_end"), L, P, cfg.eval_stride,
                             cfg.eval_max_anchors)
    if len(anchors) < 10:
        raise InputError(
            f"calibration needs at least 10 validation anchors whose {P} target bars lie inside the validation "
            f"split ({bounds.get('val_start')} .. {bounds.get('val_end')}), found {len(anchors)}; lengthen the "
            "validation split, lower eval_stride or raise eval_max_anchors"
        )
    fc = model_paths("validation", predictor, frame, anchors, cfg, int(cfg.inference_seed))
    fp = model_fingerprint(predictor, L, P)
    # the report's central levels plus the bands the forecasts carry (quantiles q and 1 - q)
    levels = {round(float(v), 10) for v in (getattr(cfg, "interval_levels", None) or [0.5, 0.8])}
    levels |= {round(abs(2 * float(q) - 1), 10) for q in getattr(cfg, "quantiles", []) if 0 < float(q) < 1
               and abs(float(q) - 0.5) > 1e-9}
    levels = sorted(levels)
    cal = fit_calibration(fc.samples, fc.last_close, fc.true, fc.anchor, levels, L, fp, context_vol=fc.vol,
                          method=str(getattr(cfg, "calibration_method", DEFAULT_METHOD)))
    cal.validation = validation_scores(cal, fc)
    cal.seconds = round(time.time() - t0, 2)
    path = Path(out_path) if out_path is not None else calibration_path(cfg.finetuned_predictor)
    cal.save(path)
    logging.getLogger(__name__).info(
        "calibration (%s) fitted on %d validation forecasts in %.1fs: coverage %s -> %s; saved %s", cal.method,
        cal.n_anchors, cal.seconds, {k: round(v["coverage"], 3) for k, v in cal.coverage_before.items()},
        {k: round(v["coverage"], 3) for k, v in cal.coverage_after.items()}, path)
    return cal


__all__ = ["Calibration", "apply_calibration", "calibrate_on_validation", "DEFAULT_METHOD", "METHODS", "calibration_path", "fit_calibration", "load_calibration", "model_fingerprint"]
