"""Figures: a forecast against its history (candlesticks), training curves, backtests, IC over time.

No global backend is chosen: figures are ``matplotlib.figure.Figure`` objects rendered by Agg when saved, so
importing this module leaves ``plt.show()`` in a notebook alone. Every figure is written atomically
(:func:`kronos.io.write_file`), so a reader never sees half a PNG. Time axes of K-line figures count
trading bars, not calendar time: weekends, holidays and overnight breaks leave no gaps or straight lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from kronos import io as kio
from kronos.data.schema import VALUE_COLUMNS
from kronos.errors import DataError, InputError
from kronos.inference.bands import quantile_columns

PathLike = str | os.PathLike
_TIME_COLUMNS = ("timestamps", "timestamp", "datetime", "date", "time")
UP, DOWN = "#26a69a", "#ef5350"  # candle colours (rising, falling)


def _figure(nrows: int, figsize: tuple, ratios: Sequence[float] | None = None, sharex: bool = True):
    fig = Figure(figsize=figsize)
    axes = fig.subplots(
        nrows, 1, sharex=sharex, squeeze=False, gridspec_kw={"height_ratios": list(ratios)} if ratios else None
    )
    return fig, axes[:, 0]


def save_figure(fig: Figure, path: PathLike | None, dpi: int = 120) -> Path:
    if path is None:
        raise InputError("a plot needs an output path (path=...)")
    return kio.write_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))


def _bar_axis(ax: Any, index: pd.Index) -> None:
    """Label integer bar positions with their timestamps (a trading-bar axis: no gaps for closed markets)."""
    idx = pd.DatetimeIndex(index) if isinstance(index, pd.DatetimeIndex) else None
    intraday = idx is not None and len(idx) > 1 and (idx != idx.normalize()).any()
    fmt = "%m-%d %H:%M" if intraday else "%Y-%m-%d"

    def label(x: float, _pos: Any) -> str:
        k = int(round(x))
        if idx is None or not 0 <= k < len(idx):
            return ""
        return idx[k].strftime(fmt)

    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(label))


def _candles(
    ax: Any, x: np.ndarray, frame: pd.DataFrame, alpha: float = 1.0, width: float = 0.7, label: str | None = None
) -> None:
    o, h, lo, c = (
        pd.to_numeric(frame[k], errors="coerce").to_numpy(dtype=float) for k in ("open", "high", "low", "close")
    )
    up = c >= o
    colors = np.where(up, UP, DOWN)
    ax.vlines(x, lo, h, colors=colors, lw=0.8, alpha=alpha)
    body = np.abs(c - o)
    body = np.where(body == 0, np.nanmax(np.r_[h - lo, 0.0]) * 1e-3 + 1e-12, body)
    ax.bar(
        x, body, bottom=np.minimum(o, c), width=width, color=colors, edgecolor=colors, lw=0.5, alpha=alpha, label=label
    )


def _has_ohlc(df: pd.DataFrame | None) -> bool:
    return df is not None and all(k in df.columns for k in ("open", "high", "low", "close"))


def _with_time_index(df: pd.DataFrame | None, what: str) -> pd.DataFrame | None:
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
    band: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    actual: pd.DataFrame | None = None,
    title: str = "",
    path: PathLike | None = None,
    prob_up: Sequence[float] | None = None,
) -> Path:
    """Candlesticks of the context (or its close line when it has no OHLC), the mean forecast continuing from the
    last close, an optional quantile band ``(lo, hi)`` around it, the optional actual future (candles), volume in
    a lower panel and, when given, P(up) per forecast step. The x axis counts trading bars. Frames are indexed by
    time or carry a ``timestamps`` column. Returns the PNG's path."""
    hist = _with_time_index(history, "history")
    fc = _with_time_index(forecast, "forecast")
    if hist is None or fc is None:
        raise InputError("history and forecast must be pandas DataFrames, got None")
    act = _with_time_index(actual, "actual")
    lo = hi = None
    if band is not None:
        if not (isinstance(band, (tuple, list)) and len(band) == 2):
            raise InputError("band must be a (lo, hi) pair of DataFrames or None")
        lo, hi = _with_time_index(band[0], "band lo"), _with_time_index(band[1], "band hi")
    close_h = _column(hist, "close", "history")
    close_f = _column(fc, "close", "forecast")
    n_h, n_f = len(hist), len(fc)
    xh = np.arange(n_h, dtype=float)
    xf = np.arange(n_h, n_h + n_f, dtype=float)
    axis_index = (
        hist.index.append(fc.index)
        if isinstance(hist.index, pd.DatetimeIndex) and isinstance(fc.index, pd.DatetimeIndex)
        else pd.RangeIndex(n_h + n_f)
    )
    has_volume = "volume" in hist.columns and "volume" in fc.columns
    panels = [3.0] + ([1.0] if has_volume else []) + ([0.8] if prob_up is not None else [])
    fig, axes = _figure(len(panels), (11, 3.5 + 2.0 * (len(panels) - 1) + 1.0), panels)
    ax = axes[0]
    if _has_ohlc(hist):
        _candles(ax, xh, hist, label="history")
    else:
        ax.plot(xh, close_h, color="tab:blue", lw=1.3, label="history")
    if act is not None and _has_ohlc(act):
        _candles(ax, xf[: len(act)], act.iloc[:n_f], alpha=0.45, label="actual")
    elif act is not None and "close" in act.columns:
        ax.plot(xf[: len(act)], _column(act, "close", "actual").to_numpy()[:n_f], color="black", lw=1.3, label="actual")
    last = float(close_h.iloc[-1]) if n_h else np.nan
    x_line = np.r_[xh[-1:], xf] if n_h else xf
    if lo is not None and hi is not None and "close" in lo.columns and "close" in hi.columns:
        lo_c = _column(lo, "close", "band lo").to_numpy(dtype=float)
        hi_c = _column(hi, "close", "band hi").to_numpy(dtype=float)
        if n_h:
            lo_c, hi_c = np.r_[last, lo_c], np.r_[last, hi_c]
        ax.fill_between(x_line, lo_c, hi_c, color="tab:red", alpha=0.18, lw=0, label="forecast band")
    y_line = np.r_[last, close_f.to_numpy(dtype=float)] if n_h else close_f.to_numpy(dtype=float)
    ax.plot(x_line, y_line, color="tab:red", lw=1.6, label="forecast (mean close)")
    if n_h:
        ax.axhline(last, color="grey", ls=":", lw=0.8)
        ax.axvline(n_h - 0.5, color="grey", ls=":", lw=1)
    ax.set_ylabel("price")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    if title:
        ax.set_title(title)
    k = 1
    if has_volume:
        vax = axes[k]
        k += 1
        vol_h = _column(hist, "volume", "history").to_numpy(dtype=float)
        colors = (
            np.where(close_h.to_numpy() >= _column(hist, "open", "history").to_numpy(), UP, DOWN)
            if "open" in hist.columns
            else "tab:blue"
        )
        vax.bar(xh, vol_h, width=0.7, color=colors, alpha=0.6, label="history")
        vax.bar(
            xf,
            _column(fc, "volume", "forecast").to_numpy(dtype=float),
            width=0.7,
            color="tab:purple",
            alpha=0.45,
            label="forecast",
        )
        vax.set_ylabel("volume")
        vax.grid(alpha=0.3)
        vax.legend(loc="upper left", fontsize=8)
    if prob_up is not None:
        pax = axes[k]
        p_up = np.asarray(prob_up, dtype=float)[:n_f]
        pax.bar(xf[: len(p_up)], p_up, width=0.7, color=np.where(p_up >= 0.5, UP, DOWN), alpha=0.8)
        pax.axhline(0.5, color="grey", lw=0.8)
        pax.set_ylim(0, 1)
        pax.set_ylabel("P(up)")
        pax.grid(alpha=0.3)
    _bar_axis(axes[-1], axis_index)
    return save_figure(fig, path)


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


def plot_training_curves(metrics: PathLike | Sequence[dict], path: PathLike, title: str = "") -> Path:
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
    fig, axes = _figure(2 if has_lr else 1, (10, 6.5 if has_lr else 4.5), [3, 1] if has_lr else None)
    ax = axes[0]
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
        axes[1].plot(x[ok], lr[ok], color="tab:green", lw=1.0)
        axes[1].set_ylabel("learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step" if "step" in frame.columns else "record")
    return save_figure(fig, path)


def drawdown(cumulative: pd.Series) -> pd.Series:
    """Drawdown of a summed cumulative return curve: its distance below the running peak (<= 0)."""
    return cumulative - cumulative.cummax().clip(lower=0.0)


def plot_backtest(daily: pd.DataFrame, path: PathLike, title: str = "") -> Path:
    """Cumulative (summed, as Qlib plots them) returns of the strategy and the benchmark (top), the cumulative
    excess return with and without cost (middle) and the drawdown of the excess return with cost (bottom),
    from a backtest's ``daily`` frame; the x axis counts trading days."""
    need = ("return", "cost", "bench")
    missing = [c for c in need if c not in daily.columns]
    if missing:
        raise InputError(f"backtest daily frame lacks column(s) {missing}")
    d = daily.astype({c: float for c in need})
    x = np.arange(len(d))
    fig, axes = _figure(3, (11, 9), [3, 2, 1.2])
    ax = axes[0]
    ax.plot(x, (d["return"] - d["cost"]).cumsum(), color="tab:red", lw=1.5, label="strategy (with cost)")
    ax.plot(x, d["return"].cumsum(), color="tab:orange", lw=1.0, ls="--", label="strategy (without cost)")
    ax.plot(x, d["bench"].cumsum(), color="black", lw=1.2, ls="--", label="benchmark")
    ax.set_ylabel("cumulative return (summed)")
    ax.set_title(title or "backtest")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax = axes[1]
    excess = (d["return"] - d["bench"] - d["cost"]).cumsum()
    ax.plot(x, excess, color="tab:red", lw=1.5, label="excess (with cost)")
    ax.plot(x, (d["return"] - d["bench"]).cumsum(), color="tab:blue", lw=1.0, label="excess (without cost)")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_ylabel("cumulative excess (summed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax = axes[2]
    dd = drawdown(excess)
    ax.fill_between(x, dd.to_numpy(), 0.0, color="tab:red", alpha=0.3, lw=0)
    ax.set_ylabel("drawdown\n(excess, with cost)")
    ax.set_xlabel("date")
    ax.grid(alpha=0.3)
    _bar_axis(axes[-1], pd.DatetimeIndex(d.index) if isinstance(d.index, pd.DatetimeIndex) else d.index)
    return save_figure(fig, path)


def plot_backtest_comparison(
    dailies: dict[str, pd.DataFrame], path: PathLike, benchmark_label: str = "benchmark", title: str = ""
) -> Path:
    """Several signals' backtests: cumulative return with cost and the benchmark (top), cumulative excess return
    with cost (bottom), as the official script's figure."""
    if not dailies:
        raise InputError("nothing to compare: no backtests given")
    fig, axes = _figure(2, (11, 7))
    bench = None
    index = None
    for name, d in dailies.items():
        x = np.arange(len(d))
        axes[0].plot(x, (d["return"] - d["cost"]).cumsum(), lw=1.3, label=str(name))
        axes[1].plot(x, (d["return"] - d["bench"] - d["cost"]).cumsum(), lw=1.3, label=str(name))
        if bench is None:
            bench, index = d["bench"], d.index
    assert bench is not None  # dailies is not empty
    axes[0].plot(np.arange(len(bench)), bench.cumsum(), color="black", ls="--", lw=1.2, label=benchmark_label)
    axes[0].set_title(title or "cumulative return with cost")
    axes[0].set_ylabel("cumulative return")
    axes[1].set_title("cumulative excess return with cost")
    axes[1].set_ylabel("cumulative excess return")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set_xlabel("date")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    _bar_axis(axes[-1], index)
    return save_figure(fig, path)


def plot_ic_over_time(ic: pd.DataFrame, path: PathLike, title: str = "", window: int = 20) -> Path:
    """Per-date cross-sectional IC and RankIC (bars), their ``window``-date rolling means, and the cumulative IC
    (a rising line = a signal that keeps working), from :func:`kronos.evaluate.metrics.daily_ic`'s frame."""
    cols = [c for c in ("ic", "rank_ic") if c in ic.columns]
    if ic.empty or not cols:
        raise InputError("no IC values to plot: need a frame with 'ic' and/or 'rank_ic' columns")
    d = ic[cols].astype(float)
    x = np.arange(len(d))
    fig, axes = _figure(2, (11, 6.5), [2, 1])
    ax = axes[0]
    for col, color in zip(cols, ("tab:blue", "tab:orange")):
        ax.bar(x, d[col].fillna(0.0).to_numpy(), width=0.8, color=color, alpha=0.3, label=f"{col} per date")
        ax.plot(
            x,
            d[col].rolling(window, min_periods=1).mean().to_numpy(),
            color=color,
            lw=1.6,
            label=f"{col} ({window}-date mean)",
        )
    ax.axhline(0.0, color="grey", lw=0.8)
    means = ", ".join(f"mean {c} {d[c].mean():.4f}" for c in cols)
    ax.set_title(title or f"IC over time ({means})")
    ax.set_ylabel("correlation")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    for col, color in zip(cols, ("tab:blue", "tab:orange")):
        axes[1].plot(x, d[col].fillna(0.0).cumsum().to_numpy(), color=color, lw=1.4, label=f"cumulative {col}")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    _bar_axis(axes[-1], pd.DatetimeIndex(d.index) if isinstance(d.index, pd.DatetimeIndex) else d.index)
    return save_figure(fig, path)


def plot_forecast_vs_actual(
    records: pd.DataFrame, symbols: Sequence[str], path: PathLike, step: int = 1, title: str = ""
) -> Path:
    """Realised close against the rolling ``step``-bar-ahead forecast (mean and band) for a few symbols, one
    panel each, on the bars of forecast records (:meth:`KronosPredictor.predict_df`'s schema)."""
    need = {"symbol", "step", "close", "true_close"}
    if not need <= set(records.columns):
        raise InputError(f"forecast records lack column(s) {sorted(need - set(records.columns))}")
    symbols = [s for s in symbols if (records["symbol"] == s).any()]
    if not symbols:
        raise InputError("none of the requested symbols has forecast records")
    rows = records[records["step"] == step]
    if rows.empty:
        raise InputError(f"no forecast records at step {step}")
    qcols = quantile_columns(rows)
    fig, axes = _figure(len(symbols), (11, 2.6 * len(symbols) + 0.6), sharex=False)
    time_col = "timestamps" if "timestamps" in rows.columns else "anchor"
    for ax, sym in zip(axes, symbols):
        r = rows[rows["symbol"] == sym].sort_values(time_col)
        x = np.arange(len(r))
        if len(qcols) >= 2:
            ax.fill_between(
                x,
                r[qcols[min(qcols)]].to_numpy(dtype=float),
                r[qcols[max(qcols)]].to_numpy(dtype=float),
                color="tab:red",
                alpha=0.18,
                lw=0,
                label=f"band q{min(qcols):g}-q{max(qcols):g}",
            )
        ax.plot(x, r["true_close"].to_numpy(dtype=float), color="black", lw=1.3, label="realised close")
        ax.plot(x, r["close"].to_numpy(dtype=float), color="tab:red", lw=1.2, label=f"forecast ({step}-bar ahead)")
        if "last_close" in r.columns:
            ax.plot(x, r["last_close"].to_numpy(dtype=float), color="grey", lw=0.8, ls="--", label="last value")
        ax.set_ylabel(str(sym))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
        _bar_axis(ax, pd.DatetimeIndex(pd.to_datetime(r[time_col])))
    axes[0].set_title(title or f"forecast vs realised close, {step}-bar ahead")
    return save_figure(fig, path)


def frames_from_records(
    records: pd.DataFrame, symbol: str, anchor: Any = None
) -> tuple[pd.DataFrame, tuple[pd.DataFrame, pd.DataFrame] | None, pd.DataFrame | None]:
    """The forecast, quantile band and actual future of one forecast in a records frame
    (:meth:`KronosPredictor.predict_df`'s schema), ready for :func:`plot_forecast` (``anchor`` defaults to the
    symbol's latest). The forecast holds the value columns present (open .. amount), the actual future the
    ``true_close`` column, the band the lowest and highest ``close_q*`` quantiles."""
    if "symbol" not in records.columns or "anchor" not in records.columns:
        raise InputError("forecast records need 'symbol' and 'anchor' columns")
    rows = records[records["symbol"] == symbol]
    if rows.empty:
        raise InputError(f"symbol '{symbol}' has no forecast records")
    anchors = pd.to_datetime(rows["anchor"])
    when = anchors.max() if anchor is None else pd.Timestamp(anchor)
    rows = rows[anchors == when]
    if rows.empty:
        raise InputError(f"symbol '{symbol}' has no forecast anchored at {when}")
    rows = rows.sort_values("step")
    if "timestamps" in rows.columns:
        index = pd.DatetimeIndex(pd.to_datetime(rows["timestamps"]), name="timestamps")
    else:
        index = pd.Index(rows["step"].to_numpy(), name="step")
    fields = [c for c in VALUE_COLUMNS if c in rows.columns]
    forecast = pd.DataFrame({f: rows[f].to_numpy(dtype=float) for f in fields}, index=index)
    actual = None
    if "true_close" in rows.columns:
        actual = pd.DataFrame({"close": rows["true_close"].to_numpy(dtype=float)}, index=index)
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


__all__: list[str] = [
    "plot_forecast",
    "plot_training_curves",
    "plot_backtest",
    "plot_backtest_comparison",
    "frames_from_records",
    "read_metrics_jsonl",
    "plot_ic_over_time",
    "plot_forecast_vs_actual",
    "drawdown",
]
