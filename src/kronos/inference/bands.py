"""Forecast bands at run time: quantiles and P(up) of sample paths, recent volatility, and applying a saved
calibration (plain NumPy; no plotting, no fitting).

A :class:`Calibration` is fitted on validation forecasts by :mod:`kronos.evaluate.calibration` (the module that
documents the methods) and saved as ``calibration.json``; this module loads it, checks that it belongs to the
predictor, and applies it to sample paths (:meth:`Calibration.quantiles`, :meth:`Calibration.p_up_calibrated`) or to
forecast records (:func:`apply_calibration`). The forecast-record column names for quantiles are made and parsed
here only (:func:`quantile_column`, :data:`QUANTILE_COLUMN`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, overload

import numpy as np
import pandas as pd

from kronos import io as kio
from kronos.errors import CheckpointError, InputError
from kronos.model.hub import weights_sha256

METHODS = ("vol_scaled", "cqr_vol", "cqr_additive", "cqr_multiplicative", "spread_scale", "none")
DEFAULT_METHOD = "vol_scaled"
BAND_METHODS = ("vol_scaled", "cqr_vol", "cqr_additive", "cqr_multiplicative")  # per-level parameters
VOL_METHODS = ("vol_scaled", "cqr_vol")  # need each forecast's context_vol
FORMAT_VERSION = 2
EPS = 1e-9
P_EPS = 1e-3  # probabilities are clipped to [P_EPS, 1 - P_EPS] before their logit
VOL_HALFLIFE = 10  # bars; the half-life of recent_volatility's exponential weights

# forecast-record quantile columns: "{column}_q{level:g}" (e.g. close_q0.1), parsed by QUANTILE_COLUMN
QUANTILE_COLUMN = re.compile(r"^(open|high|low|close|volume|amount)_q(\d*\.?\d+(?:[eE][-+]?\d+)?)$")


def quantile_column(q: float, column: str = "close") -> str:
    """The forecast-record column of quantile level ``q`` of ``column`` (``close_q0.1``)."""
    return f"{column}_q{float(q):g}"


def quantile_columns(records: pd.DataFrame, column: str = "close") -> dict[float, str]:
    """``{level: column name}`` of the quantile columns of ``column`` in ``records``, sorted by level."""
    found = {}
    for name in records.columns:
        m = QUANTILE_COLUMN.match(str(name))
        if m and m.group(1) == column:
            found[float(m.group(2))] = str(name)
    return dict(sorted(found.items()))


def check_quantiles(quantiles: Sequence[float]) -> list[float]:
    """``quantiles`` as a list of floats in [0, 1]; one-line InputError otherwise."""
    try:
        qs = [float(q) for q in quantiles]
    except (TypeError, ValueError):
        raise InputError(f"quantiles must be numbers in [0, 1], got {quantiles!r}") from None
    if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
        raise InputError(f"quantiles must be numbers in [0, 1], got {list(quantiles)!r}")
    return qs


def check_levels(levels: Sequence[float], what: str = "nominal level") -> list[float]:
    """Levels must be numbers strictly inside (0, 1); returns them as floats."""
    out = []
    for v in levels:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{what} {v!r} is not a number; use values strictly between 0 and 1") from None
        if not 0.0 < f < 1.0:
            raise InputError(f"{what} {v!r} is outside (0, 1); use values strictly between 0 and 1 (e.g. 0.8)")
        out.append(f)
    return out


def sample_quantiles(samples: np.ndarray, quantiles: Sequence[float], axis: int = 0) -> np.ndarray:
    """The package's one quantile rule for sample paths: NumPy's linear interpolation over the sample ``axis``.

    Returns ``[len(quantiles), *rest]``; :meth:`KronosPredictor.predict_quantiles` and
    :meth:`KronosPredictor.predict_df` both use it.
    """
    samples = np.asarray(samples)
    # one level at a time: a scalar level keeps the samples' dtype (float32 paths give float32 quantiles)
    return np.stack([np.quantile(samples, q, axis=axis) for q in check_quantiles(quantiles)])


def prob_up(close_paths: np.ndarray, last_close: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Probability of an up move per horizon step: the share of sample paths whose close is strictly above the last
    close of the context. ``close_paths [..., S, P]`` (prices), ``last_close`` a number or ``[...]``; returns
    ``[..., P]`` in [0, 1] (float64). The package's one P(up) rule (the predictor's ``return_p_up`` uses it)."""
    paths = np.asarray(close_paths)
    if paths.ndim < 2:
        raise InputError(f"close_paths must be [..., samples, steps], got shape {paths.shape}")
    last = np.asarray(last_close, dtype=np.float64)[..., None, None]
    return np.mean(paths > last, axis=-2)


def log_returns(close: np.ndarray) -> np.ndarray:
    """One-bar log-returns along the last axis of closes ``[..., L]`` (``[..., L-1]``; NaN where undefined)."""
    c = np.asarray(close, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.diff(np.log(c), axis=-1)
    return np.where(np.isfinite(r), r, np.nan)


def recent_volatility(close: np.ndarray, halflife: float = VOL_HALFLIFE) -> np.ndarray:
    """Exponentially weighted RMS of the log-returns of context closes ``[..., L]`` (weights halve every
    ``halflife`` bars back from the last bar; RiskMetrics-style, no mean removed); tiny floor so it divides.

    This is the volatility the calibration scales its bands by (``context_vol`` in forecast records): it follows a
    change of regime within a couple of weeks of daily bars, where the whole context's standard deviation lags by
    the length of the context.
    """
    r = log_returns(close)
    ok = np.isfinite(r)
    if r.shape[-1] < 1:
        return np.full(r.shape[:-1], 1e-8)
    w = 0.5 ** (np.arange(r.shape[-1])[::-1] / float(halflife))
    w = np.broadcast_to(w, r.shape) * ok
    with np.errstate(all="ignore"):
        vol = np.sqrt(np.sum(w * np.where(ok, r, 0.0) ** 2, axis=-1) / np.sum(w, axis=-1))
    return np.maximum(np.nan_to_num(vol, nan=1e-8), 1e-8)


def model_fingerprint(model: Any, lookback: int, horizon: int) -> str:
    """sha256 of the predictor's weights (names, dtypes, shapes, bytes) plus the lookback and the horizon."""
    net = getattr(model, "model", model)  # a KronosPredictor or the Kronos module
    h = hashlib.sha256(weights_sha256(net).encode())
    h.update(f"lookback={int(lookback)}|horizon={int(horizon)}".encode())
    return h.hexdigest()


def bar_minutes(times: Any) -> np.ndarray:
    """Minutes since midnight of each bar time (the slot of the trading day it belongs to)."""
    t = pd.DatetimeIndex(times) if isinstance(times, (pd.DatetimeIndex, pd.Series)) else None
    t = t if t is not None else pd.DatetimeIndex(np.atleast_1d(np.asarray(times)))  # wall-clock time, as given
    return np.asarray(t.hour * 60 + t.minute, dtype=np.int64)


def session_time(session: dict, anchors: Any, horizon: int, lookback: int) -> tuple[np.ndarray, np.ndarray]:
    """The intraday volatility profile applied to forecasts anchored at ``anchors [N]`` (each forecast's last known
    bar): ``(ctx [N], tau [N, P])``. ``session`` (``vol_scaled``'s ``session`` parameter, fitted on bars before the
    test split by :func:`kronos.evaluate.calibration.fit_session_profile`) holds the bar slots of the trading day
    (``minutes`` since midnight) and each slot's share of the variance (``weight``, mean 1). ``ctx`` is the profile
    weight that :func:`recent_volatility`'s exponential weights give the context's bars (so ``vol / sqrt(ctx)`` is the
    context's volatility per unit of profile), ``tau[:, k]`` the profile summed over the ``k + 1`` target bars (the
    variance time of the horizon: a 5-minute horizon crossing a night and the next open weighs the open's gap, a
    midday one the quiet lunch bars). Anchors off the grid take the slot at or before them."""
    minutes = np.asarray(session["minutes"], dtype=np.int64)
    weight = np.asarray(session["weight"], dtype=float)
    slots = len(minutes)
    at = bar_minutes(anchors)
    i0 = np.searchsorted(minutes, at, side="right") - 1  # before the first slot: the last slot of the day before
    back = np.arange(max(int(lookback) - 1, 1))
    ew = 0.5 ** (back / float(VOL_HALFLIFE))
    ctx = (weight[(i0[:, None] - back[None, :]) % slots] * ew).sum(axis=1) / ew.sum()
    tau = np.cumsum(weight[(i0[:, None] + np.arange(1, int(horizon) + 1)[None, :]) % slots], axis=1)
    return np.maximum(ctx, EPS), tau


def path_returns(samples: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Sample paths ``[N, S, P]`` as returns relative to each forecast's last close ``[N]``."""
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
    def check(
        self, model: Any = None, lookback: int | None = None, horizon: int | None = None, source: str = "calibration"
    ) -> Calibration:
        """Refuse (one line) a calibration fitted for another predictor, lookback or horizon."""
        if horizon is not None and int(horizon) != self.horizon:
            raise CheckpointError(
                f"{source} was fitted for a horizon of {self.horizon} bars, not {horizon}; "
                "rerun `kronos calibrate` with this predict_window"
            )
        if lookback is not None and int(lookback) != self.lookback:
            raise CheckpointError(
                f"{source} was fitted for a lookback of {self.lookback} bars, not {lookback}; "
                "give that many bars of context or rerun `kronos calibrate`"
            )
        if model is not None:
            fp = model_fingerprint(model, self.lookback, self.horizon)
            if fp != self.fingerprint:
                raise CheckpointError(
                    f"{source} was fitted for another predictor (weights hash {self.fingerprint[:12]}"
                    f" != {fp[:12]}); rerun `kronos calibrate` for this model"
                )
        return self

    def to_dict(self) -> dict:
        return kio.to_jsonable(asdict(self))

    def save(self, path: str | os.PathLike) -> str:
        kio.write_json(path, self.to_dict())
        return str(path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> Calibration:
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} is not a calibration object; rerun `kronos calibrate`")
        try:
            obj = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise CheckpointError(f"{source} lacks required fields ({exc}); rerun `kronos calibrate`") from None
        if obj.version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has format version {obj.version}, this kronos reads version "
                f"{FORMAT_VERSION}; rerun `kronos calibrate` to refit it"
            )
        if obj.method not in METHODS:
            raise CheckpointError(f"{source} names an unknown method '{obj.method}'; expected one of {list(METHODS)}")
        try:
            obj.levels = check_levels(obj.levels, what=f"{source}: nominal level")
        except InputError as exc:
            raise CheckpointError(str(exc)) from None
        if not isinstance(obj.horizon, int) or obj.horizon < 1 or not isinstance(obj.lookback, int):
            raise CheckpointError(f"{source} has an invalid horizon/lookback; rerun `kronos calibrate`")
        need = (
            [f"{lv:g}" for lv in obj.levels]
            if obj.method in BAND_METHODS
            else (["scale"] if obj.method == "spread_scale" else [])
        )
        for key in need:
            vals = obj.params.get(key) if isinstance(obj.params, dict) else None
            if (
                not isinstance(vals, list)
                or len(vals) != obj.horizon
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)
            ):
                raise CheckpointError(
                    f"{source}: parameter '{key}' must list {obj.horizon} finite numbers; rerun `kronos calibrate`"
                )
        for key, low in (("vol_power", 0.0), ("vol_ref", EPS)):  # vol_scaled's volatility exponent and reference
            v = obj.params.get(key) if isinstance(obj.params, dict) else None
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low):
                raise CheckpointError(f"{source}: parameter '{key}' must be a finite number >= {low:g}; rerun "
                                      "`kronos calibrate`")  # fmt: skip
        session = obj.params.get("session") if isinstance(obj.params, dict) else None
        if session is not None and not _valid_session(session):
            raise CheckpointError(
                f"{source}: parameter 'session' must hold equally long lists 'minutes' (increasing, 0..1439) and "
                "'weight' (finite, > 0); rerun `kronos calibrate`"
            )
        cuts = obj.params.get("vol_cuts") if isinstance(obj.params, dict) else None
        if cuts is not None and not (
            isinstance(cuts, list)
            and len(cuts) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in cuts)
            and cuts[0] <= cuts[1]
        ):
            raise CheckpointError(
                f"{source}: parameter 'vol_cuts' must list 2 increasing positive numbers; rerun `kronos calibrate`"
            )
        center = obj.params.get("center") if isinstance(obj.params, dict) else None
        if center is not None and (
            not isinstance(center, list)
            or len(center) != obj.horizon
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in center)
        ):
            raise CheckpointError(
                f"{source}: parameter 'center' must list {obj.horizon} finite numbers; rerun `kronos calibrate`"
            )
        if not all(isinstance(obj.p_up.get(k), (int, float)) for k in ("a", "b")):
            raise CheckpointError(f"{source}: p_up needs numbers 'a' and 'b'; rerun `kronos calibrate`")
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"calibration file '{p}' not found; run `kronos calibrate` first")
        try:
            data = kio.read_json(p)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"calibration file '{p}' is not valid JSON ({exc}); rerun `kronos calibrate`"
            ) from None
        return cls.from_dict(data, source=f"calibration file '{p}'")

    # ------------------------------------------------------------------ application
    def _level_of(self, q: float) -> float | None:
        if abs(q - 0.5) < 1e-12:
            return None
        lv = abs(2.0 * q - 1.0)
        for fitted in self.levels:
            if abs(fitted - lv) < 1e-9:
                return fitted
        return lv

    # ------------------------------------------------------------------ adaptive correction (realised outcomes)
    def with_outcomes(self, outcomes: Any) -> Calibration:
        """This calibration corrected by realised outcomes (a :class:`kronos.inference.outcomes.BandOutcomes` of
        this calibration): its bands at an anchor are scaled by what the outcomes realised up to that anchor say
        (:meth:`quantiles` then needs the anchors). ``None`` gives the static calibration."""
        out = dataclasses.replace(self)
        if outcomes is not None:
            if self.method != "vol_scaled":
                raise InputError(f"adaptive bands need a vol_scaled calibration, not '{self.method}'")
            if outcomes.fingerprint and outcomes.fingerprint != self.fingerprint:
                raise CheckpointError(
                    "band outcomes belong to another calibration (fingerprint differs); rerun `kronos calibrate`"
                )
        object.__setattr__(out, "_outcomes", outcomes)
        return out

    @property
    def outcomes(self) -> Any:
        """The realised outcomes this calibration adapts to (None: static bands)."""
        return getattr(self, "_outcomes", None)

    def static(self) -> Calibration:
        """This calibration without its realised outcomes."""
        return self.with_outcomes(None) if self.outcomes is not None else self

    def fitted_levels(self) -> list[float]:
        """Every central level with fitted parameters (the reported levels and the CRPS grid's)."""
        if self.method not in BAND_METHODS:
            return list(self.levels)
        return sorted({float(k) for k in self.params if _is_number(k)})

    def multipliers(self, anchors: Any, n: int, vol: Any = None, levels: Any = None) -> dict[str, np.ndarray] | None:
        """``{level key: [n]}`` band multipliers at ``anchors`` from the realised outcomes (None when static);
        ``levels``: only these central levels (default every level with outcomes)."""
        if self.outcomes is None:
            return None
        if anchors is None:
            raise InputError("adaptive bands need each forecast's anchor time (its last known bar)")
        anchors = np.atleast_1d(np.asarray(anchors))
        if len(anchors) != n:
            raise InputError(f"adaptive bands need one anchor per forecast ({n}), got {len(anchors)}")
        cuts = self.params.get("vol_cuts") if self.method == "vol_scaled" else None
        return self.outcomes.multipliers(anchors, levels=levels, vol=vol, regimes=cuts)

    def session_scale(self, vol: Any, anchors: Any, n: int) -> tuple[Any, np.ndarray | None]:
        """``vol_scaled`` with an intraday profile (``session`` parameter): ``(vol per unit of profile [N], variance
        time [N, P])`` for forecasts anchored at ``anchors``; otherwise ``(vol, None)`` (bands grow with the step)."""
        session = self.params.get("session") if self.method == "vol_scaled" else None
        if session is None or vol is None:
            return vol, None
        if anchors is None:
            raise InputError(
                "this calibration follows the intraday volatility profile; it needs each forecast's anchor time "
                "(its last known bar)"
            )
        anchors = np.atleast_1d(np.asarray(anchors))
        if len(anchors) != n:
            raise InputError(f"the intraday profile needs one anchor per forecast ({n}), got {len(anchors)}")
        ctx, tau = session_time(session, anchors, self.horizon, self.lookback)
        return np.asarray(vol, dtype=float) / np.sqrt(ctx), tau

    def quantiles(
        self,
        samples: np.ndarray,
        last_close: np.ndarray,
        qs: Sequence[float],
        context_vol: np.ndarray | None = None,
        anchors: Any = None,
    ) -> np.ndarray:
        """Calibrated quantiles ``[len(qs), N, P]`` (price units) from sample paths ``[N, S, P]``; ``context_vol
        [N]`` (:func:`recent_volatility` of each context's closes) is needed by ``vol_scaled`` and ``cqr_vol``;
        ``anchors [N]`` (each forecast's last known bar) by a calibration :meth:`with_outcomes`."""
        samples = np.asarray(samples, dtype=float)
        last = np.asarray(last_close, dtype=float)
        if samples.ndim != 3 or samples.shape[2] != self.horizon:
            raise InputError(f"calibration expects sample paths [N, S, {self.horizon}], got {samples.shape}")
        z = path_returns(samples, last)
        med = np.median(z, axis=1)
        steps = np.broadcast_to(np.arange(self.horizon), med.shape)
        wanted = sorted({lv for lv in (self._level_of(float(q)) for q in qs) if lv is not None})
        mult = self.multipliers(anchors, len(last), context_vol, wanted) if wanted else None
        vol_s, tau = self.session_scale(context_vol, anchors, len(last))
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
            vol = None if vol_s is None else np.asarray(vol_s, dtype=float)[:, None]
            k = None if mult is None or lv is None else mult.get(f"{lv:g}")
            k = None if k is None else k[:, None]
            r = self._adjust(q, np.quantile(z, q, axis=1), lo, hi, med, steps, vol, k, time=tau)
            out.append(last[:, None] * (1.0 + r))
        return _in_order(np.stack(out), qs)

    def _adjust(
        self,
        q: float,
        r_q: np.ndarray,
        r_lo: np.ndarray | None,
        r_hi: np.ndarray | None,
        med: np.ndarray,
        step_idx: np.ndarray,
        vol: np.ndarray | None = None,
        mult: np.ndarray | None = None,
        use_center: bool = True,
        time: np.ndarray | None = None,
    ) -> np.ndarray:
        """The calibrated q-quantile in return space from the raw one (and the raw band of its level, the median);
        ``step_idx`` (0-based horizon step) picks the per-step parameter; ``mult`` (vol_scaled) scales the
        half-band (the adaptive correction); ``time`` (vol_scaled with an intraday profile, :meth:`session_scale`)
        is each step's variance time in place of the step count."""
        lv = self._level_of(q)
        if use_center and self.method == "vol_scaled" and "center" in self.params:  # centre shrunk toward last close
            med = med * np.asarray(self.params["center"], dtype=float)[step_idx]
            if lv is None:
                return med
        if lv is None or self.method == "none":
            return r_q
        if self.method in VOL_METHODS and vol is None:
            raise InputError(
                f"this calibration ({self.method}) needs the recent volatility of each forecast's "
                "context (context_vol: recent_volatility of its closes)"
            )
        if self.method == "spread_scale":
            k = np.asarray(self.params["scale"], dtype=float)[step_idx]
            return med + k * (r_q - med)
        key = f"{lv:g}"
        if key not in self.params:
            raise InputError(
                f"quantile {q:g} (central level {lv:g}) was not calibrated; calibrated quantiles: "
                f"{self.quantile_levels()} (levels {self.levels})"
            )
        corr = np.asarray(self.params[key], dtype=float)[step_idx]
        lower = q < 0.5
        if self.method == "vol_scaled":
            assert r_lo is not None and r_hi is not None and vol is not None  # callers pass the level's raw band
            corr = corr if mult is None else corr * mult
            h = step_idx + 1.0 if time is None else time
            half = corr * vol_scale(
                r_lo, r_hi, vol, h, lv, self.params.get("vol_power", 1.0), self.params.get("vol_ref", 1.0)
            )
            return np.maximum(med - half, MIN_RETURN) if lower else med + half
        if self.method == "cqr_vol":
            corr = corr * vol * np.sqrt(step_idx + 1.0)
        if self.method in ("cqr_additive", "cqr_vol"):
            return np.minimum(r_lo - corr, med) if lower else np.maximum(r_hi + corr, med)
        return med - corr * np.maximum(med - r_lo, MIN_HALF) if lower else med + corr * np.maximum(r_hi - med, MIN_HALF)

    def quantile_levels(self) -> list:
        return sorted(
            {round((1 - lv) / 2, 10) for lv in self.levels} | {0.5} | {round((1 + lv) / 2, 10) for lv in self.levels}
        )

    def p_up_raw(self, samples: np.ndarray, last_close: np.ndarray) -> np.ndarray:
        """The package's P(up) rule (:func:`prob_up`) on close paths ``[N, S, P]``."""
        return prob_up(samples, np.asarray(last_close, dtype=float))

    def p_up_calibrated(self, samples: np.ndarray, last_close: np.ndarray) -> np.ndarray:
        """Platt-scaled P(close at step h > last close) ``[N, P]``."""
        return platt(self.p_up_raw(samples, last_close), self.p_up["a"], self.p_up["b"])


def _in_order(values: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles ``[len(qs), ...]`` put in the order of their levels (monotone rearrangement): the adaptive
    correction scales each central level by its own factor, so two neighbouring levels can cross now and then; the
    sorted values are never worse in quantile loss (Chernozhukov, Fernandez-Val and Galichon, 2010)."""
    if len(qs) < 2:
        return values
    order = np.argsort(np.asarray([float(q) for q in qs]), kind="stable")
    out = np.array(values, dtype=float, copy=True)
    out[order] = np.sort(out[order], axis=0)
    return out


def _valid_session(session: Any) -> bool:
    if not isinstance(session, dict):
        return False
    minutes, weight = session.get("minutes"), session.get("weight")
    if not isinstance(minutes, list) or not isinstance(weight, list) or len(minutes) != len(weight) or not minutes:
        return False
    if not all(isinstance(m, int) and 0 <= m < 1440 for m in minutes) or any(
        b <= a for a, b in zip(minutes, minutes[1:])
    ):
        return False
    return all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weight)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


MIN_RETURN = -0.9999  # a lower band never reaches a price of zero
MIN_HALF = 1e-4  # cqr_multiplicative: a raw half-band narrower than 0.01% counts as 0.01% (no division by ~0)


def vol_scale(
    r_lo: np.ndarray,
    r_hi: np.ndarray,
    vol: np.ndarray,
    h: Any,
    level: float,
    power: float = 1.0,
    ref: float = 1.0,
) -> np.ndarray:
    """``vol_scaled``'s difficulty: sqrt(v^2 h + sd^2), a random walk's spread at step ``h`` combined with the
    model's own (``sd``: the half-width of its raw ``level`` band over the normal quantile of that level), where
    ``v = ref (vol / ref) ** power``: with ``power`` < 1 the band follows the recent volatility less than in
    proportion (realised moves revert toward a typical level; ``power`` and ``ref`` are fitted on validation)."""
    sd = np.maximum(np.asarray(r_hi, dtype=float) - np.asarray(r_lo, dtype=float), 0.0) / (
        2.0 * NormalDist().inv_cdf((1.0 + level) / 2.0)
    )
    v = np.asarray(vol, dtype=float)
    if power != 1.0:
        v = float(ref) * (np.maximum(v, EPS) / float(ref)) ** float(power)
    return np.sqrt(v**2 * h + sd**2) + EPS


def platt(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """Platt scaling of probabilities ``p`` on their logit: ``sigmoid(a logit(p) + b)``."""
    x = np.log(np.clip(p, P_EPS, 1 - P_EPS) / (1 - np.clip(p, P_EPS, 1 - P_EPS)))
    return 1.0 / (1.0 + np.exp(-(a * x + b)))


def apply_calibration(records: Any, calibration: Any, model: Any = None, lookback: int | None = None) -> Any:
    """Calibrate the quantile columns (``open/high/low/close_q{q}``) and ``p_up`` of forecast records in place of
    the raw ones, which are kept as ``{column}_raw``; ``p_up_calibrated`` holds the calibrated P(up).

    Records are long (one row per forecast and ``step``) with ``last_close``; the band of every price column is
    corrected in return space relative to ``last_close`` with the parameters fitted on close. The median comes
    from the ``close_q0.5`` column (the mean ``close`` when absent). ``model``/``lookback`` (optional) are checked
    against the calibration's fingerprint.
    """
    cal = load_calibration(calibration)
    if cal is None:
        raise InputError("apply_calibration needs a calibration (a path, a dict or a Calibration), got None")
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
        raise CheckpointError(
            f"calibration was fitted for a horizon of {cal.horizon} bars; records reach step "
            f"{steps.max()}; rerun `kronos calibrate` with this predict_window"
        )
    idx = steps - 1
    last = out["last_close"].to_numpy(dtype=float)
    vol = None
    if cal.method in VOL_METHODS:
        if "context_vol" not in out.columns:
            raise InputError(
                f"this calibration ({cal.method}) needs a 'context_vol' column in the records (the "
                "recent volatility of each context's closes; predict_df writes it)"
            )
        vol = out["context_vol"].to_numpy(dtype=float)
    cols: dict[str, dict[float, str]] = {}
    for c in out.columns:
        m = QUANTILE_COLUMN.match(str(c))
        if m:
            cols.setdefault(m.group(1), {})[float(m.group(2))] = c
    tau = None
    if vol is not None and cal.params.get("session") is not None and cal.method == "vol_scaled":
        if "anchor" not in out.columns:
            raise InputError(
                "this calibration follows the intraday volatility profile; the records need an 'anchor' column "
                "(each forecast's last known bar)"
            )
        vol, tau_all = cal.session_scale(vol, out["anchor"].to_numpy(), len(out))
        tau = tau_all[np.arange(len(out)), idx]
    mult = None
    if cal.outcomes is not None:
        if "anchor" not in out.columns:
            raise InputError("adaptive bands need an 'anchor' column in the records (each forecast's last known bar)")
        vol_rows = out["context_vol"].to_numpy(dtype=float) if "context_vol" in out.columns else None
        wanted = sorted({lv for qcols in cols.values() for q in qcols if (lv := cal._level_of(q)) is not None})
        mult = cal.multipliers(out["anchor"].to_numpy(), len(out), vol_rows, wanted) if wanted else None
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
                    raise InputError(
                        f"calibrating '{c}' needs the column '{base}_q{partner[0]:g}' too "
                        f"(the other end of its {lv:g} band)"
                    )
                r_lo = next(v for k, v in rel.items() if abs(k - q_lo) < 1e-9)
                r_hi = next(v for k, v in rel.items() if abs(k - q_hi) < 1e-9)
            # the centre's shrink was fitted on close; open/high/low keep their own medians (high sits above close)
            k = None if mult is None or lv is None else mult.get(f"{lv:g}")
            new[c] = last * (
                1.0 + cal._adjust(q, rel[q], r_lo, r_hi, med, idx, vol, k, use_center=base == "close", time=tau)
            )
        ordered = sorted(qcols, key=float)
        ranked = _in_order(np.stack([new[qcols[q]] for q in ordered]), ordered)
        for i, q in enumerate(ordered):
            c = qcols[q]
            out[f"{c}_raw"] = out[c]
            out[c] = ranked[i]
    if "p_up" in out.columns:
        out["p_up_raw"] = out["p_up"]
        out["p_up_calibrated"] = platt(out["p_up"].to_numpy(dtype=float), cal.p_up["a"], cal.p_up["b"])
    return out


@overload
def load_calibration(calibration: None) -> None: ...


@overload
def load_calibration(calibration: str | os.PathLike | Calibration | dict) -> Calibration: ...


def load_calibration(calibration: str | os.PathLike | Calibration | dict | None) -> Calibration | None:
    """A :class:`Calibration` from a path, a dict or an object (None stays None)."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, dict):
        return Calibration.from_dict(calibration)
    if isinstance(calibration, (str, os.PathLike)):
        return Calibration.load(calibration)
    raise InputError(f"calibration must be a path, a dict or a Calibration, got {type(calibration).__name__}")


def calibration_path(predictor_path: str | os.PathLike) -> Path:
    """Where ``calibration.json`` lives: beside the predictor's ``best_model`` folder."""
    return Path(predictor_path).parent / "calibration.json"


__all__ = [
    "bar_minutes",
    "session_time",
    "BAND_METHODS",
    "Calibration",
    "DEFAULT_METHOD",
    "METHODS",
    "QUANTILE_COLUMN",
    "VOL_METHODS",
    "apply_calibration",
    "calibration_path",
    "check_levels",
    "check_quantiles",
    "load_calibration",
    "log_returns",
    "model_fingerprint",
    "path_returns",
    "platt",
    "prob_up",
    "quantile_column",
    "quantile_columns",
    "recent_volatility",
    "sample_quantiles",
    "vol_scale",
]
