"""One K-line vocabulary (kronos.data.schema): a user's file with aliased headers reads as the canonical frame, and
every layer derives time features, the volume/amount rule and the normalisation scale the same way."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _support.models import tiny_predictor
from kronos.data import schema
from kronos.data.processing import add_time_features
from kronos.data.sources.csv import read_kline_file
from kronos.data.windows import WindowDataset
from kronos.inference import calc_time_stamps
from kronos.inference.predictor import FEATURE_COLS, PRICE_COLS


def test_a_gbk_export_with_chinese_headers_reads_as_the_frame_the_predictor_takes(tmp_path):
    # an A-share export: GBK text, Chinese headers, the date and the time of day in two columns, columns in the
    # export's own order
    export = pd.DataFrame(
        {
            "日期": ["2024-06-18", "2024-06-18", "2024-06-18"],
            "时间": ["09:35", "09:40", "09:45"],
            "收盘": [10.2, 10.3, 10.1],
            "开盘": [10.0, 10.2, 10.3],
            "最高": [10.4, 10.5, 10.3],
            "最低": [9.9, 10.1, 10.0],
            "成交量": [100.0, 200.0, 300.0],
            "成交额": [1020.0, 2060.0, 3030.0],
        }
    )
    path = tmp_path / "600000.csv"
    export.to_csv(path, index=False, encoding="gbk")
    frame = read_kline_file(path)
    assert list(frame.columns) == list(schema.KLINE_COLUMNS)
    assert list(frame["timestamps"]) == list(
        pd.to_datetime(["2024-06-18 09:35", "2024-06-18 09:40", "2024-06-18 09:45"])
    )
    values = frame[FEATURE_COLS].to_numpy()  # what the predictor reads, in its order
    np.testing.assert_array_equal(values[:, FEATURE_COLS.index("close")], [10.2, 10.3, 10.1])
    np.testing.assert_array_equal(values[:, FEATURE_COLS.index("open")], [10.0, 10.2, 10.3])
    np.testing.assert_array_equal(frame[PRICE_COLS].to_numpy()[0], [10.0, 10.4, 9.9, 10.2])
    np.testing.assert_array_equal(values[:, FEATURE_COLS.index("volume")], [100.0, 200.0, 300.0])
    np.testing.assert_array_equal(values[:, FEATURE_COLS.index("amount")], [1020.0, 2060.0, 3030.0])


def test_english_aliases_in_any_case_read_the_same_bars(tmp_path):
    # tushare-style daily bars: YYYYMMDD integers, vol and amt, a code column holding one symbol
    pd.DataFrame(
        {
            "Trade_Date": [20240102, 20240103],
            "CODE": ["000001", "000001"],
            "Open": [1.0, 2.0],
            "HIGH": [2.0, 3.0],
            "low": [1.0, 1.5],
            "Close": [2.0, 2.5],
            "Vol": [10.0, 20.0],
        }
    ).to_csv(tmp_path / "daily.csv", index=False)
    frame = read_kline_file(tmp_path / "daily.csv")
    assert list(frame.columns) == list(schema.KLINE_COLUMNS)
    assert list(frame["timestamps"]) == [pd.Timestamp("2024-01-02"), pd.Timestamp("2024-01-03")]
    np.testing.assert_array_equal(frame["close"], [2.0, 2.5])
    np.testing.assert_allclose(frame["amount"], [1.5 * 10.0, 2.25 * 20.0])  # no amount: mean(OHLC) x volume


def test_time_features_agree_across_layers():
    ts = pd.Series(pd.to_datetime(["2024-03-01 09:35", "2024-03-04 14:55", "2024-12-31 00:00"]))
    ref = schema.time_features(ts)
    assert list(ref.columns) == list(schema.TIME_FEATURES)
    # minute, hour, weekday (Monday = 0), day, month; a daily bar's midnight gives minute = hour = 0
    assert ref.to_numpy().tolist() == [[35, 9, 4, 1, 3], [55, 14, 0, 4, 3], [0, 0, 1, 31, 12]]
    frame = pd.DataFrame(
        {"timestamps": ts, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 1.0, "amount": 1.0}
    )
    pd.testing.assert_frame_equal(add_time_features(frame)[list(schema.TIME_FEATURES)], ref)
    np.testing.assert_array_equal(calc_time_stamps(ts).to_numpy(), ref.to_numpy())
    ds = WindowDataset(frame.assign(symbol="A"), lookback=1, predict=1)  # derives the features from timestamps
    np.testing.assert_array_equal(ds.stamps, ref.to_numpy(np.float32))


def test_volume_amount_rule():
    base = pd.DataFrame({"open": [1.0], "high": [3.0], "low": [1.0], "close": [3.0]})
    no_vol = schema.complete_volume_amount(base.assign(amount=7.0))
    assert no_vol[["volume", "amount"]].iloc[0].tolist() == [0.0, 0.0]
    kept = schema.complete_volume_amount(base.assign(amount=7.0), keep_amount=True)
    assert kept["amount"].iloc[0] == 7.0
    derived = schema.complete_volume_amount(base.assign(volume=10.0))
    assert derived["amount"].iloc[0] == pytest.approx(20.0)  # mean(OHLC)=2 x volume 10
    raw = schema.validate_kline_frame(base.assign(timestamps=["2024-01-02"], volume=[10.0]), "test")
    assert raw["amount"].iloc[0] == pytest.approx(20.0)


def test_training_windows_and_forecasts_normalise_a_context_alike():
    # the model must see the same numbers at training and at inference: mean and population std of the context,
    # std + 1e-5 (a flat column, here volume, becomes zeros rather than NaN), then the clip
    rng = np.random.default_rng(0)
    n = 24
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
    close[7] *= 1.5  # a spike beyond the clip
    frame = pd.DataFrame(
        {
            "timestamps": pd.date_range("2024-01-02 09:35", periods=n, freq="5min"),
            "open": close,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "volume": 500.0,
            "amount": close * 500.0,
        }
    )
    lookback, predict = n - 3, 2  # the window: the context, then predict + 1 rows
    window, _ = WindowDataset(frame.assign(symbol="A"), lookback=lookback, predict=predict, clip=2.0)[0]
    predictor = tiny_predictor(seed=0, max_context=32, clip=2.0)
    context = frame.iloc[:lookback]
    future = pd.Series(pd.date_range(context["timestamps"].iloc[-1], periods=4, freq="5min")[1:])
    prepared = predictor.prepare(context[FEATURE_COLS], context["timestamps"], future, 3)
    np.testing.assert_allclose(window.numpy()[:lookback], prepared.x, rtol=1e-5, atol=1e-5)
    assert np.isfinite(prepared.x).all() and (prepared.x[:, FEATURE_COLS.index("volume")] == 0).all()
    assert prepared.x.max() == 2.0  # the spike is clipped alike


def test_range_end_includes_the_whole_last_day():
    assert schema.range_end("2024-01-05") == pd.Timestamp("2024-01-05 23:59:59.999999999")
    assert schema.range_end("2024-01-05 10:30") == pd.Timestamp("2024-01-05 10:30")
