"""One rolling-forecast pass per split: the anchors, the contexts and every model's sample paths at them.

An anchor is the last bar of a forecast's context; its targets are the ``predict_window`` bars after it. The one
anchor rule (:func:`select_anchors`): bars whose whole horizon lies after a split's first target boundary and up to
its last bar, every ``eval_stride``-th anchor date, and when ``eval_max_anchors`` > 0 at most that many dates spread
evenly over the split (its first and last included). Calibration reads the validation pass (targets inside the
validation split); the walk-forward report, ``metrics.json`` (the report's headline of the model in use), the
saved forecast records and the backtest signals all read the one test pass (:func:`forecast_split`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kronos import io as kio
from kronos.config import Config
from kronos.errors import DataError
from kronos.evaluate.metrics import PathForecasts, naive_scale
from kronos.inference.bands import recent_volatility
from kronos.inference.generate import SamplingConfig


def select_anchors(
    frame: pd.DataFrame,
    targets_after: pd.Timestamp | None,
    targets_until: pd.Timestamp | None,
    lookback: int,
    horizon: int,
    stride: int = 1,
    max_anchors: int = 0,
    period: tuple[pd.Timestamp, pd.Timestamp] | None = None,
) -> pd.DataFrame:
    """(symbol, anchor, pos) of every bar at or after ``targets_after`` with ``lookback`` bars of history whose
    ``horizon`` target bars all exist and lie in ``(targets_after, targets_until]`` (and, with ``period``, whose
    anchor lies in that inclusive range); every ``stride``-th anchor date, and when ``max_anchors`` > 0 at most that
    many dates spread evenly over the split (its first and last included). ``frame`` is sorted by symbol and time."""
    rows = []
    for symbol, g in frame.groupby("symbol", sort=True):
        ts = pd.DatetimeIndex(g["timestamps"])
        pos = np.arange(lookback - 1, len(ts) - horizon)
        if not len(pos):
            continue
        ok = np.ones(len(pos), bool)
        if targets_after is not None and not pd.isna(targets_after):
            ok &= np.asarray(ts[pos + 1] > targets_after)
            # and the anchor itself no earlier than that bar: a symbol suspended for years would otherwise forecast
            # its first bars after the gap from a context that ended years before
            ok &= np.asarray(ts[pos] >= targets_after)
        if targets_until is not None and not pd.isna(targets_until):
            ok &= np.asarray(ts[pos + horizon] <= targets_until)
        if period is not None:
            ok &= np.asarray((ts[pos] >= period[0]) & (ts[pos] <= period[1]))
        rows.append(pd.DataFrame({"symbol": symbol, "anchor": ts[pos[ok]], "pos": pos[ok]}))
    if not rows:
        return pd.DataFrame(columns=["symbol", "anchor", "pos"])
    out = pd.concat(rows, ignore_index=True)
    dates = np.sort(out["anchor"].unique())[:: max(1, int(stride))]
    if max_anchors and 0 < max_anchors < len(dates):
        # spread over the whole split (first and last included): a handful of consecutive dates share one market
        # move and their targets overlap, so they measure one episode, not the split
        dates = dates[np.unique(np.round(np.linspace(0, len(dates) - 1, int(max_anchors))).astype(int))]
    return out[out["anchor"].isin(dates)].reset_index(drop=True)


def contexts(frame: pd.DataFrame, anchors: pd.DataFrame, lookback: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Context closes ``[N, L]`` and realised target closes ``[N, P]`` at the anchors (for baselines and scores)."""
    groups = {s: g["close"].to_numpy(dtype=float) for s, g in frame.groupby("symbol", sort=True)}
    ctx_close, true = [], []
    for symbol, pos in zip(anchors["symbol"], anchors["pos"]):
        close = groups[symbol]
        ctx_close.append(close[pos + 1 - lookback : pos + 1])
        true.append(close[pos + 1 : pos + 1 + horizon])
    return np.stack(ctx_close), np.stack(true)


def rolling_paths(
    name: str,
    predictor: Any,
    frame: pd.DataFrame,
    anchors: pd.DataFrame,
    cfg: Config,
    seed: int,
    prepared: tuple[np.ndarray, np.ndarray] | None = None,
) -> PathForecasts:
    """The predictor's forecasts at ``anchors`` (:meth:`KronosPredictor.predict_df_paths` with the config's
    sampling, seed ``seed``) as :class:`PathForecasts`; its forecast ``records`` (the one schema, with the config's
    quantiles, uncalibrated) ride along."""
    ev = cfg.eval
    L, P = ev.lookback, ev.horizon
    ctx_close, true = prepared if prepared is not None else contexts(frame, anchors, L, P)
    sampling = dataclasses.replace(SamplingConfig.from_config(cfg), seed=int(seed))
    out = predictor.predict_df_paths(
        frame,
        pred_len=P,
        lookback=L,
        quantiles=list(ev.quantiles),
        anchors=list(zip(anchors["symbol"], anchors["anchor"])),
        sampling=sampling,
        batch_size=max(1, int(cfg.backtest_batch_size) // max(1, sampling.sample_count)),
        progress=True,
    )
    records = out.records
    first = records[records["step"] == 1]
    if (
        len(first) != len(anchors)
        or not (np.asarray(first["symbol"]) == anchors["symbol"].to_numpy()).all()
        or not (pd.DatetimeIndex(first["anchor"]) == pd.DatetimeIndex(anchors["anchor"])).all()
    ):
        raise RuntimeError("predict_df returned forecasts in another order than the split's anchors")
    point = records["close"].to_numpy(dtype=float).reshape(len(anchors), P)
    return PathForecasts(
        name,
        symbol=anchors["symbol"].to_numpy(),
        anchor=anchors["anchor"].to_numpy(),
        last_close=ctx_close[:, -1],
        scale=naive_scale(ctx_close),
        true=true,
        point=point,
        samples=np.asarray(out.samples, dtype=float)[:, :, :, 3],
        vol=recent_volatility(ctx_close),
        records=records,
    )


@dataclass
class SplitForecasts:
    """The one rolling pass over a split: its anchors, contexts, and each model's paths (one per seed)."""

    split: str
    anchors: pd.DataFrame
    ctx_close: np.ndarray
    true: np.ndarray
    seeds: list
    paths: dict[str, list[PathForecasts]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # what chose the anchors and drew the paths (pass_settings)

    def first(self, model: str) -> PathForecasts:
        """The model's forecasts with the first seed (the run's forecasts: records, signals, calibration)."""
        return self.paths[model][0]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the pass to ``folder`` (atomically): ``anchors.parquet``, ``paths.npz`` (contexts, outcomes, each
        model's mean path and close sample paths per seed, float32 paths), ``{model}_records.parquet`` (first seed)
        and ``pass.json``. NumPy and Parquet only: :meth:`load` never unpickles."""

        def fill(tmp: Path) -> None:
            self.anchors.to_parquet(tmp / "anchors.parquet", index=False)
            arrays = {"ctx_close": self.ctx_close, "true": self.true}
            for model, runs in self.paths.items():
                for i, fc in enumerate(runs):
                    arrays[f"{model}.{i}.point"] = fc.point
                    arrays[f"{model}.{i}.samples"] = fc.samples.astype(np.float32)
                if runs[0].records is not None:
                    runs[0].records.to_parquet(tmp / f"{model}_records.parquet", index=False)
            np.savez(tmp / "paths.npz", **arrays)  # type: ignore[arg-type]  # numpy stubs type **kwds as allow_pickle
            kio.write_json(
                tmp / "pass.json",
                {"split": self.split, "seeds": self.seeds, "models": list(self.paths), "settings": self.settings},
            )

        return kio.write_folder(folder, fill)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SplitForecasts:
        """A pass written by :meth:`save` (:class:`~kronos.errors.DataError` naming the folder when it is not
        one)."""
        folder = Path(folder)
        meta = kio.read_json_object(folder / "pass.json", "forecast pass")
        if not meta or not (folder / "paths.npz").is_file() or not (folder / "anchors.parquet").is_file():
            raise DataError(f"'{folder}' holds no saved forecast pass (pass.json, paths.npz, anchors.parquet)")
        anchors = pd.read_parquet(folder / "anchors.parquet")
        with np.load(folder / "paths.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        ctx_close, true = arrays["ctx_close"], arrays["true"]
        out = cls(str(meta["split"]), anchors, ctx_close, true, [int(s) for s in meta["seeds"]])
        out.settings = dict(meta.get("settings") or {})
        vol, scale = recent_volatility(ctx_close), naive_scale(ctx_close)
        for model in meta["models"]:
            runs = []
            for i in range(len(out.seeds)):
                records_file = folder / f"{model}_records.parquet"
                records = pd.read_parquet(records_file) if i == 0 and records_file.is_file() else None
                runs.append(PathForecasts(
                    model, symbol=anchors["symbol"].to_numpy(), anchor=anchors["anchor"].to_numpy(),
                    last_close=ctx_close[:, -1], scale=scale, true=true, point=arrays[f"{model}.{i}.point"],
                    samples=arrays[f"{model}.{i}.samples"].astype(float), vol=vol, records=records,
                ))  # fmt: skip
            out.paths[str(model)] = runs
        return out


def pass_settings(cfg: Config, split: str, period: tuple[pd.Timestamp, pd.Timestamp] | None = None) -> dict:
    """What decides a split's pass (anchors and sample paths): a saved pass is reused only when these match."""
    ev, s = cfg.eval, SamplingConfig.from_config(cfg)
    return kio.to_jsonable({
        "split": split, "period": [str(p) for p in period] if period else None, "lookback": ev.lookback,
        "horizon": ev.horizon, "stride": ev.stride, "max_anchors": ev.max_anchors, "seeds": list(ev.seeds),
        "quantiles": list(ev.quantiles), "T": s.T, "top_k": s.top_k, "top_p": s.top_p, "sample_count": s.sample_count,
    })  # fmt: skip


def forecast_split(
    cfg: Config,
    frame: pd.DataFrame,
    split: str,
    targets_after: pd.Timestamp | None,
    targets_until: pd.Timestamp | None,
    models: dict[str, Any],
    seeds: list | None = None,
    period: tuple[pd.Timestamp, pd.Timestamp] | None = None,
) -> SplitForecasts:
    """Every model's rolling forecasts at the split's anchors (:func:`select_anchors` with the config's
    ``eval_stride``/``eval_max_anchors``), once per seed (default ``[inference_seed]``)."""
    ev = cfg.eval
    L, P = ev.lookback, ev.horizon
    anchors = select_anchors(frame, targets_after, targets_until, L, P, ev.stride, ev.max_anchors, period)
    if anchors.empty:
        raise DataError(
            f"no {split} anchor has lookback_window={L} bars of history and predict_window={P} known bars after "
            f"{targets_after} up to {targets_until}; lengthen the {split} split or shorten the windows"
        )
    ctx_close, true = contexts(frame, anchors, L, P)
    seeds = [int(s) for s in (seeds or ev.seeds)]
    out = SplitForecasts(split, anchors, ctx_close, true, seeds, settings=pass_settings(cfg, split, period))
    for name, predictor in models.items():
        out.paths[name] = [
            rolling_paths(name, predictor, frame, anchors, cfg, seed, (ctx_close, true)) for seed in seeds
        ]
    return out


__all__ = ["SplitForecasts", "contexts", "forecast_split", "pass_settings", "rolling_paths", "select_anchors"]
