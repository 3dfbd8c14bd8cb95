"""Forecast preparation with NumPy (kronos.inference.prepare): the same tensors, outputs and error messages as the
per-series path (KronosPredictor.prepare), without per-series pandas work on valid input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _support.models import tiny_predictor
from kronos.data.schema import time_features
from kronos.errors import InputError
from kronos.inference import KronosPredictor, SamplingConfig
from kronos.inference import predictor as predictor_module
from kronos.inference.prepare import time_feature_array
from kronos.timeutil import future_timestamps, future_timestamps_key, resolve_calendar

pytestmark = pytest.mark.usefixtures("one_thread")
COLS = ["open", "high", "low", "close", "volume", "amount"]
GREEDY = dict(T=1.0, top_k=1, top_p=1.0)


@pytest.fixture(scope="module")
def predictor() -> KronosPredictor:
    return tiny_predictor(seed=3, max_context=40, jitter=0.2)


def legacy(p: KronosPredictor) -> KronosPredictor:
    """The same predictor on the per-series path."""
    other = KronosPredictor(p.model, p.tokenizer, device="cpu", max_context=p.max_context, clip=p.clip,
                            truncate_history=p.truncate_history, keep_amount=p.keep_amount)  # fmt: skip
    other.fast_prepare = False
    return other


def series(n: int, seed: int, *, freq: str = "D", start: str = "2023-12-20", columns=COLS, tz=None,
           irregular: bool = False, dtype=np.float64, int_volume: bool = False):  # fmt: skip
    """A K-line frame of ``n`` bars with its timestamps."""
    rng = np.random.default_rng(seed)
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.02, n))) * 10.0 ** rng.integers(-2, 4)
    open_ = np.r_[close[0], close[:-1]]
    volume = rng.integers(100, 10**7, n).astype(np.int64 if int_volume else np.float64)
    data = {"open": open_, "high": np.maximum(open_, close) * 1.01, "low": np.minimum(open_, close) * 0.99,
            "close": close, "volume": volume, "amount": volume * close}  # fmt: skip
    df = pd.DataFrame({c: data[c] for c in columns})
    df = df.astype({c: dtype for c in columns if c != "volume" or not int_volume})
    if freq == "D":
        ts = pd.bdate_range(start, periods=n)
    else:
        ts = pd.date_range(start + " 09:30", periods=n, freq=freq)
    if irregular:
        ts = ts + pd.to_timedelta(np.cumsum(rng.integers(0, 3, n)), unit="D" if freq == "D" else "min")
    if tz is not None:
        ts = ts.tz_localize(tz)
    return df, pd.Series(ts)


def future(ts: pd.Series, pred_len: int) -> pd.Series:
    return pd.Series(future_timestamps(pd.DatetimeIndex(ts), pred_len))


def same_context(a, b) -> None:
    for name in ("x", "x_stamp", "y_stamp", "mean", "std"):
        va, vb = getattr(a, name), getattr(b, name)
        assert va.dtype == vb.dtype and va.shape == vb.shape, name
        assert va.tobytes() == vb.tobytes(), f"{name} differs"
    assert a.last_close == b.last_close
    pd.testing.assert_index_equal(a.y_index, b.y_index)


# ---------------------------------------------------------------------------------------------- pieces
def test_time_features_equal_pandas():
    rng = np.random.default_rng(0)
    ns = rng.integers(pd.Timestamp("1901-03-01").value, pd.Timestamp("2099-12-31").value, 5000)
    ns = np.r_[ns, pd.date_range("1999-12-31 23:00", periods=300, freq="7min").asi8]
    want = time_features(pd.DatetimeIndex(ns)).to_numpy().astype(np.float32)
    np.testing.assert_array_equal(time_feature_array(ns), want)
    np.testing.assert_array_equal(time_feature_array(ns.reshape(-1, 10)), want.reshape(-1, 10, 5))


@pytest.mark.parametrize("calendar", [None, "XSHG", "24/7"])
def test_future_timestamps_key_decides_the_continuation(calendar):
    """Histories with equal keys get equal continuations (the cache of the fast path relies on it)."""
    histories = [
        pd.bdate_range("2024-01-01", periods=30),
        pd.bdate_range("2023-06-01", periods=30)[::2].append(pd.bdate_range("2024-01-01", periods=30)[-10:]),
        pd.date_range("2024-01-02 09:30", periods=200, freq="5min"),
        pd.date_range("2024-01-01 09:35", periods=200, freq="5min"),
        pd.date_range("2024-01-01", periods=30, freq="D"),  # weekends: every day
        pd.date_range("2020-01-01", periods=12, freq="MS"),
    ]
    seen: dict = {}
    for h in histories:
        for cut in (len(h), len(h) - 1):
            idx = pd.DatetimeIndex(h[:cut]).as_unit("ns")
            key = future_timestamps_key(idx.asi8, calendar)
            got = future_timestamps(idx, 7, calendar=calendar)
            if key in seen:
                pd.testing.assert_index_equal(got, seen[key])
            seen[key] = got


# ---------------------------------------------------------------------------------------------- predict_batch
def batch_inputs(pred_len: int = 5):
    cases = [
        series(60, 0),
        series(40, 1, columns=COLS[:5]),  # no amount: derived
        series(33, 2, columns=COLS[:4]),  # no volume: zeros
        series(50, 3, freq="5min"),  # intraday
        series(45, 4, freq="5min", irregular=True),
        series(60, 5, irregular=True),
        series(70, 6, tz="Asia/Shanghai", freq="30min"),
        series(40, 7, dtype=np.float32),
        series(41, 8, int_volume=True, columns=COLS[:5]),
        series(8, 9),  # the minimum history
        series(60, 10),  # same length as the first
        series(52, 11, columns=[*COLS[:4], "amount"]),  # amount without volume
    ]
    dfs = [df for df, _ in cases]
    xts = [ts for _, ts in cases]
    yts = [future(ts, pred_len) for ts in xts]
    yts[1] = list(yts[1])  # a plain list of timestamps
    yts[2] = pd.DatetimeIndex(yts[2])
    xts[5] = xts[5].astype("datetime64[s]")  # another unit
    xts[7] = list(xts[7])
    xts[10] = pd.DatetimeIndex(xts[10])
    dfs[10] = dfs[10].assign(timestamps=xts[10], turnover=np.arange(len(dfs[10])))  # more columns than the six
    return dfs, xts, yts


@pytest.mark.parametrize("options", [{}, {"truncate_history": True}, {"keep_amount": True}, {"clip": 2.5}])
def test_prepare_many_equals_per_series(options):
    p = tiny_predictor(seed=3, max_context=40, jitter=0.2, **options)
    dfs, xts, yts = batch_inputs()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KronosPredictor, "prepare", refuse)
        fast = p.prepare_many(dfs, xts, yts, 5)
    for i, (df, xt, yt) in enumerate(zip(dfs, xts, yts)):
        same_context(fast[i], p.prepare(df, xt, yt, 5))


def test_predict_batch_outputs_identical(predictor):
    dfs, xts, yts = batch_inputs(pred_len=4)
    old = legacy(predictor)
    for kw in (dict(sample_count=1, **GREEDY), dict(sample_count=3, seed=7, return_samples=True, return_p_up=True)):
        got = predictor.predict_batch(dfs, xts, yts, 4, verbose=False, **kw)
        want = old.predict_batch(dfs, xts, yts, 4, verbose=False, **kw)
        for g, w in zip(got, want):
            if isinstance(g, tuple):
                pd.testing.assert_frame_equal(g[0], w[0], check_exact=True)
                np.testing.assert_array_equal(g[1], w[1])
            else:
                pd.testing.assert_frame_equal(g, w, check_exact=True)
    df, xt, yt = dfs[3], xts[3], yts[3]
    pd.testing.assert_frame_equal(
        predictor.predict(df, xt, yt, 4, verbose=False, **GREEDY), old.predict(df, xt, yt, 4, verbose=False, **GREEDY)
    )


def broken_batches():
    """(name, change) pairs: each breaks series 1 of a valid batch."""

    def nan(df, xt, yt):
        df = df.copy()
        df.loc[5, "close"] = np.nan
        return df, xt, yt

    def inf_volume(df, xt, yt):
        df = df.copy()
        df.loc[7, "volume"] = np.inf
        return df, xt, yt

    def overflow(df, xt, yt):
        df = df.copy()
        df.loc[3, "amount"] = 1e300
        return df, xt, yt

    def text(df, xt, yt):
        return df.assign(volume=df["volume"].astype(str)), xt, yt

    def flags(df, xt, yt):
        return df.assign(volume=df["volume"] > 0), xt, yt

    def repeated(df, xt, yt):
        xt = xt.copy()
        xt.iloc[4] = xt.iloc[3]
        return df, xt, yt

    def nat(df, xt, yt):
        xt = xt.copy()
        xt.iloc[2] = pd.NaT
        return df, xt, yt

    def short(df, xt, yt):
        return df.iloc[:5], xt.iloc[:5], yt

    def empty(df, xt, yt):
        return df.iloc[:0], xt.iloc[:0], yt

    def no_close(df, xt, yt):
        return df.drop(columns="close"), xt, yt

    def x_length(df, xt, yt):
        return df, xt.iloc[:-1], yt

    def y_length(df, xt, yt):
        return df, xt, yt.iloc[:-1]

    def y_early(df, xt, yt):
        return df, xt, pd.Series(xt.iloc[-3:].to_numpy())

    def y_order(df, xt, yt):
        return df, xt, yt.iloc[::-1].reset_index(drop=True)

    def not_frame(df, xt, yt):
        return df.to_numpy(), xt, yt

    def bad_stamps(df, xt, yt):
        return df, ["soon"] * len(df), yt

    return [(f.__name__, f) for f in (nan, inf_volume, overflow, text, flags, repeated, nat, short, empty, no_close,
                                       x_length, y_length, y_early, y_order, not_frame, bad_stamps)]  # fmt: skip


@pytest.mark.parametrize("name,change", broken_batches())
def test_bad_batch_input_same_message(predictor, name, change):
    dfs, xts, yts = (list(v) for v in batch_inputs(pred_len=3))
    yts[1] = pd.Series(yts[1])
    dfs[1], xts[1], yts[1] = change(dfs[1], xts[1], yts[1])
    dfs[4], xts[4], yts[4] = change(dfs[4], xts[4], yts[4])  # the first bad series is named
    messages = []
    for p in (predictor, legacy(predictor)):
        with pytest.raises(InputError) as err:
            p.predict_batch(dfs, xts, yts, 3, verbose=False, **GREEDY)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and messages[0].startswith("series 1: ") and "\n" not in messages[0]


# ---------------------------------------------------------------------------------------------- predict_df
def long_frame(specs: dict, shuffle: bool = True) -> pd.DataFrame:
    parts = []
    for k, (symbol, kw) in enumerate(specs.items()):
        df, ts = series(seed=k, **kw)
        parts.append(df.assign(symbol=symbol, timestamps=ts.to_numpy() if ts.dt.tz is None else ts))
    frame = pd.concat(parts, ignore_index=True)
    return frame.sample(frac=1.0, random_state=1) if shuffle else frame


DAILY = {"AAA": dict(n=60), "BBB": dict(n=45, irregular=True), "CCC": dict(n=30), "DDD": dict(n=6),
         "EEE": dict(n=60, start="2023-11-01")}  # fmt: skip
INTRADAY = {"X1": dict(n=200, freq="5min"), "X2": dict(n=150, freq="5min", start="2023-12-21"),
            "X3": dict(n=90, freq="15min", irregular=True)}  # fmt: skip


def refuse(*args, **kwargs):
    raise AssertionError("the per-series path was taken")


def same_records(p: KronosPredictor, frame: pd.DataFrame, **kw) -> pd.DataFrame:
    with pytest.MonkeyPatch.context() as patch:  # valid input: the fast path only
        patch.setattr(predictor_module, "_forecast_tasks", refuse)
        patch.setattr(KronosPredictor, "prepare", refuse)
        got = p.predict_df_paths(frame, progress=False, **kw)
    want = legacy(p).predict_df_paths(frame, progress=False, **kw)
    pd.testing.assert_frame_equal(got.records, want.records, check_exact=True)
    np.testing.assert_array_equal(got.samples, want.samples)
    return got.records


@pytest.mark.parametrize(
    "specs,kw",
    [
        (DAILY, dict(pred_len=5, lookback=20)),
        (DAILY, dict(pred_len=5, calendar="XSHG")),
        (DAILY, dict(pred_len=3, calendar="24/7", lookback=12, batch_size=2)),
        (INTRADAY, dict(pred_len=12)),
        (INTRADAY, dict(pred_len=6, calendar="XSHG", lookback=50)),
        ({"A": dict(n=50, columns=COLS[:4]), "B": dict(n=40, columns=COLS[:4])}, dict(pred_len=4)),  # no volume
        ({"A": dict(n=50, columns=COLS[:5]), "B": dict(n=44, int_volume=True, columns=COLS[:5])}, dict(pred_len=4)),
        ({"A": dict(n=50, dtype=np.float32), "B": dict(n=35, dtype=np.float32)}, dict(pred_len=4)),
        (
            {
                "T1": dict(n=80, freq="30min", tz="America/New_York"),
                "T2": dict(n=60, freq="30min", tz="America/New_York", irregular=True),
            },
            dict(pred_len=20),
        ),  # fmt: skip
    ],
)
def test_predict_df_identical(predictor, specs, kw):
    frame = long_frame(specs)
    same_records(predictor, frame, sample_count=3, seed=11, **kw)
    same_records(predictor, frame, sample_count=1, **GREEDY, **{k: v for k, v in kw.items() if k != "batch_size"})


def test_predict_df_anchors_and_given_future_identical(predictor):
    frame = long_frame(DAILY)
    days = sorted(frame["timestamps"].unique())
    same_records(predictor, frame, pred_len=4, lookback=15, anchors=days[10:60:7], sample_count=2, seed=1,
                 batch_size=3)  # fmt: skip
    own = {s: sorted(frame.loc[frame["symbol"] == s, "timestamps"]) for s in ("AAA", "BBB")}
    pairs = [("AAA", own["AAA"][-1]), ("BBB", own["BBB"][20]), ("AAA", own["AAA"][30])]
    same_records(predictor, frame, pred_len=3, anchors=pairs, sample_count=2, seed=2)
    later = pd.bdate_range(max(days) + pd.Timedelta(days=1), periods=3)
    same_records(predictor, frame, pred_len=3, future_timestamps=later, sample_count=1, **GREEDY)
    given = {s: later for s in DAILY}
    same_records(predictor, frame, pred_len=3, future_timestamps=given, sample_count=1, **GREEDY)


def test_predict_df_truncated_history_identical():
    p = tiny_predictor(seed=3, max_context=16, jitter=0.2, truncate_history=True)
    same_records(p, long_frame(DAILY), pred_len=3, lookback=30, sample_count=2, seed=4)


def test_iter_predict_df_chunks_concatenate_to_predict_df(predictor):
    frame = long_frame(DAILY)
    kw = dict(pred_len=3, lookback=10, sample_count=4, seed=5, batch_size=2, progress=False)
    chunks = list(predictor.iter_predict_df(frame, **kw))
    assert [len(c.records) for c in chunks] == [6, 6]  # DDD is too short
    pd.testing.assert_frame_equal(
        pd.concat([c.records for c in chunks], ignore_index=True), predictor.predict_df(frame, **kw), check_exact=True
    )


def broken_frames():
    def nan(frame):
        frame.loc[frame.index[frame["symbol"] == "BBB"][-2], "high"] = np.nan
        return frame

    def repeated(frame):
        rows = frame.index[frame["symbol"] == "CCC"]
        frame.loc[rows[3], "timestamps"] = frame.loc[rows[4], "timestamps"]
        return frame

    def text(frame):
        return frame.assign(amount=frame["amount"].astype(str))

    def nat(frame):
        frame.loc[frame.index[5], "timestamps"] = pd.NaT
        return frame

    def strings(frame):
        return frame.assign(timestamps=frame["timestamps"].astype(str).where(frame["symbol"] != "AAA", "later"))

    def no_low(frame):
        return frame.drop(columns="low")

    def all_short(frame):
        return frame[frame["symbol"] == "DDD"]

    return [(f.__name__, f) for f in (nan, repeated, text, nat, strings, no_low, all_short)]


@pytest.mark.parametrize("name,change", broken_frames())
def test_bad_frame_same_message(predictor, name, change):
    frame = change(long_frame(DAILY).reset_index(drop=True))
    messages = []
    for p in (predictor, legacy(predictor)):
        with pytest.raises(InputError) as err:
            p.predict_df(frame, pred_len=3, sample_count=1, progress=False, **GREEDY)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]


def test_bad_future_and_anchor_same_message(predictor):
    frame = long_frame(DAILY)
    early = pd.bdate_range("2020-01-01", periods=3)
    cases = [
        dict(future_timestamps=early),
        dict(future_timestamps={"AAA": early}),
        dict(anchors=[("AAA", pd.Timestamp("1999-01-01"))]),
        dict(anchors=[("ZZZ", frame["timestamps"].max())]),
        dict(lookback=2),  # contexts shorter than a forecast needs (MIN_HISTORY)
    ]
    for kw in cases:
        messages = []
        for p in (predictor, legacy(predictor)):
            with pytest.raises(InputError) as err:
                p.predict_df(frame, pred_len=3, sample_count=1, progress=False, **GREEDY, **kw)
            messages.append(str(err.value))
        assert messages[0] == messages[1]


# ---------------------------------------------------------------------------------------------- structure
def test_valid_input_never_takes_the_per_series_path(predictor, monkeypatch):
    """200 valid series (predict_batch) and 200 symbols (predict_df): no per-series check, no pandas time features,
    no per-symbol task frames, and each distinct calendar continuation computed once."""

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return future_timestamps(*args, **kwargs)

    monkeypatch.setattr(KronosPredictor, "prepare", refuse)
    monkeypatch.setattr(predictor_module, "calc_time_stamps", refuse)
    monkeypatch.setattr(predictor_module, "time_features", refuse)
    monkeypatch.setattr(predictor_module, "_forecast_tasks", refuse)
    monkeypatch.setattr(predictor_module, "_records", refuse)
    monkeypatch.setattr("kronos.inference.prepare.future_timestamps", counted)
    dfs, xts, yts = [], [], []
    for i in range(200):
        df, ts = series(20 + i % 7, i, columns=COLS[: 4 + i % 3])
        dfs.append(df)
        xts.append(ts)
        yts.append(future(ts, 2))
    assert len(predictor.prepare_many(dfs, xts, yts, 2)) == 200
    frame = pd.concat([df.assign(symbol=f"S{i:03d}", timestamps=ts) for i, (df, ts) in enumerate(zip(dfs, xts))])
    frame = frame.fillna({"volume": 1.0, "amount": 1.0})
    out = predictor.predict_df(frame, pred_len=2, sample_count=1, batch_size=64, progress=False, **GREEDY)
    assert out["symbol"].nunique() == 200
    assert len(calls) == 7  # one continuation per distinct last bar


# ---------------------------------------------------------------------------------------------- latest forecasts
def test_table_stream_writes_what_write_table_writes(tmp_path):
    from kronos import io as kio
    from kronos.pipeline import _TableStream

    frame = long_frame(DAILY, shuffle=False).reset_index(drop=True)
    frame["anchor"] = frame["timestamps"]
    stream = _TableStream(tmp_path / "a" / "table")
    for start in range(0, len(frame), 37):
        stream.append(frame.iloc[start : start + 37])
    stream.commit()
    stream.discard()
    kio.write_table(frame, tmp_path / "b" / "table")
    import pyarrow.parquet as pq

    a, b = tmp_path / "a" / "table", tmp_path / "b" / "table"
    assert pq.read_schema(f"{a}.parquet").equals(pq.read_schema(f"{b}.parquet"), check_metadata=True)
    pd.testing.assert_frame_equal(pd.read_parquet(f"{a}.parquet"), pd.read_parquet(f"{b}.parquet"))
    assert a.with_suffix(".csv").read_text() == b.with_suffix(".csv").read_text()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["table.csv", "table.parquet"]  # no leftovers


def test_pipeline_latest_forecasts_streamed_by_chunk(tmp_path, dataset, monkeypatch):
    """The predict step writes forecast_latest chunk by chunk: the same rows and schema as predict_df's records
    written whole; a stale symbol (data ending early) goes to forecast_stale."""
    from _support.training import tiny_config
    from kronos import io as kio
    from kronos.pipeline import KronosPipeline

    cfg = tiny_config(tmp_path, dataset, backtest_batch_size=6, inference_sample_count=2)  # 3 forecasts a chunk
    pipe = KronosPipeline(cfg)
    frame = pipe.full_frame()
    last = frame["symbol"].iloc[-1]
    pipe._frame = frame[(frame["symbol"] != last) | (frame["timestamps"] < frame["timestamps"].max())].reset_index(
        drop=True
    )  # one symbol ends a bar early: stale
    pipe._predictor = tiny_predictor(seed=1, max_context=64, jitter=0.2)
    seen = []
    chunks = pipe._predict_chunks

    def spy(**kw):
        for chunk in chunks(**kw):
            seen.append(len(chunk.records))
            yield chunk

    monkeypatch.setattr(pipe, "_predict_chunks", spy)
    forecasts = pipe.predict()
    assert len(seen) == 3 and sum(seen) == 8 * cfg.predict_window  # 8 symbols in chunks of 3
    whole = pipe._predictor.predict_df(
        pipe._frame, pred_len=cfg.predict_window, lookback=cfg.lookback_window, quantiles=cfg.quantiles,
        calendar=resolve_calendar(cfg.trading_calendar, cfg.data_source), sampling=SamplingConfig.from_config(cfg),
        batch_size=3, progress=False,
    )  # fmt: skip
    fresh = whole["anchor"] >= pipe._frame["timestamps"].max()
    pd.testing.assert_frame_equal(forecasts, whole.loc[fresh, forecasts.columns], check_exact=True)
    out = Path(cfg.backtest_dir)
    kio.write_table(whole.loc[fresh, forecasts.columns], tmp_path / "ref" / "forecast_latest")
    import pyarrow.parquet as pq

    assert pq.read_schema(out / "forecast_latest.parquet").equals(
        pq.read_schema(tmp_path / "ref" / "forecast_latest.parquet"), check_metadata=True
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "forecast_latest.parquet"), pd.read_parquet(tmp_path / "ref" / "forecast_latest.parquet")
    )
    stale = pd.read_parquet(out / "forecast_stale.parquet")
    assert list(stale["symbol"].unique()) == [last] and pipe.result.stale_forecast_file
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
