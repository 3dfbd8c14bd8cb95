"""One K-line vocabulary (kronos.data.schema): every layer derives time features, the volume/amount rule and the
normalisation scale the same way."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kronos.data import schema
from kronos.data.processing import add_time_features
from kronos.data.windows import WindowDataset
from kronos.inference import calc_time_stamps
from kronos.inference.predictor import FEATURE_COLS, PRICE_COLS


def test_column_tuples_are_unambiguous():
    assert schema.PRICE_COLUMNS == ("open", "high", "low", "close")
    assert schema.VALUE_COLUMNS == schema.PRICE_COLUMNS + ("volume", "amount")
    assert schema.KLINE_COLUMNS == ("timestamps",) + schema.VALUE_COLUMNS
    assert FEATURE_COLS == list(schema.VALUE_COLUMNS) and PRICE_COLS == list(schema.PRICE_COLUMNS)


def test_time_features_agree_across_layers():
    ts = pd.Series(pd.to_datetime(["2024-03-01 09:35", "2024-03-04 14:55", "2024-12-31 00:00"]))
    ref = schema.time_features(ts)
    assert list(ref.columns) == list(schema.TIME_FEATURES)
    assert ref.iloc[1].tolist() == [55, 14, 0, 4, 3]  # Monday = 0
    frame = pd.DataFrame({"timestamps": ts, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0,
                          "volume": 1.0, "amount": 1.0})
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


def test_norm_scale_and_range_end():
    assert schema.norm_scale(2.0) == 2.0 + 1e-5 and schema.NORM_EPS == 1e-5
    assert schema.range_end("2024-01-05") == pd.Timestamp("2024-01-05 23:59:59.999999999")
    assert schema.range_end("2024-01-05 10:30") == pd.Timestamp("2024-01-05 10:30")
