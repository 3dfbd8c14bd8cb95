"""Sina Finance source: parsing, the HTTP client against a loopback Sina server, the processor and its cache."""

from __future__ import annotations

import json
import logging
import socket
import time

import numpy as np
import pandas as pd
import pytest

from _support.sina_server import ANTI_EMBED_PREFIX, SinaTestServer
from kronos.config import Config
from kronos.data.sources.base import DataProcessorFactory
from kronos.data.sources.sina import (
    SINA_JSONP_URL,
    SinaClient,
    SinaDataProcessor,
    normalize_symbol,
    normalize_symbols,
    parse_kline_body,
)
from kronos.data.store import dataset_exists, load_manifest, load_split
from kronos.errors import ConfigError, DataError

ROW_MIN = {
    "day": "2024-01-10 14:55:00",
    "open": "6.570",
    "high": "6.580",
    "low": "6.560",
    "close": "6.570",
    "volume": "365900",
    "amount": "2404520.0000",
}
ROW_MIN2 = {
    "day": "2024-01-10 15:00:00",
    "open": "6.570",
    "high": "6.590",
    "low": "6.570",
    "close": "6.580",
    "volume": "512300",
    "amount": "3369841.0000",
}


@pytest.fixture(scope="module")
def server():
    with SinaTestServer() as srv:
        yield srv


@pytest.fixture
def sina(server):
    """The shared server with failures and request counts reset for each test."""
    server.clear_failures()
    with server._lock:
        server.requests.clear()
    yield server
    server.clear_failures()


def make_config(server: SinaTestServer, tmp_path, **overrides) -> Config:
    values = dict(
        data_source="sina",
        sina_symbols=server.symbols,
        sina_base_url=server.jsonp_url,
        sina_scale=240,
        sina_datalen=1023,
        sina_timeout=2.0,
        sina_retries=2,
        sina_pause=0.0,
        sina_cache_dir=str(tmp_path / "cache"),
        dataset_path=str(tmp_path / "dataset"),
        lookback_window=10,
        predict_window=2,
        split_ratios=[0.6, 0.2, 0.2],
    )
    values.update(overrides)
    return Config.from_dict(values)


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "wrap",
    [
        lambda p: f"{ANTI_EMBED_PREFIX}=({p});",  # the default URL's empty callback, with Sina's comment prefix
        lambda p: f"=({p});",
        lambda p: f"/*<script>location.href='//sina.com';</script>*/\nvar _sh600000_5_1700000000=({p});\n",
        lambda p: f"cb({p})",
        lambda p: p,  # the plain-JSON twin
        lambda p: "\n  " + p + "\n",
    ],
)
def test_parse_accepts_every_wrapper(wrap):
    body = wrap(json.dumps([ROW_MIN2, ROW_MIN]))  # out of order on purpose
    frame = parse_kline_body(body, "sh600000")
    assert list(frame.columns) == ["timestamps", "open", "high", "low", "close", "volume", "amount"]
    assert frame["timestamps"].dtype == "datetime64[ns]"
    assert all(frame[c].dtype == "float64" for c in frame.columns[1:])
    assert frame["timestamps"].tolist() == [pd.Timestamp("2024-01-10 14:55"), pd.Timestamp("2024-01-10 15:00")]
    assert frame.loc[0, "open"] == 6.57 and frame.loc[0, "volume"] == 365900.0 and frame.loc[1, "amount"] == 3369841.0


def test_parse_daily_dates_and_js_literal_keys():
    body = (
        '=([{day:"2024-01-09",open:"6.5",high:"6.6",low:"6.4",close:"6.55",volume:"100"},'
        '{day:"2024-01-10",open:"6.55",high:"6.7",low:"6.5",close:"6.6",volume:"200",amount:"1320.5"}]);'
    )
    frame = parse_kline_body(body, "sh600000")
    assert frame["timestamps"].tolist() == [pd.Timestamp("2024-01-09"), pd.Timestamp("2024-01-10")]
    assert np.isnan(frame.loc[0, "amount"]) and frame.loc[1, "amount"] == 1320.5


@pytest.mark.parametrize(
    "body, words",
    [
        ("null", "no data"),
        ("=(null);", "no data"),
        (ANTI_EMBED_PREFIX + "=(null);", "no data"),
        ("[]", "empty list"),
        ("=([]);", "empty list"),
        ("", "empty body"),
        ("<!DOCTYPE html><html><head><title>Error 502</title></head></html>", "HTML page"),
        ('=([{"day":"2024-01-10","open":"6.5"', "malformed"),
        ('{"error": "bad"}', "dict instead of a list"),
        ('[{"day":"2024-01-10","open":"6.5","high":"6.6","low":"6.4","volume":"1"}]', "lack field(s) close"),
        ('[{"day":"2024-01-10","open":"6.5","high":"x","low":"6.4","close":"6.5","volume":"1"}]', "non-numeric high"),
        ('[{"day":"yesterday","open":"6.5","high":"6.6","low":"6.4","close":"6.5","volume":"1"}]', "unreadable day"),
    ],
)
def test_parse_rejects_bad_bodies_naming_the_symbol(body, words):
    with pytest.raises(DataError) as info:
        parse_kline_body(body, "sz000001", "http://example/x")
    msg = str(info.value)
    assert "sz000001" in msg and words in msg and "\n" not in msg


def test_symbols_are_validated_and_lower_cased():
    assert normalize_symbol("SH600000") == "sh600000"
    assert normalize_symbol(" 000001.SZ ") == "sz000001"
    assert normalize_symbol("bj430047") == "bj430047"
    assert normalize_symbols(["SH600000", "sh600000", "sz000001"]) == ["sh600000", "sz000001"]
    for bad in ["sh60000", "hk00700", "AAPL", "600000", 600000]:
        with pytest.raises(ConfigError, match="invalid symbol|must be a string") as info:
            normalize_symbol(bad)
        assert str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="sina_symbols.*empty"):
        normalize_symbols([])
    with pytest.raises(ConfigError, match="'sx600000'"):
        SinaDataProcessor(Config(sina_symbols=["sh600000", "sx600000"]))


# ------------------------------------------------------------------------------------------------ client
def test_client_fetches_real_bars_over_http(sina):
    client = SinaClient(sina.jsonp_url, timeout=2, retries=0, pause=0)
    url = client.url("sh600000", 240, 20)
    assert url.endswith("?symbol=sh600000&scale=240&ma=no&datalen=20")
    frame = client.fetch("SH600000", 240, 20)
    expected = sina.frame("sh600000", 240, 20)
    assert len(frame) == 20
    assert frame["timestamps"].tolist() == expected["timestamps"].tolist()
    np.testing.assert_allclose(
        frame[["open", "high", "low", "close"]], expected[["open", "high", "low", "close"]], atol=5e-4
    )
    np.testing.assert_allclose(frame["volume"], expected["volume"])  # shares, as served
    # browser-like headers are sent (the server answers 403 otherwise)
    assert sina.last_headers["User-Agent"].startswith("Mozilla/")
    assert sina.last_headers["Referer"] == "https://finance.sina.com.cn"
    # symbols differ (price offset) and all of the CSV's days are there
    other = client.fetch("sz000001", 240, 1023)
    assert len(other) == len(sina.bars[240]) == 53
    assert other["close"].iloc[-1] == pytest.approx(frame["close"].iloc[-1] + 5.0)


@pytest.mark.parametrize("scale", [5, 60])
def test_client_minute_bars_from_json_twin_and_named_callback(sina, scale):
    plain = SinaClient(sina.json_url, timeout=2, retries=0, pause=0).fetch("sz000001", scale, 50)
    named = SinaClient(sina.jsonp_base("var _x"), timeout=2, retries=0, pause=0).fetch("sz000001", scale, 50)
    pd.testing.assert_frame_equal(plain, named)
    assert len(plain) == 50
    assert plain["timestamps"].iloc[-1] == pd.Timestamp("2024-08-29 11:30")
    step = plain["timestamps"].diff().dropna().dt.total_seconds() / 60
    assert (step[step < 60 * 3] == scale).mean() > 0.5  # consecutive intraday bars are `scale` minutes apart


def test_default_url_is_sinas_jsonp_endpoint():
    assert Config().sina_base_url == SINA_JSONP_URL
    client = SinaClient()
    assert client.url("sh600000") == SINA_JSONP_URL + "?symbol=sh600000&scale=240&ma=no&datalen=1023"


def test_retry_with_exponential_backoff_then_success(sina):
    delays = []
    client = SinaClient(sina.jsonp_url, timeout=2, retries=3, pause=0.01, sleep=delays.append)
    sina.fail("sh600000", "500", times=2)
    sina.fail("sz000001", "429", times=1)
    assert len(client.fetch("sh600000", 240, 5)) == 5
    assert sina.request_count("sh600000") == 3
    assert delays == [0.01, 0.02]  # pause * 2**attempt
    assert len(client.fetch("sz000001", 240, 5)) == 5
    assert sina.request_count("sz000001") == 2


def test_retries_exhausted_and_no_retry_on_4xx(sina):
    client = SinaClient(sina.jsonp_url, timeout=2, retries=2, pause=0)
    sina.fail("sh600000", "503")
    with pytest.raises(DataError, match=r"'sh600000' failed after 3 attempt\(s\): HTTP 503.*symbol=sh600000"):
        client.fetch("sh600000")
    assert sina.request_count("sh600000") == 3
    sina.fail("sz000001", "404")
    with pytest.raises(DataError, match=r"'sz000001' failed: HTTP 404.*127\.0\.0\.1"):
        client.fetch("sz000001")
    assert sina.request_count("sz000001") == 1
    bare = SinaClient(sina.jsonp_url, timeout=2, retries=2, pause=0, headers={"User-Agent": "Python-urllib/3"})
    with pytest.raises(DataError, match="'bj430047' failed: HTTP 403"):
        bare.fetch("bj430047")
    assert sina.request_count("bj430047") == 1


def test_timeout_is_retried_then_reported(sina):
    client = SinaClient(sina.jsonp_url, timeout=0.2, retries=1, pause=0)
    sina.fail("sh600000", "slow", delay=1.5)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"'sh600000' failed after 2 attempt\(s\): timed out"):
        client.fetch("sh600000")
    assert time.monotonic() - start < 1.4
    assert sina.request_count("sh600000") == 2
    sina.fail("sh600000", "slow", times=1, delay=1.5)  # one slow answer, then a fast one
    assert len(client.fetch("sh600000", 240, 3)) == 3


def test_connection_refused_is_a_data_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SinaClient(f"http://127.0.0.1:{port}/x", timeout=1, retries=1, pause=0)
    with pytest.raises(DataError, match=r"'sh600000' failed after 2 attempt\(s\): connection failed"):
        client.fetch("sh600000")


def test_client_rejects_bad_settings():
    with pytest.raises(ConfigError, match="sina_base_url"):
        SinaClient("ftp://x")
    with pytest.raises(ConfigError, match="sina_timeout"):
        SinaClient(timeout=0)
    with pytest.raises(ConfigError, match="sina_scale"):
        SinaClient().url("sh600000", scale=7)


# ------------------------------------------------------------------------------------------------ processor
@pytest.mark.parametrize(
    "mode, words",
    [
        ("404", "HTTP 404"),
        ("500", "HTTP 500"),
        ("html", "HTML page"),
        ("malformed", "malformed"),
        ("empty", "empty list"),
        ("null", "no data"),
        ("slow", "timed out"),
    ],
)
def test_one_bad_symbol_does_not_lose_the_others(sina, tmp_path, caplog, mode, words):
    cfg = make_config(sina, tmp_path, sina_timeout=0.3, sina_retries=1)
    sina.fail("sz000001", mode, delay=1.0)
    proc = SinaDataProcessor(cfg)
    with caplog.at_level(logging.WARNING, logger="kronos.data.sources.sina"):
        proc.download_data()
    assert list(proc.skipped_symbols) == ["sz000001"]
    assert words in proc.skipped_symbols["sz000001"] and "sz000001" in proc.skipped_symbols["sz000001"]
    assert any("sz000001" in r.getMessage() and words in r.getMessage() for r in caplog.records)
    frames = proc.load_raw()
    assert sorted(frames) == ["bj430047", "sh600000"]
    assert not proc.cache_path("sz000001").exists()  # a bad body is never cached


def test_all_symbols_failing_raises_one_error_listing_them(sina, tmp_path):
    cfg = make_config(sina, tmp_path, sina_symbols=["sh600000", "sz000001", "sh601398"])
    sina.fail("sh600000", "404")
    sina.fail("sz000001", "html")  # sh601398 is not served: Sina answers null
    with pytest.raises(DataError) as info:
        SinaDataProcessor(cfg).download_data()
    msg = str(info.value)
    assert "every symbol (sh600000, sz000001, sh601398)" in msg and "HTTP 404" in msg and "\n" not in msg
    with pytest.raises(DataError, match="no Sina data for sh600000, sz000001, sh601398"):
        SinaDataProcessor(cfg).load_raw()


def test_cache_makes_a_rerun_fetch_only_what_failed(sina, tmp_path):
    cfg = make_config(sina, tmp_path, sina_symbols=["sh600000", "sz000001"])
    sina.fail("sz000001", "500")
    proc = SinaDataProcessor(cfg)
    proc.download_data()
    assert sina.request_count("sh600000") == 1 and sina.request_count("sz000001") == 3
    assert list(proc.skipped_symbols) == ["sz000001"]

    sina.clear_failures()
    proc2 = SinaDataProcessor(cfg)
    proc2.download_data()
    assert sina.request_count("sh600000") == 1  # served from the cache
    assert sina.request_count("sz000001") == 4  # fetched once more, now successfully
    assert proc2.skipped_symbols == {}
    assert sorted(proc2.load_raw()) == ["sh600000", "sz000001"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["sh600000_240_1023.txt", "sz000001_240_1023.txt"]

    SinaDataProcessor(cfg).download_data()
    assert sina.request_count() == 5  # nothing left to fetch

    # the cache is keyed by scale and datalen too
    SinaDataProcessor(make_config(sina, tmp_path, sina_symbols=["sh600000"], sina_datalen=30)).download_data()
    assert sina.request_count("sh600000") == 2


def test_corrupt_cache_file_is_fetched_again(sina, tmp_path):
    cfg = make_config(sina, tmp_path, sina_symbols=["sh600000"])
    proc = SinaDataProcessor(cfg)
    proc.cache_path("sh600000").parent.mkdir(parents=True)
    proc.cache_path("sh600000").write_text('=([{"day":', encoding="utf-8")
    proc.download_data()
    assert sina.request_count("sh600000") == 1
    assert len(proc.load_raw()["sh600000"]) == 53


def test_missing_amount_is_derived_from_volume_and_prices(sina, tmp_path):
    cfg = make_config(sina, tmp_path, sina_symbols=["sh600000"], sina_scale=5, sina_datalen=200)
    sina.fail("sh600000", "no_amount")
    proc = SinaDataProcessor(cfg)
    proc.download_data()
    frame = proc.load_raw()["sh600000"]
    assert len(frame) == 200 and not frame["amount"].isna().any()
    expected = frame[["open", "high", "low", "close"]].mean(axis=1) * frame["volume"]
    np.testing.assert_allclose(frame["amount"], expected)
    real = sina.frame("sh600000", 5, 200)["amount"].to_numpy()
    assert np.median(np.abs(frame["amount"].to_numpy() / real - 1)) < 0.01  # close to the true turnover


# ------------------------------------------------------------------------------------------------ pipeline
def test_factory_run_pipeline_writes_a_dataset_and_keeps_the_cache(sina, tmp_path):
    cfg = make_config(sina, tmp_path, sina_cache_dir="")  # default cache: <dataset_path>/raw_sina
    sina.fail("bj430047", "null")
    proc = DataProcessorFactory.create_processor("sina", cfg)
    assert isinstance(proc, SinaDataProcessor) and proc.name == "sina"
    manifest = proc.run_pipeline()
    assert dataset_exists(cfg.dataset_path)
    assert manifest["source"] == "sina" and manifest["symbols"] == ["sh600000", "sz000001"]
    assert "bj430047" in manifest["skipped_symbols"] and "no data" in manifest["skipped_symbols"]["bj430047"]
    assert manifest["source_info"]["volume_unit"] == "shares"
    assert load_manifest(cfg.dataset_path)["symbols"] == ["sh600000", "sz000001"]
    train = load_split(cfg.dataset_path, "train")
    assert set(train["symbol"]) == {"sh600000", "sz000001"}
    assert train["timestamps"].min() == pd.Timestamp("2024-06-18")
    sh = train[train["symbol"] == "sh600000"]
    served = sina.frame("sh600000", 240).set_index("timestamps").loc[sh["timestamps"]]
    np.testing.assert_allclose(sh["close"].to_numpy(), served["close"].to_numpy(), atol=5e-4)

    cache = tmp_path / "dataset" / "raw_sina"
    assert sorted(p.name for p in cache.iterdir()) == ["sh600000_240_1023.txt", "sz000001_240_1023.txt"]
    requests = sina.request_count()
    sina.clear_failures()
    manifest2 = DataProcessorFactory.create_processor("sina", cfg).run_pipeline()  # rebuild: only bj430047 fetched
    assert sina.request_count() == requests + 1 and sina.request_count("bj430047") == 2
    assert manifest2["symbols"] == ["bj430047", "sh600000", "sz000001"]
    assert cache.is_dir()


def test_pipeline_on_minute_bars_with_time_ranges(sina, tmp_path):
    cfg = make_config(
        sina,
        tmp_path,
        sina_base_url=sina.json_url,
        sina_symbols=["sh600000"],
        sina_scale=30,
        sina_datalen=1023,
        split_ratios=None,
        lookback_window=16,
        predict_window=4,
        train_time_range=["2024-06-18", "2024-07-31"],
        val_time_range=["2024-07-25", "2024-08-12"],
        test_time_range=["2024-08-08", "2024-08-29"],
    )
    manifest = DataProcessorFactory.create_processor("sina", cfg).run_pipeline()
    test = load_split(cfg.dataset_path, "test")
    assert manifest["splits"]["test"]["last"].startswith("2024-08-29T11:30")
    assert (test["timestamps"].dt.minute % 30 == 0).all()
    assert set(test["hour"]) <= {10, 11, 13, 14, 15}


# ------------------------------------------------------------------------------------------------ hostile servers
def test_dripping_server_is_cut_off_at_one_deadline(sina):
    # each byte arrives well within the socket timeout: only a per-request deadline stops this
    client = SinaClient(sina.jsonp_url, timeout=0.6, retries=1, pause=0)
    sina.fail("sh600000", "drip", delay=0.05)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"'sh600000' failed after 2 attempt\(s\): timed out.*0\.6s deadline"):
        client.fetch("sh600000", 240, 5)
    assert time.monotonic() - start < 2.5
    assert sina.request_count("sh600000") == 2


def test_redirect_to_another_host_is_refused_same_host_followed(sina):
    client = SinaClient(sina.jsonp_url, timeout=2, retries=2, pause=0)
    sina.fail("sh600000", "redirect_other_host", target="sz000001")
    with pytest.raises(
        DataError,
        match=r"'sh600000' failed: refused a redirect \(HTTP 302\) to another host: "
        r"http://localhost:\d+",
    ):
        client.fetch("sh600000", 240, 5)
    assert sina.request_count("sh600000") == 1 and sina.request_count("sz000001") == 0  # not retried, not followed
    sina.fail("sh600000", "redirect_same_host", times=1)
    frame = client.fetch("sh600000", 240, 5)
    assert frame["close"].tolist() == pytest.approx(sina.frame("sh600000", 240, 5)["close"].tolist(), abs=5e-4)


@pytest.mark.parametrize("mode", ["oversize", "gzip_bomb"])
def test_oversize_and_gzip_bomb_bodies_are_dropped_early(sina, mode):
    import tracemalloc

    client = SinaClient(sina.jsonp_url, timeout=5, retries=1, pause=0, max_bytes=256 << 10)
    sina.fail("sh600000", mode, size=48 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(
            DataError,
            match=r"'sh600000' failed: (decompressed )?response .*exceeds the limit of "
            r"262,144 bytes",
        ):
            client.fetch("sh600000", 240, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while rejecting a 48 MiB body"
    assert sina.request_count("sh600000") == 1  # a refused body is not retried
    sina.fail("sh600000", mode, size=64 << 10)  # under the limit: decoded and parsed as usual
    assert len(client.fetch("sh600000", 240, 5)) == 5


def test_more_bars_than_datalen_is_an_error(sina):
    client = SinaClient(sina.jsonp_url, timeout=2, retries=0, pause=0)
    sina.fail("sh600000", "too_many")
    with pytest.raises(DataError, match=r"returned 53 bars for symbol 'sh600000', more than the 5 requested"):
        client.fetch("sh600000", 240, 5)


@pytest.mark.parametrize(
    "mode, words",
    [
        ("drip", "timed out"),
        ("redirect_other_host", "refused a redirect"),
        ("oversize", "exceeds the limit"),
        ("gzip_bomb", "exceeds the limit"),
        ("too_many", "more than the 20 requested"),
    ],
)
def test_hostile_answer_for_one_symbol_does_not_lose_the_others(sina, tmp_path, mode, words):
    cfg = make_config(sina, tmp_path, sina_timeout=0.5, sina_retries=0, sina_datalen=20)
    sina.fail("sz000001", mode, delay=0.05, size=8 << 20, target="sh600000")  # 8 MiB > 64 KiB + 20 KiB default
    proc = SinaDataProcessor(cfg)
    start = time.monotonic()
    proc.download_data()
    assert time.monotonic() - start < 5
    assert list(proc.skipped_symbols) == ["sz000001"] and words in proc.skipped_symbols["sz000001"]
    assert sorted(proc.load_raw()) == ["bj430047", "sh600000"]
    assert not proc.cache_path("sz000001").exists()
