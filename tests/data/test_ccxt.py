"""The ``ccxt`` crypto source against a loopback server speaking Binance's public API: paging, retries, deadlines,
refused answers, per-symbol failures, the cache, amount from quote volume, and 24/7 future timestamps."""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ccxt")

from _support.binance_server import BinanceTestServer  # noqa: E402
from kronos.config import Config  # noqa: E402
from kronos.data.sources import crypto  # noqa: E402
from kronos.data.sources.base import DataProcessorFactory  # noqa: E402
from kronos.data.store import load_manifest  # noqa: E402
from kronos.errors import ConfigError, DataError, DependencyError  # noqa: E402
from kronos.timeutil import future_timestamps, resolve_calendar  # noqa: E402

SINCE, UNTIL = "2024-01-01", "2024-02-15"  # 45 days = 1080 hourly bars


@pytest.fixture(scope="module")
def server():
    with BinanceTestServer() as srv:
        yield srv


@pytest.fixture
def binance(server):
    server.clear()
    yield server
    server.clear()


def make_config(server, tmp_path, **overrides) -> Config:
    values = dict(
        data_source="ccxt",
        ccxt_api_url=server.root,
        ccxt_symbols=server.symbols,
        ccxt_since=SINCE,
        ccxt_until=UNTIL,
        ccxt_limit=300,
        ccxt_timeout=2.0,
        ccxt_retries=2,
        ccxt_pause=0.0,
        ccxt_cache_dir=str(tmp_path / "cache"),
        dataset_path=str(tmp_path / "dataset"),
        lookback_window=10,
        predict_window=2,
        split_ratios=[0.6, 0.2, 0.2],
    )
    values.update(overrides)
    return Config.from_dict(values)


def processor(server, tmp_path, **overrides):
    return DataProcessorFactory.create_processor("ccxt", make_config(server, tmp_path, **overrides))


def test_pages_with_the_limit_and_keeps_quote_volume_as_amount(binance, tmp_path):
    proc = processor(binance, tmp_path)
    proc.download_data()
    raw = proc.load_raw()
    assert sorted(raw) == ["BTC/USDT", "ETH/USDT"]
    btc = raw["BTC/USDT"]
    assert len(btc) == 45 * 24 and binance.request_count("klines BTCUSDT") == 4  # 300 + 300 + 300 + 180
    queries = [q for q in binance.kline_queries if q["symbol"] == "BTCUSDT"]
    assert [int(q["limit"]) for q in queries] == [300] * 4 and {q["interval"] for q in queries} == {"1h"}
    starts = [pd.Timestamp(int(q["startTime"]), unit="ms") for q in queries]
    assert starts == [pd.Timestamp(SINCE) + pd.Timedelta(hours=300 * k) for k in range(4)]
    assert binance.request_count("exchangeInfo") == 1  # markets loaded once for both symbols
    expected = binance.frame("BTC/USDT").head(len(btc))
    assert (btc["timestamps"].to_numpy() == expected["open_time"].to_numpy()).all()
    assert btc["timestamps"].dt.day_of_week.nunique() == 7  # 24/7: weekends are bars too
    np.testing.assert_allclose(btc["close"], expected["close"], rtol=1e-9)
    np.testing.assert_allclose(btc["volume"], expected["volume"], rtol=1e-7)  # base units
    np.testing.assert_allclose(btc["amount"], expected["quote"], rtol=1e-9)  # quote volume, not derived
    assert list(btc.columns) == ["timestamps", "open", "high", "low", "close", "volume", "amount"]


def test_default_limit_is_the_exchanges_maximum(binance, tmp_path):
    proc = processor(binance, tmp_path, ccxt_limit=0, ccxt_symbols=["BTC/USDT"])
    assert proc.page_limit() == 1000
    proc.download_data()
    assert binance.request_count("klines BTCUSDT") == 2  # 1000 + 80


@pytest.mark.parametrize("mode", ["429", "503"])
def test_rate_limit_and_server_errors_are_retried_then_succeed(binance, tmp_path, mode):
    binance.fail("BTCUSDT", mode, times=2)
    proc = processor(binance, tmp_path, ccxt_symbols=["BTC/USDT"])
    proc.download_data()
    assert not proc.skipped_symbols
    assert len(proc.load_raw()["BTC/USDT"]) == 1080
    assert binance.request_count("klines BTCUSDT") == 4 + 2


def test_retries_exhausted_and_client_errors_not_retried_name_the_symbol(binance, tmp_path):
    binance.fail("BTCUSDT", "500")
    binance.fail("ETHUSDT", "400")
    proc = processor(binance, tmp_path, ccxt_retries=1)
    with pytest.raises(DataError) as err:
        proc.download_data()
    msg = str(err.value)
    assert "\n" not in msg and "BTC/USDT" in msg and "ETH/USDT" in msg and "every symbol" in msg
    assert "after 2 attempt(s): HTTP 500" in proc.skipped_symbols["BTC/USDT"]
    assert "HTTP 400" in proc.skipped_symbols["ETH/USDT"] and "Invalid symbol." in proc.skipped_symbols["ETH/USDT"]
    assert binance.request_count("klines BTCUSDT") == 2 and binance.request_count("klines ETHUSDT") == 1


def test_dripping_server_is_cut_off_at_the_deadline(binance, tmp_path):
    binance.fail("BTCUSDT", "drip", delay=0.05)
    proc = processor(binance, tmp_path, ccxt_timeout=0.5, ccxt_retries=1)
    t0 = time.monotonic()
    proc.download_data()
    assert time.monotonic() - t0 < 5  # two attempts of 0.5 s, not the minutes the drip would take
    assert "deadline" in proc.skipped_symbols["BTC/USDT"] and "BTC/USDT" in proc.skipped_symbols["BTC/USDT"]
    assert "ETH/USDT" in proc.load_raw()


@pytest.mark.parametrize(
    "mode, words",
    [
        ("oversize", "exceeds the limit"),
        ("redirect_other_host", "refused a redirect"),
        ("malformed", "row 150 is malformed"),
        ("short_row", "row 0 is malformed"),
        ("too_many", "305 bars in a page asked for at most 300"),
        ("html", "not JSON"),
    ],
)
def test_hostile_answers_are_refused_for_that_symbol_only(binance, tmp_path, caplog, mode, words):
    binance.fail("BTCUSDT", mode)
    proc = processor(binance, tmp_path)
    with caplog.at_level(logging.WARNING):
        proc.download_data()
    reason = proc.skipped_symbols["BTC/USDT"]
    assert words in reason and "ccxt binance symbol 'BTC/USDT'" in reason and "\n" not in reason
    assert binance.request_count("klines BTCUSDT") == 1  # refused answers are not retried
    assert sorted(proc.load_raw()) == ["ETH/USDT"]
    assert "1 of 2 symbol(s) failed" in caplog.text


def test_cache_makes_a_rerun_fetch_only_what_failed(binance, tmp_path):
    binance.fail("ETHUSDT", "503")
    proc = processor(binance, tmp_path, ccxt_retries=0)
    proc.download_data()
    assert list(proc.skipped_symbols) == ["ETH/USDT"]
    binance.clear()
    again = processor(binance, tmp_path)
    again.download_data()
    assert not again.skipped_symbols
    assert binance.request_count("klines BTCUSDT") == 0 and binance.request_count("klines ETHUSDT") == 4
    # a damaged cache file is fetched again, not trusted
    again.cache_path("BTC/USDT").write_text("timestamps,open\nnot,a,bar\n")
    binance.clear()
    processor(binance, tmp_path).download_data()
    assert binance.request_count("klines BTCUSDT") == 4


def test_unknown_symbol_timeframe_and_exchange_are_one_line_errors(binance, tmp_path, monkeypatch):
    proc = processor(binance, tmp_path, ccxt_symbols=["DOGE/USDT", "BTC/USDT"])
    proc.download_data()
    assert "not a market of binance" in proc.skipped_symbols["DOGE/USDT"]
    with pytest.raises(ConfigError, match="ccxt_timeframe': binance has no timeframe '7m'"):
        processor(binance, tmp_path, ccxt_timeframe="7m").download_data()
    with pytest.raises(ConfigError, match="unknown exchange 'nosuchex'"):
        processor(binance, tmp_path, ccxt_exchange="nosuchex").download_data()
    with pytest.raises(ConfigError, match="ccxt_until"):
        processor(binance, tmp_path, ccxt_until="2023-12-01")
    with pytest.raises(ConfigError, match="ccxt_timeframe"):
        make_config(binance, tmp_path, ccxt_timeframe="hourly")
    monkeypatch.setitem(sys.modules, "ccxt", None)
    with pytest.raises(DependencyError, match=r"pip install 'kronos\[crypto\]'"):
        processor(binance, tmp_path).download_data()


def test_without_quote_volume_amount_is_derived_and_said_once(binance, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(crypto, "BINANCE_RAW_KLINES", {})  # as any exchange: ccxt's unified fetch_ohlcv
    proc = processor(binance, tmp_path)
    proc.download_data()
    with caplog.at_level(logging.INFO, logger="kronos.data.sources.crypto"):
        raw = proc.load_raw()
    btc = raw["BTC/USDT"]
    mid = btc[["open", "high", "low", "close"]].mean(axis=1)
    np.testing.assert_allclose(btc["amount"], btc["volume"] * mid)
    lines = [r.getMessage() for r in caplog.records if "derived amount" in r.getMessage()]
    assert len(lines) == 1 and "for 2 of 2 symbol(s)" in lines[0]
    assert proc.source_info["amount"].startswith("derived")


def test_run_pipeline_writes_a_24_7_dataset(binance, tmp_path):
    proc = processor(binance, tmp_path, ccxt_api_url=binance.root.replace("http://", "http://user:s3cret@"))
    manifest = proc.run_pipeline()
    assert manifest["source"] == "ccxt" and sorted(manifest["symbols"]) == ["BTC/USDT", "ETH/USDT"]
    assert load_manifest(tmp_path / "dataset")["source_info"]["timeframe"] == "1h"
    assert "s3cret" not in str(manifest)  # a proxy's password is never written
    assert manifest["median_bar_seconds"] == 3600


def test_future_timestamps_of_24_7_markets_include_weekends():
    assert resolve_calendar("auto", "ccxt") == "24/7"
    assert resolve_calendar("24/7") == "24/7"
    hist = pd.date_range("2024-01-05 00:00", "2024-01-05 23:00", freq="h")  # a Friday's hours
    fut = future_timestamps(hist, 30, calendar="24/7")
    assert fut[0] == pd.Timestamp("2024-01-06 00:00") and (fut.to_series().diff().dropna() == pd.Timedelta("1h")).all()
    # without a calendar, a history with weekend bars is read as a market open every day
    weekend = pd.date_range("2024-01-01", periods=72, freq="h") + pd.Timedelta(days=5)  # Sat..Mon
    fut = future_timestamps(weekend, 48)
    assert (fut.to_series().diff().dropna() == pd.Timedelta("1h")).all()
    daily = pd.date_range("2024-01-01", periods=14, freq="D")
    assert list(future_timestamps(daily, 3)) == list(pd.date_range("2024-01-15", periods=3, freq="D"))
    # stock-like history (no weekend bars) keeps business days
    bdays = pd.bdate_range("2024-01-01", periods=10)
    assert future_timestamps(bdays, 1)[0] == pd.Timestamp("2024-01-15")
