"""Figures: a forecast against its history, training curves, and backtest returns.

Matplotlib runs on the Agg backend (no display needed, nothing is shown); every figure is written to a temporary
file beside its target and renamed into place, so a reader never sees half a PNG.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kronos.errors import DataError, InputError  # noqa: E402

PathLike = Union[str, os.PathLike]
_TIME_COLUMNS = ("timestamps", "timestamp", "datetime", "date", "time")


def _save(fig: "plt.Figure", path: Optional[PathLike], dpi: int = 120) -> Path:
    if path is None:
        plt.close(fig)
        raise InputError("a plot needs an output path (path=...)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    os.replace(tmp, out)
    return out


def _with_time_index(df: Optional[pd.DataFrame], what: str) -> Optional[pd.DataFrame]:
    """Index ``df`` by time: its DatetimeIndex, else a timestamps/datetime column, else its own index."""
    if df is None:
        return None
    if isinstance(df, pd.Series):
        df = df.to_frame(df.name or "close")
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    if isinstance(df.index, pd.DatetimeIndex):
        return df
    for col in _TIME_COLUMNS:
        if col in df.columns:
            out = df.set_index(pd.DatetimeIndex(pd.to_datetime(df[col])))
            return out.drop(columns=[col])
    return df


def _column(df: pd.DataFrame, name: str, what: str) -> pd.Series:
    if name not in df.columns:
        raise InputError(f"{what} has no '{name}' column (columns: {list(df.columns)[:10]})")
    return pd.to_numeric(df[name], errors="coerce")


def plot_forecast(
    history: pd.DataFrame,
    forecast: pd.DataFrame,
    band: Optional[tuple[pd.DataFrame, pd.DataFrame]] = None,
    actual: Optional[pd.DataFrame] = None,
    title: str = "",
    path: Optional[PathLike] = None,
) -> Path:
    """Close price (top) and volume (bottom, when both history and forecast have it) of the context, the mean
    forecast, an optional quantile band ``(lo, hi)`` and the optional actual future. Frames are indexed by time
    or carry a ``timestamps`` column. Returns the PNG's path."""
    hist = _with_time_index(history, "history")
    fc = _with_time_index(forecast, "forecast")
    act = _with_time_index(actual, "actual")
    lo = hi = None
    if band is not None:
        if not (isinstance(band, (tuple, list)) and len(band) == 2):
            raise InputError("band must be a (lo, hi) pair of DataFrames or None")
        lo, hi = _with_time_index(band[0], "band lo"), _with_time_index(band[1], "band hi")
    has_volume = "volume" in hist.columns and "volume" in fc.columns
    nrows = 2 if has_volume else 1
    fig, axes = plt.subplots(nrows, 1, figsize=(11, 6.5 if has_volume else 4.5), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] if has_volume else [1]})
    ax = axes[0, 0]
    ax.plot(hist.index, _column(hist, "close", "history"), color="tab:blue", lw=1.3, label="history")
    if act is not None and "close" in act.columns:
        ax.plot(act.index, _column(act, "close", "actual"), color="black", lw=1.3, label="actual")
    ax.plot(fc.index, _column(fc, "close", "forecast"), color="tab:red", lw=1.5, label="forecast (mean)")
    if lo is not None and hi is not None and "close" in lo.columns and "close" in hi.columns:
        ax.fill_between(lo.index, _column(lo, "close", "band lo").to_numpy(),
                        _column(hi, "close", "band hi").to_numpy(),
                        color="tab:red", alpha=0.18, lw=0, label="forecast band")
    if len(hist):
        ax.axvline(hist.index[-1], color="grey", ls=":", lw=1)
    ax.set_ylabel("close")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    if title:
        ax.set_title(title)
    if has_volume:
        vax = axes[1, 0]
        _volume_bars(vax, hist.index, _column(hist, "volume", "history"), "tab:blue", "history")
        if act is not None and "volume" in act.columns:
            vax.plot(act.index, _column(act, "volume", "actual"), color="black", lw=1.0, label="actual")
        vax.plot(fc.index, _column(fc, "volume", "forecast"), color="tab:red", lw=1.3, label="forecast")
        vax.set_ylabel("volume")
        vax.grid(alpha=0.3)
        vax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    return _save(fig, path)


def _volume_bars(ax: Any, index: pd.Index, values: pd.Series, color: str, label: str) -> None:
    if isinstance(index, pd.DatetimeIndex) and len(index) > 1:
        width = (index[1:] - index[:-1]).median() * 0.8
        ax.bar(index, values.to_numpy(), width=width, color=color, alpha=0.5, label=label)
    else:
        ax.bar(index, values.to_numpy(), color=color, alpha=0.5, label=label)


def read_metrics_jsonl(path: PathLike) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (one JSON object per line; blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"metrics file '{p}' does not exist; train first or pass the run's metrics.jsonl")
    rows = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"metrics file '{p}' line {lineno} is not valid JSON") from None
            if isinstance(row, dict):
                rows.append(row)
    return rows


def plot_training_curves(metrics: Union[PathLike, Sequence[dict]], path: PathLike, title: str = "") -> Path:
    """Every ``*loss*`` series against ``step`` (train solid, validation with markers), log-scaled when the
    values span over two decades, and the learning rate in a lower panel when logged."""
    rows = read_metrics_jsonl(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    frame = pd.DataFrame([r for r in rows if isinstance(r, dict)])
    loss_cols = [c for c in frame.columns if "loss" in str(c).lower()]
    if frame.empty or not loss_cols:
        raise DataError("no loss values to plot: the metrics hold no '*loss*' keys")
    if "step" in frame.columns:
        x = pd.to_numeric(frame["step"], errors="coerce")
    else:
        x = pd.Series(np.arange(len(frame)), index=frame.index, dtype=float)
    has_lr = "lr" in frame.columns and pd.to_numeric(frame["lr"], errors="coerce").notna().any()
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(10, 6.5 if has_lr else 4.5), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1] if has_lr else [1]})
    ax = axes[0, 0]
    all_vals = []
    for col in sorted(loss_cols, key=lambda c: (not str(c).startswith("train"), str(c))):
        y = pd.to_numeric(frame[col], errors="coerce")
        ok = y.notna() & x.notna()
        if not ok.any():
            continue
        is_val = str(col).startswith(("val", "valid", "eval"))
        ax.plot(x[ok], y[ok], marker="o" if is_val else None, ms=4, lw=1.6 if is_val else 1.0, label=str(col))
        all_vals.append(y[ok].to_numpy(dtype=float))
    values = np.concatenate(all_vals) if all_vals else np.array([])
    if values.size and (values > 0).all() and values.max() / values.min() > 100:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.set_title(title or "training curves")
    if has_lr:
        lr = pd.to_numeric(frame["lr"], errors="coerce")
        ok = lr.notna() & x.notna()
        axes[1, 0].plot(x[ok], lr[ok], color="tab:green", lw=1.0)
        axes[1, 0].set_ylabel("learning rate")
        axes[1, 0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step" if "step" in frame.columns else "record")
    return _save(fig, path)


def plot_backtest(daily: pd.DataFrame, path: PathLike, title: str = "") -> Path:
    """Cumulative (summed, as Qlib plots them) returns of the strategy and the benchmark (top) and the
    cumulative excess return with and without cost (bottom), from a backtest's ``daily`` frame."""
    need = ("return", "cost", "bench")
    missing = [c for c in need if c not in daily.columns]
    if missing:
        raise InputError(f"backtest daily frame lacks column(s) {missing}")
    d = daily.astype({c: float for c in need})
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    ax = axes[0]
    ax.plot(d.index, (d["return"] - d["cost"]).cumsum(), color="tab:red", lw=1.5, label="strategy (with cost)")
    ax.plot(d.index, d["return"].cumsum(), color="tab:orange", lw=1.0, ls="--", label="strategy (without cost)")
    ax.plot(d.index, d["bench"].cumsum(), color="black", lw=1.2, ls="--", label="benchmark")
    ax.set_ylabel("cumulative return (summed)")
    ax.set_title(title or "backtest")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax = axes[1]
    ax.plot(d.index, (d["return"] - d["bench"] - d["cost"]).cumsum(), color="tab:red", lw=1.5,
            label="excess (with cost)")
    ax.plot(d.index, (d["return"] - d["bench"]).cumsum(), color="tab:blue", lw=1.0, label="excess (without cost)")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_ylabel("cumulative excess return (summed)")
    ax.set_xlabel("date")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.autofmt_xdate()
    return _save(fig, path)


def plot_backtest_comparison(dailies: dict[str, pd.DataFrame], path: PathLike, benchmark_label: str = "benchmark",
                             title: str = "") -> Path:
    """Several signals' backtests: cumulative return with cost and the benchmark (top), cumulative excess return
    with cost (bottom), as the official script's figure."""
    if not dailies:
        raise InputError("nothing to compare: no backtests given")
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    bench = None
    for name, d in dailies.items():
        axes[0].plot(d.index, (d["return"] - d["cost"]).cumsum(), lw=1.3, label=str(name))
        axes[1].plot(d.index, (d["return"] - d["bench"] - d["cost"]).cumsum(), lw=1.3, label=str(name))
        if bench is None:
            bench = d["bench"]
    axes[0].plot(bench.index, bench.cumsum(), color="black", ls="--", lw=1.2, label=benchmark_label)
    axes[0].set_title(title or "cumulative return with cost")
    axes[0].set_ylabel("cumulative return")
    axes[1].set_title("cumulative excess return with cost")
    axes[1].set_ylabel("cumulative excess return")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set_xlabel("date")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.autofmt_xdate()
    return _save(fig, path)


def frames_from_records(records: pd.DataFrame, symbol: str, anchor: Any = None
                        ) -> tuple[pd.DataFrame, Optional[tuple[pd.DataFrame, pd.DataFrame]], Optional[pd.DataFrame]]:
    """The forecast, quantile band and actual future of one forecast in a records frame, ready for
    :func:`plot_forecast` (``anchor`` defaults to the symbol's latest). Fields are the ``pred_*``/``true_*``
    columns without their prefix (close, volume, ...); the band uses the lowest and highest ``pred_*_q*``
    quantiles."""
    from kronos.evaluate.metrics import quantile_columns

    if "symbol" not in records.columns or "datetime" not in records.columns:
        raise InputError("forecast records need 'symbol' and 'datetime' columns")
    rows = records[records["symbol"] == symbol]
    if rows.empty:
        raise InputError(f"symbol '{symbol}' has no forecast records")
    anchors = pd.to_datetime(rows["datetime"])
    when = anchors.max() if anchor is None else pd.Timestamp(anchor)
    rows = rows[anchors == when]
    if rows.empty:
        raise InputError(f"symbol '{symbol}' has no forecast anchored at {when}")
    rows = rows.sort_values("step")
    if "timestamps" in rows.columns:
        index = pd.DatetimeIndex(pd.to_datetime(rows["timestamps"]), name="timestamps")
    else:
        index = pd.Index(rows["step"].to_numpy(), name="step")
    fields = [c[5:] for c in rows.columns if c.startswith("pred_") and "_" not in c[5:]]
    forecast = pd.DataFrame({f: rows[f"pred_{f}"].to_numpy(dtype=float) for f in fields}, index=index)
    truth = [f for f in fields if f"true_{f}" in rows.columns]
    actual = None
    if truth:
        actual = pd.DataFrame({f: rows[f"true_{f}"].to_numpy(dtype=float) for f in truth}, index=index)
        if actual.isna().all().all():
            actual = None
    band = None
    qcols = quantile_columns(rows)
    if len(qcols) >= 2:
        q_lo, q_hi = min(qcols), max(qcols)
        lo = pd.DataFrame({"close": rows[qcols[q_lo]].to_numpy(dtype=float)}, index=index)
        hi = pd.DataFrame({"close": rows[qcols[q_hi]].to_numpy(dtype=float)}, index=index)
        band = (lo, hi)
    return forecast, band, actual


__all__: Iterable[str] = [
    "plot_forecast", "plot_training_curves", "plot_backtest", "plot_backtest_comparison", "frames_from_records",
    "read_metrics_jsonl",
]
