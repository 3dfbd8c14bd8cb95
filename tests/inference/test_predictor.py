"""KronosPredictor: DataFrame API, timestamps, batching of unequal histories, samples/quantiles, input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from _support.models import tiny_predictor
from kronos.errors import InputError
from kronos.inference import KronosPredictor, prob_up
from kronos.model import build_predictor, build_tokenizer

COLS = ["open", "high", "low", "close", "volume", "amount"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def predictor() -> KronosPredictor:
    return tiny_predictor(seed=21, max_context=24, jitter=0.2, sharpen=("proj_s1",), clip=5)


def make_series(n: int, pred_len: int, seed: int = 0, start: str = "2024-03-01 09:30", freq: str = "5min"):
    rng = np.random.default_rng(seed)
    close = 20 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[close[0], close[:-1]]
    df = pd.DataFrame({
        "open": open_, "high": np.maximum(open_, close) * 1.002, "low": np.minimum(open_, close) * 0.998,
        "close": close, "volume": rng.integers(100, 1000, n).astype(float),
    })  # fmt: skip
    df["amount"] = df["volume"] * df["close"]
    ts = pd.Series(pd.date_range(start, periods=n + pred_len, freq=freq), name="timestamps")
    return df, ts[:n].reset_index(drop=True), ts[n:].reset_index(drop=True)


GREEDY = dict(T=1.0, top_k=1, top_p=1.0, verbose=False)


def test_predict_output_layout(predictor):
    df, xt, yt = make_series(30, 5)
    out = predictor.predict(df, xt, yt, 5, **GREEDY)
    assert list(out.columns) == COLS
    assert list(out.index) == list(yt) and out.index.name == "timestamps"
    assert out.shape == (5, 6) and np.isfinite(out.to_numpy()).all()
    assert out["close"].between(df["close"].min() * 0.5, df["close"].max() * 2).all()
    assert list(df.columns) == COLS  # the caller's frame is untouched


def test_timestamp_types_are_equivalent(predictor):
    df, xt, yt = make_series(30, 5)
    ref = predictor.predict(df, xt, yt, 5, **GREEDY)
    variants = [
        (pd.DatetimeIndex(xt), pd.DatetimeIndex(yt)),
        (list(xt.dt.to_pydatetime()), list(yt.dt.to_pydatetime())),
        (xt.to_numpy(), yt.to_numpy()),
        ([str(t) for t in xt], [str(t) for t in yt]),
    ]
    for x_ts, y_ts in variants:
        out = predictor.predict(df, x_ts, y_ts, 5, **GREEDY)
        np.testing.assert_array_equal(out.to_numpy(), ref.to_numpy())
        assert list(out.index) == list(yt)


def test_cached_and_uncached_predict_identical(predictor):
    df, xt, yt = make_series(40, 8, seed=2)  # 40 > max_context 24: window always slides
    a = predictor.predict(df, xt, yt, 8, **GREEDY)
    b = predictor.predict(df, xt, yt, 8, use_cache=False, **GREEDY)
    pd.testing.assert_frame_equal(a, b)
    df, xt, yt = make_series(18, 10, seed=3)  # slides from step 6
    pd.testing.assert_frame_equal(predictor.predict(df, xt, yt, 10, **GREEDY),
                                  predictor.predict(df, xt, yt, 10, use_cache=False, **GREEDY))  # fmt: skip


def test_predict_batch_unequal_lengths_equals_one_by_one(predictor):
    series = [make_series(n, 6, seed=s) for s, n in enumerate([30, 12, 30, 50, 12])]
    dfs, xts, yts = (list(v) for v in zip(*series))
    batch = predictor.predict_batch(dfs, xts, yts, 6, **GREEDY)
    assert len(batch) == 5
    for (df, xt, yt), got in zip(series, batch):
        single = predictor.predict(df, xt, yt, 6, **GREEDY)
        pd.testing.assert_frame_equal(got, single, check_exact=False, rtol=1e-5, atol=1e-6)
    uncached = predictor.predict_batch(dfs, xts, yts, 6, use_cache=False, **GREEDY)
    for a, b in zip(batch, uncached):
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)


def test_seed_and_samples(predictor):
    df, xt, yt = make_series(30, 6, seed=4)
    kwargs = dict(T=1.0, top_p=0.9, sample_count=5, verbose=False)
    mean_a, samples_a = predictor.predict(df, xt, yt, 6, seed=123, return_samples=True, **kwargs)
    mean_b, samples_b = predictor.predict(df, xt, yt, 6, seed=123, return_samples=True, **kwargs)
    pd.testing.assert_frame_equal(mean_a, mean_b)
    np.testing.assert_array_equal(samples_a, samples_b)
    assert samples_a.shape == (5, 6, 6) and samples_a.dtype == np.float32
    assert not np.array_equal(samples_a[0], samples_a[1])
    # the mean is the average of the paths (taken in normalised space, hence only close in price space)
    np.testing.assert_allclose(mean_a.to_numpy(), samples_a.mean(0), rtol=1e-5, atol=1e-3)
    other = predictor.predict(df, xt, yt, 6, seed=124, **kwargs)
    assert not np.array_equal(other.to_numpy(), mean_a.to_numpy())
    # plain predict with the same seed gives the same mean
    pd.testing.assert_frame_equal(predictor.predict(df, xt, yt, 6, seed=123, **kwargs), mean_a)
    batch = predictor.predict_batch([df, df], [xt, xt], [yt, yt], 6, seed=9, return_samples=True, **kwargs)
    assert len(batch) == 2 and all(s.shape == (5, 6, 6) for _, s in batch)


def test_quantiles(predictor):
    df, xt, yt = make_series(30, 6, seed=5)
    qs = predictor.predict_quantiles(df, xt, yt, 6, quantiles=(0.1, 0.5, 0.9), sample_count=12, seed=1,
                                     verbose=False)  # fmt: skip
    assert list(qs) == [0.1, 0.5, 0.9]
    for frame in qs.values():
        assert list(frame.columns) == COLS and list(frame.index) == list(yt)
    assert (qs[0.1].to_numpy() <= qs[0.5].to_numpy() + 1e-9).all()
    assert (qs[0.5].to_numpy() <= qs[0.9].to_numpy() + 1e-9).all()
    assert (qs[0.9] - qs[0.1]).to_numpy().sum() > 0
    _, samples = predictor.predict(df, xt, yt, 6, sample_count=12, seed=1, return_samples=True, verbose=False)
    np.testing.assert_allclose(qs[0.5].to_numpy(), np.quantile(samples, 0.5, axis=0), rtol=1e-6)
    batch = predictor.predict_quantiles_batch([df, df.iloc[5:]], [xt, xt.iloc[5:]], [yt, yt], 6, sample_count=4,
                                              verbose=False)  # fmt: skip
    assert len(batch) == 2 and set(batch[1]) == {0.1, 0.5, 0.9}
    with pytest.raises(InputError, match="quantiles"):
        predictor.predict_quantiles(df, xt, yt, 6, quantiles=(1.5,), verbose=False)


def test_prob_up_rule():
    paths = np.array([[1.0, 2.0], [3.0, 0.5], [2.0, 2.0]])  # 3 paths x 2 steps (closes)
    np.testing.assert_allclose(prob_up(paths, 1.5), [2 / 3, 2 / 3])
    np.testing.assert_allclose(prob_up(paths, 2.0), [1 / 3, 0.0])  # a path ending at the last close is not "up"
    batch = np.stack([paths, paths + 10])  # [2 series, 3 paths, 2 steps], one last close each
    np.testing.assert_allclose(prob_up(batch, np.array([1.5, 1.5])), [[2 / 3, 2 / 3], [1.0, 1.0]])
    with pytest.raises(ValueError, match="samples, steps"):
        prob_up(np.array([1.0, 2.0]), 1.0)


def test_predict_prob_up_per_step(predictor):
    df, xt, yt = make_series(30, 6, seed=8)
    kw = dict(T=1.0, top_p=0.9, sample_count=16, seed=3, verbose=False)
    plain = predictor.predict(df, xt, yt, 6, **kw)
    out, samples = predictor.predict(df, xt, yt, 6, return_p_up=True, return_samples=True, **kw)
    assert list(out.columns) == COLS + ["p_up"]
    pd.testing.assert_frame_equal(out[COLS], plain)  # the forecast itself is unchanged
    expected = np.mean(samples[:, :, COLS.index("close")] > df["close"].iloc[-1], axis=0)
    np.testing.assert_array_equal(out["p_up"].to_numpy(), expected)
    assert ((out["p_up"] * 16) % 1 == 0).all() and out["p_up"].between(0, 1).all()
    # batches of unequal histories: each series against its own last close
    d2, x2, y2 = make_series(40, 6, seed=9)
    res = predictor.predict_batch([df, d2], [xt, x2], [yt, y2], 6, return_p_up=True, return_samples=True, **kw)
    for (frame, paths), hist in zip(res, (df, d2)):
        np.testing.assert_array_equal(frame["p_up"].to_numpy(), prob_up(paths[..., 3], hist["close"].iloc[-1]))
    qs = predictor.predict_quantiles(df, xt, yt, 6, quantiles=(0.1, 0.9), return_p_up=True, **kw)
    assert set(qs) == {0.1, 0.9, "p_up"}
    pd.testing.assert_series_equal(qs["p_up"], out["p_up"])


def test_quantiles_p_up_with_calibration(predictor):
    from kronos.evaluate.calibration import fit_calibration, model_fingerprint

    rng = np.random.default_rng(0)
    last = rng.uniform(10, 50, 200)
    true = last[:, None] * (1 + rng.normal(0, 0.01, (200, 6)))
    paths = last[:, None, None] * (1 + rng.normal(0.002, 0.004, (200, 20, 6)))  # overconfident in an up move
    cal = fit_calibration(paths, last, true, np.arange(200), levels=[0.8], lookback=30,
                          fingerprint=model_fingerprint(predictor, 30, 6), context_vol=np.full(200, 0.01))  # fmt: skip
    df, xt, yt = make_series(30, 6, seed=8)
    kw = dict(T=1.0, top_p=0.9, sample_count=16, seed=3, verbose=False)
    qs = predictor.predict_quantiles(df, xt, yt, 6, quantiles=(0.1, 0.9), calibration=cal, return_p_up=True, **kw)
    _, samples = predictor.predict(df, xt, yt, 6, return_samples=True, **kw)
    close = samples[None, :, :, 3]
    np.testing.assert_array_equal(qs["p_up"].to_numpy(), prob_up(close, [df["close"].iloc[-1]])[0])
    np.testing.assert_allclose(qs["p_up_calibrated"].to_numpy(),
                               cal.p_up_calibrated(close, np.array([df["close"].iloc[-1]]))[0])  # fmt: skip


def test_shared_context_sampling_matches_reference_for_unequal_histories(predictor):
    """Seeded sampling with the context shared across paths (default) draws the same paths as the reference
    algorithm, for a batch of series of different lengths and with the window sliding (max_context 24)."""
    series = [make_series(n, 8, seed=n) for n in (12, 20, 30)]
    args = [list(v) for v in zip(*series)]
    kw = dict(T=1.0, top_p=0.9, sample_count=6, seed=11, verbose=False, return_samples=True)
    fast = predictor.predict_batch(*args, 8, **kw)
    ref = predictor.predict_batch(*args, 8, use_cache=False, **kw)
    for (mean_a, paths_a), (mean_b, paths_b) in zip(fast, ref):
        np.testing.assert_allclose(paths_a, paths_b, rtol=1e-5, atol=1e-4)
        pd.testing.assert_frame_equal(mean_a, mean_b, check_exact=False, rtol=1e-5, atol=1e-4)


def test_volume_and_amount_filling(predictor):
    df, xt, yt = make_series(30, 5, seed=6)
    # amount absent -> volume * mean(open, high, low, close)
    derived = df.drop(columns="amount")
    explicit = df.assign(amount=df["volume"] * df[["open", "high", "low", "close"]].mean(axis=1))
    pd.testing.assert_frame_equal(predictor.predict(derived, xt, yt, 5, **GREEDY),
                                  predictor.predict(explicit, xt, yt, 5, **GREEDY))  # fmt: skip
    # volume absent -> volume and amount are zero, even if amount is given (Q10); zero sigma -> pred * 1e-5
    out = predictor.predict(df.drop(columns="volume"), xt, yt, 5, **GREEDY)
    assert np.abs(out[["volume", "amount"]].to_numpy()).max() < 1e-4
    ohlc = predictor.predict(df[["open", "high", "low", "close"]], xt, yt, 5, **GREEDY)
    pd.testing.assert_frame_equal(out, ohlc)


def test_train_mode_model_is_used_in_eval_mode(predictor):
    df, xt, yt = make_series(30, 5, seed=7)
    ref = predictor.predict(df, xt, yt, 5, **GREEDY)
    predictor.model.train()
    try:
        out = predictor.predict(df, xt, yt, 5, verbose=True, T=1.0, top_k=1, top_p=1.0)  # progress bar path too
        assert predictor.model.training
    finally:
        predictor.model.eval()
    pd.testing.assert_frame_equal(out, ref)


# ---------------------------------------------------------------------- errors
def _err(predictor, match, *args, **kwargs):
    with pytest.raises(InputError, match=match) as info:
        predictor.predict(*args, **{"verbose": False, **kwargs})
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_input_errors(predictor):
    df, xt, yt = make_series(30, 5)
    _err(predictor, r"missing price column\(s\) \['high', 'low'\]", df.drop(columns=["high", "low"]), xt, yt, 5)
    bad = df.copy()
    bad.loc[7, "close"] = np.nan
    _err(predictor, r"column 'close' has NaN at row 7", bad, xt, yt, 5)
    bad = df.copy()
    bad.loc[3, "volume"] = np.inf
    _err(predictor, r"column 'volume' has an infinite value at row 3", bad, xt, yt, 5)
    _err(predictor, "df is empty", df.iloc[:0], xt.iloc[:0], yt, 5)
    _err(predictor, "must be a pandas DataFrame", df.to_numpy(), xt, yt, 5)
    _err(predictor, r"len\(x_timestamp\) = 29 but df has 30 rows", df, xt.iloc[:29], yt, 5)
    _err(predictor, r"len\(y_timestamp\) = 5 but pred_len = 4", df, xt, yt, 4)
    _err(predictor, "pred_len must be an integer >= 1", df, xt, yt.iloc[:0], 0)
    swapped = xt.copy()
    swapped.iloc[[10, 11]] = swapped.iloc[[11, 10]].to_numpy()
    _err(predictor, "x_timestamp must be strictly increasing: position 11", df, swapped, yt, 5)
    _err(predictor, "y_timestamp must be strictly increasing", df, xt, yt.iloc[::-1], 5)
    _err(predictor, "y_timestamp must start after the last x_timestamp", df, xt, xt.iloc[-5:], 5)
    _err(predictor, "x_timestamp must hold datetimes", df, ["not a date"] * 30, yt, 5)
    _err(predictor, "column 'open' must be numeric", df.assign(open="x"), xt, yt, 5)
    _err(predictor, "sample_count must be an integer >= 1", df, xt, yt, 5, sample_count=0)
    _err(predictor, "temperature T must be a finite number > 0", df, xt, yt, 5, T=0)
    _err(predictor, "temperature T must be a finite number > 0", df, xt, yt, 5, T=float("inf"))
    _err(predictor, "top_k must be an integer >= 0", df, xt, yt, 5, top_k=-1)
    _err(predictor, r"top_p must be a number in \(0, 1\]", df, xt, yt, 5, top_p=2.0)
    _err(predictor, r"df has only 2 row\(s\) of history; give at least 8", df.iloc[:2], xt.iloc[:2], yt, 5)


def test_predict_batch_errors(predictor):
    df, xt, yt = make_series(30, 5)
    with pytest.raises(InputError, match="same length, got 2, 1, 2"):
        predictor.predict_batch([df, df], [xt], [yt, yt], 5, verbose=False)
    with pytest.raises(InputError, match="df_list is empty"):
        predictor.predict_batch([], [], [], 5, verbose=False)
    with pytest.raises(InputError, match="df_list must be a list"):
        predictor.predict_batch(df, [xt], [yt], 5, verbose=False)
    with pytest.raises(InputError, match=r"series 1: .*missing price column\(s\) \['close'\]"):
        predictor.predict_batch([df, df.drop(columns="close")], [xt, xt], [yt, yt], 5, verbose=False)
    with pytest.raises(InputError, match=r"series 0: len\(y_timestamp\) = 4 but pred_len = 5"):
        predictor.predict_batch([df], [xt], [yt.iloc[:4]], 5, verbose=False)


def test_mismatched_tokenizer_is_rejected():
    with pytest.raises(InputError, match="tokenizer bits"):
        KronosPredictor(build_predictor("tiny"), build_tokenizer("tiny", s1_bits=5, s2_bits=5), device="cpu")


def test_history_truncation_and_amount_options(predictor):
    # Q7 option: only the last max_context bars feed statistics and the tokenizer
    df, xt, yt = make_series(60, 5, seed=9)
    opt = KronosPredictor(predictor.model, predictor.tokenizer, device="cpu", max_context=24, truncate_history=True)
    tail = opt.predict(df, xt, yt, 5, **GREEDY)
    manual = predictor.predict(
        df.iloc[-24:].reset_index(drop=True), xt.iloc[-24:].reset_index(drop=True), yt, 5, **GREEDY
    )
    pd.testing.assert_frame_equal(tail, manual)
    official = predictor.predict(df, xt, yt, 5, **GREEDY)
    assert not np.allclose(official.to_numpy(), tail.to_numpy())  # the default keeps the whole history
    # Q10 option: a supplied amount survives a missing volume
    keep = KronosPredictor(predictor.model, predictor.tokenizer, device="cpu", max_context=24, keep_amount=True)
    out = keep.predict(df.drop(columns="volume"), xt, yt, 5, **GREEDY)
    assert np.abs(out["volume"].to_numpy()).max() < 1e-4
    assert out["amount"].abs().min() > 0.1 * df["amount"].min()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_cuda_device_is_one_line(predictor):
    for device in ("cuda", "cuda:3", "nonsense"):
        with pytest.raises(InputError) as info:
            KronosPredictor(predictor.model, predictor.tokenizer, device=device)
        assert "\n" not in str(info.value) and "device" in str(info.value)
