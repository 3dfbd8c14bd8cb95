"""Adaptive band correction: the realised outcomes of past forecasts widen or narrow the bands of later ones.

A calibration fitted once on validation (:class:`~kronos.inference.bands.Calibration`, ``vol_scaled``) cannot follow
a change of regime between validation and the time of a forecast. :class:`BandOutcomes` keeps, for every past
forecast and horizon step whose target bar has been realised, its *score* at each central level: the distance of
the realised close from the band's centre over the calibrated half-band (``<= 1``: inside the band). At a later
anchor ``t`` the band of level ``lv`` is multiplied by the weighted conformal ``lv``-quantile of the scores realised
**on or before ``t``** (weights halve every ``half_life`` bars back from ``t``; the forecast being made counts with
full weight and an infinite score: the finite-sample conformal quantile of Barber et al., 2023, "Conformal
prediction beyond exchangeability"). A multiplier of 1 is the static band; no outcome on or before ``t`` leaves it
static too. Outcomes after ``t`` are never read at ``t`` (:meth:`BandOutcomes.multipliers`; tested).

The pipeline stores the outcomes beside the calibration (:func:`outcomes_path`): the validation forecasts after
``kronos calibrate``, and the test pass's too once the run has forecast it; the walk-forward report, the latest
forecasts and the service read them through :meth:`~kronos.inference.bands.Calibration.with_outcomes`. A
calibration without an outcomes file works as before (static bands).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kronos import io as kio
from kronos.errors import CheckpointError, InputError

HALF_LIFE_BARS = 60  # bars; the recency of the outcomes the adaptive correction weighs (README, "Calibrated bands")
VOL_BANDWIDTH = 0.25  # log-volatility kernel width: outcomes of forecasts made in similar volatility weigh more
FORMAT = "kronos-band-outcomes-1"
REGIME_RATE = 1.5  # a regime's log band scale moves by REGIME_RATE / REGIME_ROWS per realised outcome (README) ...
REGIME_ROWS = 300  # ... or by REGIME_RATE / n each when more than this many outcomes are realised at one bar time
REGIME_CLIP = float(np.log(4.0))  # a regime's factor stays within 1/4 .. 4 of the kernel quantile
KERNEL_CELLS = 4_000_000  # queries x outcomes per block of the kernel (about 32 MB per array of the block)
FLAT_VOL = 1e-7  # a context whose closes never moved (a suspended symbol): its scores divide by ~0 and are left out


def outcomes_path(calibration_file: str | os.PathLike) -> Path:
    """Where the realised outcomes of a calibration live: ``calibration.json`` -> ``calibration_outcomes.parquet``
    beside it."""
    p = Path(calibration_file)
    return p.with_name(f"{p.stem}_outcomes.parquet")


def _cuts(cuts: Any) -> tuple[float, float]:
    """A calibration's ``vol_cuts`` as the two volatility cuts of the regimes (low / mid / high)."""
    low, high = (float(c) for c in np.asarray(cuts, dtype=float).ravel()[:2])
    return low, high


def _level_key(level: float) -> str:
    return f"{float(level):g}"


@dataclass
class BandOutcomes:
    """Realised band scores of past forecasts (one row per forecast and horizon step whose target is known)."""

    target: np.ndarray  # datetime64[ns] [R]: the target bar's time (when the outcome became known)
    scores: dict[str, np.ndarray]  # level key ("0.8") -> [R] |close - centre| / calibrated half-band
    bar: np.timedelta64  # the data's bar spacing (median step between consecutive target bars)
    calendar: np.ndarray  # datetime64[ns]: the data's bar times over the outcomes' span (ages are counted in bars)
    fingerprint: str = ""  # the calibration's (predictor weights, lookback, horizon)
    half_life: float = HALF_LIFE_BARS
    meta: dict = field(default_factory=dict)
    vol: Any = None  # [R] the forecast's context_vol (for the volatility kernel)
    bandwidth: float = VOL_BANDWIDTH  # log-volatility kernel width (0: outcomes of every volatility weigh alike)
    anchor: Any = None  # datetime64[ns] [R]: the forecast's anchor (its last known bar; for the regime correction)

    def __len__(self) -> int:
        return int(len(self.target))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_forecasts(
        cls,
        calibration: Any,
        samples: np.ndarray,
        last_close: np.ndarray,
        true: np.ndarray,
        context_vol: np.ndarray | None,
        targets: np.ndarray,
        calendar: Any = None,
        half_life: float = HALF_LIFE_BARS,
        anchors: Any = None,
    ) -> BandOutcomes:
        """Scores of forecasts with known outcomes: close sample paths ``[N, S, P]``, ``last_close [N]``, realised
        closes ``true [N, P]`` (NaN: not realised, left out), ``targets [N, P]`` their bar times, ``calendar`` the
        data's bar times (default: the targets'; ages are counted in its bars, so nights, weekends and holidays do
        not age an outcome). ``calibration`` is the static one (a ``vol_scaled``
        :class:`~kronos.inference.bands.Calibration`); ``anchors [N]``: each forecast's last known bar (needed by a
        calibration with an intraday profile)."""
        cal = calibration.static()
        if cal.method != "vol_scaled":
            raise InputError(f"adaptive bands need a vol_scaled calibration, not '{cal.method}'")
        samples = np.asarray(samples, dtype=float)
        true = np.asarray(true, dtype=float)
        targets = np.asarray(targets, dtype="datetime64[ns]")
        if true.shape != samples.shape[::2] or targets.shape != true.shape:
            raise InputError(
                f"outcomes need samples [N, S, P], true [N, P] and targets [N, P]; got {samples.shape}, "
                f"{true.shape}, {targets.shape}"
            )
        ok = np.isfinite(true) & ~np.isnat(targets)
        scores = {}
        for lv in cal.fitted_levels():
            med, hi = cal.quantiles(samples, last_close, [0.5, (1 + lv) / 2], context_vol, anchors=anchors)
            s = np.abs(true - med) / np.maximum(hi - med, 1e-12)
            scores[_level_key(lv)] = s[ok]
        vol_rows = None
        if context_vol is not None:
            vol_rows = np.broadcast_to(np.asarray(context_vol, float)[:, None], true.shape)[ok]
        anchor_rows = None
        if anchors is not None:
            at = np.asarray(pd.DatetimeIndex(np.atleast_1d(anchors)).tz_localize(None), dtype="datetime64[ns]")
            anchor_rows = np.broadcast_to(at[:, None], true.shape)[ok]
        steps = np.diff(targets, axis=1).ravel() if targets.shape[1] > 1 else np.array([], dtype="timedelta64[ns]")
        steps = steps[~np.isnat(steps) & (steps > np.timedelta64(0, "ns"))]
        bar = np.median(steps.astype(np.int64)).astype("timedelta64[ns]") if len(steps) else np.timedelta64(1, "D")
        cal_times = targets[ok] if calendar is None else np.asarray(pd.DatetimeIndex(calendar).tz_localize(None))
        cal_times = np.unique(cal_times.astype("datetime64[ns]"))
        if len(targets[ok]):  # the span the outcomes need
            cal_times = cal_times[(cal_times >= targets[ok].min())]
        return cls(
            targets[ok], scores, bar, cal_times, cal.fingerprint, float(half_life), vol=vol_rows, anchor=anchor_rows
        )

    def concat(self, other: BandOutcomes) -> BandOutcomes:
        """Both sets of outcomes (same calibration); a row realised at the same time with the same scores is kept
        once, so adding a pass twice changes nothing."""
        if other.fingerprint != self.fingerprint:
            raise CheckpointError("band outcomes of two different calibrations cannot be merged")
        keys = [k for k in self.scores if k in other.scores]
        parts = [self.to_frame(keys), other.to_frame(keys)]
        for col, a, b in (("vol", self.vol, other.vol), ("anchor", self.anchor, other.anchor)):
            if (a is None) != (b is None):
                parts = [p.drop(columns=col, errors="ignore") for p in parts]
        frame = pd.concat(parts, ignore_index=True).drop_duplicates()
        calendar = np.union1d(self.calendar, other.calendar)
        out = self.from_frame(frame, self.bar, calendar, self.fingerprint, self.half_life, self.meta)
        out.bandwidth = self.bandwidth
        return out

    def bar_position(self, times: np.ndarray) -> np.ndarray:
        """Position of ``times`` in bars of the calendar (fractional past its last bar, at the bar spacing)."""
        times = np.asarray(times, dtype="datetime64[ns]")
        pos = np.searchsorted(self.calendar, times, side="right").astype(float) - 1.0
        if len(self.calendar):
            end = self.calendar[-1]
            after = times > end
            bar_ns = max(float(self.bar.astype(np.int64)), 1.0)
            pos[after] = len(self.calendar) - 1 + (times[after] - end).astype(np.int64) / bar_ns
        return pos

    # ------------------------------------------------------------------ the correction
    def multipliers(
        self, anchors: Any, levels: Any = None, vol: Any = None, regimes: Any = None
    ) -> dict[str, np.ndarray]:
        """``{level key: [N]}``: the band multiplier of each forecast anchored at ``anchors [N]`` (its last known
        bar): the weighted conformal quantile of the scores realised on or before its anchor (1 where none is).
        ``regimes`` (two increasing volatility cuts, the calibration's ``vol_cuts``) with ``vol`` and outcomes that
        know their anchors: times the running correction of the forecast's volatility regime
        (:meth:`regime_factors`)."""
        at = np.asarray(pd.DatetimeIndex(np.atleast_1d(anchors)).tz_localize(None), dtype="datetime64[ns]")
        keys = [_level_key(v) for v in levels] if levels is not None else list(self.scores)
        out = self._kernel(at, keys, vol)
        if regimes is not None and vol is not None:
            factors = self.regime_factors(at, np.broadcast_to(np.asarray(vol, float), at.shape), regimes, keys)
            out = {k: v * factors[k] if k in factors else v for k, v in out.items()}
        return out

    def _kernel(self, at: np.ndarray, keys: list[str], vol: Any = None) -> dict[str, np.ndarray]:
        """The weighted conformal quantile part of :meth:`multipliers` at anchor times ``at``."""
        out = {k: np.ones(len(at)) for k in keys}
        if not len(self) or not len(at):
            return out
        kernel = self.bandwidth > 0 and vol is not None and self.vol is not None
        if kernel:  # one query per anchor time and volatility bin (a quarter of the kernel's width)
            step = self.bandwidth / 4.0
            vbin = np.round(np.log(np.maximum(np.broadcast_to(np.asarray(vol, float), at.shape), 1e-12)) / step)
            pairs, inverse = np.unique(np.stack([at.astype(np.int64), vbin.astype(np.int64)], axis=1), axis=0,
                                      return_inverse=True)  # fmt: skip
            inverse = inverse.ravel()
            uniq = pairs[:, 0].astype("datetime64[ns]")
            qvol = pairs[:, 1].astype(float) * step
        else:
            uniq, inverse = np.unique(at, return_inverse=True)
        t_pos = self.bar_position(uniq)
        base = np.ones(len(self), bool) if self.vol is None else np.asarray(self.vol, dtype=float) > FLAT_VOL
        by_time = np.flatnonzero(base)[np.argsort(self.target[base], kind="stable")]  # realised rows, oldest first
        t_rows, o_rows = self.target[by_time], self.bar_position(self.target[by_time])
        v_rows = np.log(np.maximum(np.asarray(self.vol, dtype=float)[by_time], 1e-12)) if kernel else None
        keys = [k for k in keys if k in self.scores]
        scores = {k: self.scores[k][by_time] for k in keys}
        orders = {k: np.argsort(v, kind="stable") for k, v in scores.items()}  # by score (NaN last)
        per_query = {k: np.ones(len(uniq)) for k in keys}
        size = max(1, min(64, KERNEL_CELLS // max(len(t_rows), 1)))  # queries per block: bounded memory
        for start in range(0, len(uniq), size):  # a block of queries at once (np.unique sorted them by time)
            block = slice(start, start + size)
            n_known = int(np.searchsorted(t_rows, uniq[block].max(), side="right"))  # rows realised by the block
            if not n_known:
                continue
            known = t_rows[None, :n_known] <= uniq[block, None]  # realised on or before the anchor: never later
            age = np.maximum(t_pos[block, None] - o_rows[None, :n_known], 0.0)
            recency = np.where(known, 0.5 ** (age / self.half_life), 0.0)
            near_all = None
            if v_rows is not None:
                near_all = recency * np.exp(-0.5 * ((v_rows[None, :n_known] - qvol[block, None]) / self.bandwidth) ** 2)
            for key in keys:
                level = float(key)
                need = level / (1.0 - level)  # outcome weight for a finite conformal quantile (the new forecast: 1)
                rows = orders[key][orders[key] < n_known]
                if not len(rows):
                    continue
                s_sorted = scores[key][rows]
                finite = np.isfinite(s_sorted)  # a score that is not a number weighs nothing
                w = recency[:, rows] * finite
                total = w.sum(axis=1)
                if near_all is not None:
                    near = near_all[:, rows] * finite
                    near_total = near.sum(axis=1)
                    # a volatility no realised outcome came near: the recency weights alone (the kernel has no say)
                    use = near_total >= need
                    w = np.where(use[:, None], near, w)
                    total = np.where(use, near_total, total)
                share = np.cumsum(w, axis=1) / (total[:, None] + 1.0)  # the new forecast: weight 1 at +inf
                k = np.minimum((share < level).sum(axis=1), len(s_sorted) - 1)
                # too little realised yet for this level's quantile to be finite: the static band
                per_query[key][block] = np.where(total >= need, s_sorted[k], 1.0)
        for key in keys:
            out[key] = per_query[key][inverse]
        return out

    def regime_factors(self, at: np.ndarray, vol: np.ndarray, cuts: Any, keys: list[str]) -> dict[str, np.ndarray]:
        """``{level key: [N]}``: the running correction of each forecast's volatility regime at its anchor ``at``.

        The kernel quantile follows what similar forecasts realised, but a regime can stay short for a long stretch
        (calm markets just before a break cover less than turbulent ones). So each regime (context volatility below,
        between or above ``cuts``: validation's terciles) keeps a log band scale, updated by every realised outcome
        of its forecasts in the order the outcomes became known: ``+ rate * (missed - (1 - level))``, where *missed*
        compares the outcome's score with the band its forecast was actually given (kernel quantile times the
        regime's factor at that forecast's anchor). This is adaptive conformal inference (Gibbs and Candes, 2021)
        per regime: over time each regime's misses come to ``1 - level``. ``rate`` = :data:`REGIME_RATE` over the
        outcomes realised at the same bar time (at least :data:`REGIME_ROWS`), so one bar moves a market of any
        size alike.
        Only outcomes realised on or before an anchor move its factor; 1 where the outcomes do not know their
        anchors (files written before this correction) or nothing was realised yet."""
        out = {k: np.ones(len(at)) for k in keys}
        hist = self._regime_history(_cuts(cuts))
        if hist is None:
            return out
        times, theta, order = hist
        pos = np.searchsorted(times, at, side="right") - 1  # the last outcome time on or before each anchor
        group = np.digitize(np.asarray(vol, dtype=float), _cuts(cuts))
        for key in keys:
            if key in order:
                lv = order[key]
                out[key] = np.where(pos >= 0, np.exp(theta[np.maximum(pos, 0), lv, group]), 1.0)
        return out

    def prepare_regimes(self, cuts: Any) -> None:
        """Build (and cache) the regime correction's history now: a service does it at start-up, not on its first
        request."""
        if cuts is not None:
            self._regime_history(_cuts(cuts))

    def _regime_history(self, cuts: tuple) -> tuple | None:
        """(outcome times [U], log scales after each [U, L, 3], level key -> L index); cached per settings."""
        if self.anchor is None or self.vol is None or not len(self) or len(cuts) != 2:
            return None
        state = (cuts, self.half_life, self.bandwidth, len(self))
        cache = self.__dict__.get("_regime_cache")
        if cache is not None and cache[0] == state:
            return cache[1]
        keys = list(self.scores)
        vol = np.asarray(self.vol, dtype=float)
        ok = ~np.isnat(self.anchor) & (vol > FLAT_VOL)
        for k in keys:
            ok &= np.isfinite(self.scores[k])
        result = None
        if ok.any():
            anchor, target, vol = self.anchor[ok], self.target[ok], vol[ok]
            group = np.digitize(vol, np.asarray(cuts, dtype=float))
            scores = np.stack([self.scores[k][ok] for k in keys])  # [L, R]
            # the band each forecast was given by the kernel at its own anchor (outcomes realised before it)
            pairs, inverse = np.unique(np.stack([anchor.astype(np.int64), vol.view(np.int64)], axis=1), axis=0,
                                       return_inverse=True)  # fmt: skip
            given = self._kernel(pairs[:, 0].astype("datetime64[ns]"), keys, pairs[:, 1].view(np.float64))
            issued = np.stack([given[k][inverse.ravel()] for k in keys])  # [L, R]
            miss_rate = 1.0 - np.array([float(k) for k in keys])[:, None]
            times = np.unique(target)
            order = np.argsort(target, kind="stable")
            bounds = np.searchsorted(target[order], times, side="left").tolist() + [len(order)]
            at_anchor = np.searchsorted(times, anchor, side="right") - 1  # the history index a forecast was given
            theta = np.zeros((len(times), len(keys), 3))
            now = np.zeros((len(keys), 3))
            for i in range(len(times)):
                rows = order[bounds[i] : bounds[i + 1]]
                j = at_anchor[rows]
                scale = np.where(j[None, :] >= 0, np.exp(theta[np.maximum(j, 0), :, group[rows]].T), 1.0)
                err = (scores[:, rows] > issued[:, rows] * scale) - miss_rate  # [L, n]
                rate = REGIME_RATE / max(len(rows), REGIME_ROWS)  # a bar of a big market moves it no more
                for g in range(3):
                    sel = group[rows] == g
                    if sel.any():
                        now[:, g] += rate * err[:, sel].sum(axis=1)
                np.clip(now, -REGIME_CLIP, REGIME_CLIP, out=now)
                theta[i] = now
            result = (times, theta, {k: i for i, k in enumerate(keys)})
        self.__dict__["_regime_cache"] = (state, result)
        return result

    # ------------------------------------------------------------------ files
    def to_frame(self, keys: list[str] | None = None) -> pd.DataFrame:
        keys = list(self.scores) if keys is None else keys
        vol = {} if self.vol is None else {"vol": np.asarray(self.vol, dtype=float)}
        anchor = {} if self.anchor is None else {"anchor": np.asarray(self.anchor, dtype="datetime64[ns]")}
        return pd.DataFrame({"target": self.target, **anchor, **vol, **{f"score_{k}": self.scores[k] for k in keys}})

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        bar: np.timedelta64,
        calendar: np.ndarray,
        fingerprint: str,
        half_life: float,
        meta: dict | None = None,
    ) -> BandOutcomes:
        scores = {str(c)[6:]: frame[c].to_numpy(dtype=float) for c in frame.columns if str(c).startswith("score_")}
        target = frame["target"].to_numpy(dtype="datetime64[ns]")
        vol = frame["vol"].to_numpy(dtype=float) if "vol" in frame.columns else None
        anchor = frame["anchor"].to_numpy(dtype="datetime64[ns]") if "anchor" in frame.columns else None
        calendar = np.asarray(calendar, "datetime64[ns]")
        return cls(
            target, scores, bar, calendar, fingerprint, half_life, meta or {}, vol=vol, anchor=anchor
        )  # default bandwidth

    def save(self, path: str | os.PathLike) -> Path:
        """Write a Parquet file (atomically) with the bar spacing, half-life and fingerprint in its metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(self.to_frame(), preserve_index=False)
        info = {
            "format": FORMAT,
            "bar_ns": int(self.bar.astype(np.int64)),
            "fingerprint": self.fingerprint,
            "half_life": self.half_life,
            "bandwidth": self.bandwidth,
            "calendar_ns": [int(v) for v in self.calendar.astype(np.int64)],
            **self.meta,
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"kronos": json.dumps(info).encode()})
        return kio.write_file(path, lambda tmp: pq.write_table(table, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BandOutcomes:
        """Read :meth:`save`'s file (a one-line CheckpointError naming it when it is not one)."""
        import pyarrow.parquet as pq

        p = Path(path)
        try:
            table = pq.read_table(p)
            info = json.loads((table.schema.metadata or {}).get(b"kronos", b"{}"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"band outcomes file '{p}' cannot be read ({exc}); rerun `kronos calibrate`"
            ) from None
        if info.get("format") != FORMAT or "target" not in table.column_names:
            raise CheckpointError(f"'{p}' is not a band outcomes file ({FORMAT}); rerun `kronos calibrate`")
        frame = table.to_pandas()
        own = ("format", "bar_ns", "fingerprint", "half_life", "calendar_ns", "bandwidth")
        meta = {k: v for k, v in info.items() if k not in own}
        out = cls.from_frame(
            frame,
            np.timedelta64(int(info.get("bar_ns", 86_400_000_000_000)), "ns"),
            np.asarray(info.get("calendar_ns", []), dtype=np.int64).astype("datetime64[ns]"),
            str(info.get("fingerprint", "")),
            float(info.get("half_life", HALF_LIFE_BARS)),
            meta,
        )
        out.bandwidth = float(info.get("bandwidth", 0.0))
        return out


def target_times(frame: pd.DataFrame, anchors: pd.DataFrame, horizon: int) -> np.ndarray:
    """The bar times ``[N, P]`` of each anchor's ``horizon`` target bars (``anchors``: symbol, pos, as
    :func:`kronos.evaluate.rolling.select_anchors` gives; NaT past a series' end)."""
    times = {s: g["timestamps"].to_numpy(dtype="datetime64[ns]") for s, g in frame.groupby("symbol", sort=True)}
    out = np.full((len(anchors), int(horizon)), np.datetime64("NaT"), dtype="datetime64[ns]")
    for i, (symbol, pos) in enumerate(zip(anchors["symbol"], anchors["pos"])):
        t = times[symbol][int(pos) + 1 : int(pos) + 1 + int(horizon)]
        out[i, : len(t)] = t
    return out


__all__ = ["HALF_LIFE_BARS", "BandOutcomes", "outcomes_path", "target_times"]
