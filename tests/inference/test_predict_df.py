"""KronosPredictor.predict_df: a long frame of many symbols in, long records out; from_pretrained in one call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _support.models import tiny_predictor
from kronos.errors import InputError
from kronos.inference import KronosPredictor, SamplingConfig
from kronos.inference.bands import prob_up, sample_quantiles
from kronos.inference.predictor import MIN_HISTORY

COLS = ["open", "high", "low", "close", "volume", "amount"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def predictor() -> KronosPredictor:
    return tiny_predictor(seed=5, max_context=24, jitter=0.2)


def long_frame(lengths: dict, freq: str = "D") -> pd.DataFrame:
    parts = []
    for k, (symbol, n) in enumerate(lengths.items()):
        rng = np.random.default_rng(k)
        close = 10 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
        open_ = np.r_[close[0], close[:-1]]
        parts.append(pd.DataFrame({
            "symbol": symbol, "timestamps": pd.bdate_range("2024-01-01", periods=n, freq="B" if freq == "D" else freq),
            "open": open_, "high": np.maximum(open_, close) * 1.01, "low": np.minimum(open_, close) * 0.99,
            "close": close, "volume": rng.integers(100, 1000, n).astype(float),
        }))  # fmt: skip
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=0)  # order must not matter


GREEDY = dict(T=1.0, top_k=1, top_p=1.0, progress=False)


def test_latest_forecast_per_symbol_matches_predict(predictor):
    frame = long_frame({"BBB": 40, "AAA": 30})
    out = predictor.predict_df(frame, pred_len=4, lookback=20, sample_count=1, **GREEDY)
    assert list(out.columns[:10]) == ["symbol", "anchor", "step", "timestamps", *COLS]
    assert {f"{c}_q0.1" for c in COLS} <= set(out.columns)
    assert list(out.columns[-3:]) == ["last_close", "close_scale", "true_close"] and "p_up" in out.columns
    assert list(out["symbol"]) == ["AAA"] * 4 + ["BBB"] * 4 and list(out["step"]) == [1, 2, 3, 4] * 2
    assert out["true_close"].isna().all()  # nothing after the last bar
    # the same forecast through the per-series API
    g = frame[frame["symbol"] == "AAA"].sort_values("timestamps").iloc[-20:].reset_index(drop=True)
    a = out[out["symbol"] == "AAA"]
    assert a["anchor"].iloc[0] == g["timestamps"].iloc[-1] and a["last_close"].iloc[0] == g["close"].iloc[-1]
    assert a["timestamps"].iloc[0] > g["timestamps"].iloc[-1]
    ref = predictor.predict(
        g[COLS[:5]], g["timestamps"], pd.Series(a["timestamps"].to_numpy()), 4, T=1.0, top_k=1, top_p=1.0, verbose=False
    )
    np.testing.assert_allclose(a[COLS].to_numpy(), ref.to_numpy(), rtol=1e-5)
    # close_scale is the predictor's normalisation scale of close over the 20-bar context
    assert a["close_scale"].iloc[0] == pytest.approx(float(np.std(g["close"].to_numpy(np.float32))) + 1e-5, rel=1e-6)


def test_anchors_rolling_with_true_close_and_samples(predictor):
    frame = long_frame({"AAA": 40, "BBB": 35})
    ts = frame.loc[frame["symbol"] == "AAA", "timestamps"].sort_values()
    anchors = list(ts.iloc[[5, 25, 33, 39]])  # first one has too little history; 39 is AAA's last bar
    paths = predictor.predict_df_paths(
        frame,
        pred_len=3,
        lookback=20,
        anchors=anchors,
        sample_count=4,
        seed=1,
        quantiles=(0.25, 0.75),
        batch_size=2,
        progress=False,
    )
    out, samples = paths.records, paths.samples
    keys = out.groupby(["symbol", "anchor"], sort=False).size()
    assert list(keys.index) == [
        ("AAA", ts.iloc[25]),
        ("AAA", ts.iloc[33]),
        ("AAA", ts.iloc[39]),
        ("BBB", ts.iloc[25]),
        ("BBB", ts.iloc[33]),
    ]
    assert samples.shape == (5, 4, 3, 6)
    aaa = frame[frame["symbol"] == "AAA"].sort_values("timestamps")["close"].to_numpy()
    first = out.iloc[:3]
    np.testing.assert_array_equal(first["true_close"].to_numpy(), aaa[26:29])
    assert list(first["timestamps"]) == list(ts.iloc[26:29])
    assert out[(out["symbol"] == "AAA") & (out["anchor"] == ts.iloc[39])]["true_close"].isna().all()
    # records are the mean and the one quantile rule over the returned samples
    np.testing.assert_allclose(out["close"].to_numpy(), samples[:, :, :, 3].mean(axis=1).reshape(-1), rtol=1e-5)
    last = out.groupby(["symbol", "anchor"], sort=False)["last_close"].first().to_numpy()
    np.testing.assert_allclose(
        out["p_up"].to_numpy(), (samples[:, :, :, 3] > last[:, None, None]).mean(axis=1).reshape(-1)
    )
    q = sample_quantiles(samples, (0.25, 0.75), axis=1)
    np.testing.assert_allclose(out["close_q0.75"].to_numpy(), q[1, :, :, 3].reshape(-1))
    # P(up): share of the paths above the anchor bar's close, per step
    last = out["last_close"].to_numpy().reshape(-1, 3)[:, 0]
    np.testing.assert_array_equal(out["p_up"].to_numpy(), prob_up(samples[:, :, :, 3], last).reshape(-1))
    # seeded sampling is reproducible
    again = predictor.predict_df(
        frame,
        pred_len=3,
        lookback=20,
        anchors=anchors,
        sample_count=4,
        seed=1,
        quantiles=(0.25, 0.75),
        batch_size=2,
        progress=False,
    )
    pd.testing.assert_frame_equal(out, again)


def test_a_plain_frame_uses_the_history_it_has(predictor, caplog):
    """No lookback: 200 daily bars of two symbols give 5 steps each, from up to max_context bars of history; a
    series below the minimum is skipped with a line naming it; sampling settings travel as one value."""
    frame = long_frame({"AAA": 200, "BBB": 200})
    out = predictor.predict_df(frame, pred_len=5, **GREEDY)
    assert out.groupby("symbol")["step"].apply(list).to_dict() == {"AAA": [1, 2, 3, 4, 5], "BBB": [1, 2, 3, 4, 5]}
    capped = predictor.predict_df(frame, pred_len=5, lookback=predictor.max_context, **GREEDY)
    pd.testing.assert_frame_equal(out, capped)  # the context is the last max_context bars
    # histories shorter than max_context (and of different lengths) are used whole
    short = long_frame({"AAA": 15, "BBB": 12, "CCC": MIN_HISTORY - 1})
    with caplog.at_level("WARNING"):
        got = predictor.predict_df(short, pred_len=2, **GREEDY)
    assert sorted(got["symbol"].unique()) == ["AAA", "BBB"] and "CCC@" in caplog.text
    one = short[short["symbol"] == "BBB"]
    np.testing.assert_allclose(
        got.loc[got["symbol"] == "BBB", COLS].to_numpy(),
        predictor.predict_df(one, pred_len=2, lookback=12, **GREEDY)[COLS].to_numpy(),
    )
    with pytest.raises(InputError, match=f"minimum of {MIN_HISTORY}"):
        predictor.predict_df(short[short["symbol"] == "CCC"], pred_len=2, **GREEDY)
    settings = SamplingConfig(T=1.0, top_k=1, top_p=1.0, sample_count=1, seed=3)
    pd.testing.assert_frame_equal(predictor.predict_df(short, pred_len=2, sampling=settings, progress=False), got)


def test_anchor_pairs_and_errors(predictor):
    frame = long_frame({"AAA": 30, "BBB": 30})
    t = frame["timestamps"].max()
    out = predictor.predict_df(frame, pred_len=2, lookback=10, anchors=[("BBB", t)], sample_count=1, **GREEDY)
    assert set(out["symbol"]) == {"BBB"} and len(out) == 2
    pairs = pd.DataFrame({"symbol": ["AAA"], "anchor": [t]})
    assert len(predictor.predict_df(frame, pred_len=2, lookback=10, anchors=pairs, sample_count=1, **GREEDY)) == 2
    with pytest.raises(InputError, match="not a bar"):
        predictor.predict_df(frame, pred_len=2, lookback=10, anchors=[("AAA", t + pd.Timedelta(hours=1))], **GREEDY)
    with pytest.raises(InputError, match="ZZZ"):
        predictor.predict_df(frame, pred_len=2, lookback=10, anchors=[("ZZZ", t)], **GREEDY)
    with pytest.raises(InputError, match="'ticker'"):
        predictor.predict_df(frame, id_column="ticker", pred_len=2, **GREEDY)
    with pytest.raises(InputError, match="lookback=50"):
        predictor.predict_df(frame, pred_len=2, lookback=50, **GREEDY)
    dup = pd.concat([frame, frame.iloc[:1]])
    with pytest.raises(InputError, match="strictly increasing"):
        predictor.predict_df(dup, pred_len=2, lookback=10, **GREEDY)


def test_future_timestamps_override(predictor):
    frame = long_frame({"AAA": 30})
    fut = pd.date_range("2030-01-01", periods=2, freq="D")
    out = predictor.predict_df(frame, pred_len=2, lookback=10, future_timestamps=fut, sample_count=1, **GREEDY)
    assert list(out["timestamps"]) == list(fut)


def test_from_pretrained_loads_both(tmp_path, predictor):
    predictor.tokenizer.save_pretrained(tmp_path / "tok")
    predictor.model.save_pretrained(tmp_path / "model")
    loaded = KronosPredictor.from_pretrained(
        str(tmp_path / "tok"), tmp_path / "model", device="cpu", max_context=24, clip=4
    )
    assert loaded.clip == 4 and loaded.max_context == 24
    frame = long_frame({"AAA": 30})
    a = predictor.predict_df(frame, pred_len=2, lookback=10, sample_count=1, **GREEDY)
    b = loaded.predict_df(frame, pred_len=2, lookback=10, sample_count=1, **GREEDY)
    pd.testing.assert_frame_equal(a, b)


def test_quantiles_and_forecasting_live_in_one_place():
    """np.quantile only in kronos.inference / kronos.evaluate; pipeline.py is wiring (no numerics, no time logic)."""
    src = Path(__file__).resolve().parents[2] / "src" / "kronos"
    offenders = [
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if "np.quantile(" in p.read_text(encoding="utf-8")
        and p.relative_to(src).parts[0] not in ("inference", "evaluate")
    ]
    assert offenders == []
    pipeline = (src / "pipeline.py").read_text(encoding="utf-8")
    for banned in ("import numpy", "np.", ".std(", "future_timestamps", "1e-5"):
        assert banned not in pipeline, banned


def test_generate_is_the_official_normalised_entry_point(predictor):
    """``generate`` (the official predictor's inner call) on prepared arrays gives predict()'s forecast in
    normalised units."""
    from kronos.data.schema import norm_scale

    g = long_frame({"AAA": 30}).sort_values("timestamps").reset_index(drop=True)
    future = pd.Series(pd.bdate_range(g["timestamps"].iloc[-1] + pd.offsets.BDay(1), periods=3))
    item = predictor.prepare(g[COLS[:5]], g["timestamps"], future, 3)
    out = predictor.generate(item.x[None], item.x_stamp[None], item.y_stamp[None], 3, 1.0, 1, 1.0, 1, False)
    ref = predictor.predict(g[COLS[:5]], g["timestamps"], future, 3, T=1.0, top_k=1, top_p=1.0, verbose=False)
    assert out.shape == (1, 3, 6)
    np.testing.assert_allclose(out[0] * norm_scale(item.std) + item.mean, ref[COLS].to_numpy(), rtol=1e-5)
