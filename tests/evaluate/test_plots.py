"""Figures are written as valid PNGs, atomically, from the formats the pipeline produces."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kronos.errors import DataError, InputError
from kronos.evaluate import frames_from_records, plot_backtest, plot_forecast, plot_training_curves
from kronos.evaluate.plots import DOWN, UP, drawdown, plot_forecast_vs_actual, plot_ic_over_time

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def _kline(n: int, start: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 10 + np.cumsum(rng.normal(0, 0.1, n))
    idx = pd.date_range(start, periods=n, freq="5min")
    return pd.DataFrame(
        {"open": close, "high": close + 0.1, "low": close - 0.1, "close": close, "volume": rng.uniform(1e4, 2e4, n)},
        index=idx,
    )


def test_plot_forecast_with_band_and_actual(tmp_path):
    hist = _kline(60, "2024-01-02 09:30", 0)
    fut_idx = pd.date_range(hist.index[-1] + pd.Timedelta("5min"), periods=12, freq="5min")
    fc = _kline(12, str(fut_idx[0]), 1)
    lo, hi = fc[["close"]] - 0.3, fc[["close"]] + 0.3
    actual = _kline(12, str(fut_idx[0]), 2)
    out = plot_forecast(hist, fc, (lo, hi), actual, "SH600000 forecast", tmp_path / "fc" / "forecast.png")
    assert out == tmp_path / "fc" / "forecast.png" and _is_png(out)
    assert [p.name for p in (tmp_path / "fc").iterdir()] == ["forecast.png"]  # no temporary left behind


def test_plot_forecast_timestamps_column_and_close_only(tmp_path):
    hist = _kline(30, "2024-01-02", 3)[["close"]].reset_index(names="timestamps")
    fc = _kline(5, "2024-01-02 02:30", 4)[["close"]].reset_index(names="timestamps")
    out = plot_forecast(hist, fc, path=tmp_path / "f.png")
    assert _is_png(out)
    with pytest.raises(InputError, match="path"):
        plot_forecast(hist, fc)
    with pytest.raises(InputError, match="close"):
        plot_forecast(hist.rename(columns={"close": "price"}), fc, path=tmp_path / "g.png")


def test_frames_from_records_feed_plot_forecast(tmp_path):
    anchor = pd.Timestamp("2024-03-01")
    steps = np.arange(1, 6)
    recs = pd.DataFrame(
        {
            "symbol": "S",
            "anchor": anchor,
            "step": steps,
            "timestamps": anchor + pd.to_timedelta(steps, unit="D"),
            "close": 10 + 0.1 * steps,
            "volume": 1000.0,
            "close_q0.1": 9.5 + 0.1 * steps,
            "close_q0.9": 10.5 + 0.1 * steps,
            "last_close": 10.0,
            "true_close": 10 + 0.05 * steps,
        }
    )
    fc, band, actual = frames_from_records(recs, "S")
    assert list(fc.columns) == ["close", "volume"] and isinstance(fc.index, pd.DatetimeIndex)
    assert band is not None and band[0]["close"].iloc[0] == pytest.approx(9.6)
    assert actual["close"].iloc[-1] == pytest.approx(10.25)
    hist = pd.DataFrame(
        {"close": np.linspace(9, 10, 20), "volume": 1000.0}, index=pd.date_range(end=anchor, periods=20, freq="D")
    )
    assert _is_png(plot_forecast(hist, fc, band, actual, "S", tmp_path / "s.png"))


def test_plot_training_curves_from_jsonl_and_list(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(1, 51):
        lines.append({"step": step, "epoch": step // 10, "train/loss": 5.0 / step, "lr": 1e-4 * min(1, step / 5)})
        if step % 10 == 0:
            lines.append({"step": step, "epoch": step // 10, "val/loss": 6.0 / step})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert _is_png(plot_training_curves(path, tmp_path / "curves.png"))
    assert _is_png(plot_training_curves(lines[:20], tmp_path / "curves2.png", title="tokenizer"))
    with pytest.raises(DataError, match="loss"):
        plot_training_curves([{"step": 1, "lr": 0.1}], tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "train/loss": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        plot_training_curves(bad, tmp_path / "y.png")


def test_plot_backtest(tmp_path):
    idx = pd.bdate_range("2024-01-01", periods=40)
    rng = np.random.default_rng(0)
    daily = pd.DataFrame(
        {"return": rng.normal(0.001, 0.01, 40), "cost": 0.0002, "bench": rng.normal(0.0, 0.01, 40)}, index=idx
    )
    assert _is_png(plot_backtest(daily, tmp_path / "bt.png", title="test"))
    with pytest.raises(InputError, match="bench"):
        plot_backtest(daily.drop(columns=["bench"]), tmp_path / "bt2.png")


def _has_colour(path, hex_colour: str, min_pixels: int = 20) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=-1) < 0.02).sum()) >= min_pixels


def test_forecast_figure_draws_candles_band_and_prob_up(tmp_path):
    hist = _kline(80, "2024-01-02 09:30", 3)
    rng = np.random.default_rng(1)
    hist["open"] = hist["close"] + rng.normal(0, 0.05, len(hist))  # rising and falling bars
    hist["high"] = hist[["open", "close"]].max(axis=1) + 0.05
    hist["low"] = hist[["open", "close"]].min(axis=1) - 0.05
    idx = pd.date_range(hist.index[-1] + pd.Timedelta(minutes=5), periods=12, freq="5min")
    fc = pd.DataFrame(
        {"open": 10.0, "high": 10.2, "low": 9.8, "close": np.linspace(10, 10.5, 12), "volume": 1.5e4}, index=idx
    )
    lo, hi = fc - 0.3, fc + 0.3
    out = plot_forecast(hist, fc, (lo, hi), None, "candles", tmp_path / "c.png", prob_up=np.linspace(0.3, 0.8, 12))
    assert _is_png(out) and _has_colour(out, UP) and _has_colour(out, DOWN)


@pytest.mark.slow
def test_importing_plots_leaves_the_matplotlib_backend_alone():
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg'); import kronos.evaluate.plots, kronos.evaluate; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_drawdown_ic_and_forecast_vs_actual_figures(tmp_path):
    cum = pd.Series([0.0, 0.1, 0.05, 0.2, -0.1, 0.0])
    assert np.allclose(drawdown(cum), [0.0, 0.0, -0.05, 0.0, -0.3, -0.2])
    dates = pd.bdate_range("2024-01-02", periods=40)
    rng = np.random.default_rng(0)
    ic = pd.DataFrame({"ic": rng.normal(0.03, 0.1, 40), "rank_ic": rng.normal(0.02, 0.1, 40)}, index=dates)
    assert _is_png(plot_ic_over_time(ic, tmp_path / "ic.png"))
    rows = []
    for sym in ("AAA", "BBB"):
        for k, d in enumerate(dates):
            true = 10 + 0.1 * k
            rows.append(
                {
                    "symbol": sym,
                    "anchor": d,
                    "step": 1,
                    "timestamps": d + pd.offsets.BDay(1),
                    "close": true + 0.05,
                    "true_close": true,
                    "last_close": true - 0.1,
                    "close_q0.1": true - 0.2,
                    "close_q0.9": true + 0.2,
                }
            )
    out = plot_forecast_vs_actual(pd.DataFrame(rows), ["AAA", "BBB", "ZZZ"], tmp_path / "fva.png")
    assert _is_png(out)
    with pytest.raises(InputError, match="step 3"):
        plot_forecast_vs_actual(pd.DataFrame(rows), ["AAA"], tmp_path / "x.png", step=3)
    daily = pd.DataFrame(
        {"return": rng.normal(0, 0.01, 40), "cost": 0.0005, "bench": rng.normal(0, 0.01, 40)}, index=dates
    )
    assert _is_png(plot_backtest(daily, tmp_path / "bt.png"))
