"""Hostile requests to `kronos serve` (issue 22): every one is a quick, short 4xx, sized up before it is decoded.

A Parquet "bomb" (30M constant rows in under 1 MB) is refused from its footer without the rows being materialised;
a CSV is parsed no further than max_bars + 1 rows; 10,000 columns, wrong column types and JSON nested 100,000 deep
get one short line naming the limit or the column, and no traceback in the log.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("mcp")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from fastapi.testclient import TestClient  # noqa: E402

import kronos.serve.inputs as inputs  # noqa: E402
from kronos.serve.app import create_app  # noqa: E402
from kronos.serve.engine import ForecastEngine  # noqa: E402
from kronos.serve.inputs import Limits, json_depth, short  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
TINY = TESTS / "fixtures" / "parity-tiny" / "tiny"
CSV = TESTS / "fixtures" / "kline_5min.csv"
SHORT = 300  # the longest error message the service may build from user input


@pytest.fixture(scope="module")
def engine(one_thread):
    eng = ForecastEngine.load(
        str(TINY / "tokenizer"),
        str(TINY / "predictor"),
        device="cpu",
        max_context=64,
        name="tiny",
        limits=Limits(max_horizon=16, max_samples=8, max_bars=600),  # the default body limit, 8 MiB
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return pd.read_csv(CSV).iloc[:80]


def _upload(client, name: str, data: bytes, **form: str):
    return client.post("/forecast", files={"file": (name, data)}, data={"horizon": "3", "samples": "2", **form})


def _refused(response, status: int, phrase: str, limit: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert phrase in body["error"], body
    assert len(body["error"]) <= SHORT, body["error"]
    if limit is not None:
        assert body["limit"] == limit
    return body["error"]


def _parquet_bomb(rows: int = 30_000_000, group: int = 1 << 22) -> bytes:
    """``rows`` constant bars as zstd Parquet of well under 1 MB: row groups of dictionary-encoded columns whose
    indices are all 0 (written as dictionary arrays, so building it hashes nothing)."""
    zeros = pa.array(np.zeros(group, dtype=np.int8))
    stamp = pa.array(np.array(["2024-01-02T09:35"], dtype="datetime64[ns]"))
    columns = {"timestamps": pa.DictionaryArray.from_arrays(zeros, stamp)}
    for name in ("open", "high", "low", "close", "volume"):
        columns[name] = pa.DictionaryArray.from_arrays(zeros, pa.array([1.0]))
    chunk = pa.table(columns)
    out = io.BytesIO()
    # store_schema=False: the file reads back as plain timestamp/double columns, like any pandas-written one
    with pq.ParquetWriter(
        out, chunk.schema, compression="zstd", store_schema=False, write_statistics=False, data_page_size=64 << 20
    ) as writer:
        for start in range(0, rows, group):
            writer.write_table(chunk.slice(0, min(group, rows - start)))
    return out.getvalue()


class _PeakRSS:
    """The process's resident memory, sampled every millisecond on a thread, while the block runs."""

    def __init__(self) -> None:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/self/status")

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def rise_mb(self) -> float:
        return (self.peak - self.start) / 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_parquet_bomb_is_refused_from_its_footer(client, engine):
    t0 = time.perf_counter()
    bomb = _parquet_bomb()
    built = time.perf_counter() - t0
    assert len(bomb) < 1_000_000 < engine.limits.max_body_bytes
    assert pq.ParquetFile(io.BytesIO(bomb)).metadata.num_rows == 30_000_000
    _refused(_upload(client, "warm.parquet", _parquet_bomb(rows=1000, group=1000)), 413, "max_bars=600")
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        response = _upload(client, "bomb.parquet", bomb)
        took = time.perf_counter() - t0
    message = _refused(response, 413, "number of bars is 30000000, over the service limit max_bars=600", "max_bars")
    assert message.startswith("file 'bomb.parquet'")
    print(f"bomb: {len(bomb)} bytes built in {built:.2f}s; refused in {took:.3f}s, RSS rise {rss.rise_mb:.1f} MB")
    assert took < 2.0
    assert rss.rise_mb < 100


def test_csv_over_max_bars_is_refused_without_parsing_the_rest(client, bars):
    row = bars.iloc[:1].to_csv(index=False, header=False).encode()
    many = bars.iloc[:0].to_csv(index=False).encode() + row * 120_000  # ~7 MB, 200 x max_bars
    assert len(many) < 8 * 1024 * 1024
    t0 = time.perf_counter()
    _refused(_upload(client, "many.csv", many), 413, "over the service limit max_bars=600", "max_bars")
    assert time.perf_counter() - t0 < 2.0
    just = bars.iloc[:0].to_csv(index=False).encode() + row * 601
    _refused(_upload(client, "just.csv", just), 413, "max_bars=600", "max_bars")


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_ten_thousand_columns_get_a_short_message(client, kind):
    names = [f"a_rather_long_column_name_{i:05d}" for i in range(10_000)]
    if kind == "parquet":
        out = io.BytesIO()
        pq.write_table(pa.table({name: pa.array([1.0, 2.0]) for name in names}), out)
        data = out.getvalue()
    else:
        data = (",".join(names) + "\n" + ",".join(["1.0"] * len(names)) + "\n").encode()
    message = _refused(_upload(client, f"wide.{kind}", data), 413, "number of columns is 10000", "max_columns")
    assert "max_columns=64" in message


def test_a_row_of_a_million_fields_is_refused_quickly(client):
    t0 = time.perf_counter()
    _refused(_upload(client, "row.csv", b"timestamps,close\n" + b"1," * 1_000_000), 413, "max_columns", "max_columns")
    assert time.perf_counter() - t0 < 2.0


def test_wrong_column_types(client, bars):
    nested = bars.assign(close=[[1.0]] * len(bars))
    _refused(_upload(client, "nested.parquet", nested.to_parquet(index=False)), 422, "column 'close' has type list")
    raw = bars.assign(close=[b"\x00"] * len(bars))
    _refused(_upload(client, "raw.parquet", raw.to_parquet(index=False)), 422, "column 'close' has type binary")
    text = bars.assign(close="abc")
    for data, name in ((text.to_parquet(index=False), "t.parquet"), (text.to_csv(index=False).encode(), "t.csv")):
        _refused(_upload(client, name, data), 422, "column 'close' holds no numbers")
    no_close = bars.drop(columns="close").to_parquet(index=False)
    _refused(_upload(client, "nc.parquet", no_close), 422, "required price column 'close' is missing")


def test_a_long_text_repeated_by_a_dictionary_is_refused_before_decoding(client):
    """1 MB of text behind 500 dictionary indices: a kilobyte in the file, 500 MB once decoded."""
    huge = pa.array(["2024-01-02 " + "x" * (1 << 20)])
    table = pa.table(
        {
            "timestamps": pa.DictionaryArray.from_arrays(pa.array(np.zeros(500, dtype=np.int8)), huge),
            **{c: pa.array(np.ones(500)) for c in ("open", "high", "low", "close")},
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd", store_schema=False)
    assert len(out.getvalue()) < 10_000
    _refused(_upload(client, "text.parquet", out.getvalue()), 422, "column 'timestamps' holds a text of")


def test_uploads_with_extra_columns_still_forecast(client, bars):
    extra = bars.assign(symbol="600000", note="x", Volume_note=1)
    by_csv = _upload(client, "k.csv", extra.to_csv(index=False).encode(), seed="3")
    by_parquet = _upload(client, "k.parquet", extra.to_parquet(index=False), seed="3")
    by_index = _upload(client, "k.parquet", bars.assign(timestamps=pd.to_datetime(bars["timestamps"]))
                       .set_index("timestamps").to_parquet(), seed="3")  # fmt: skip
    for r in (by_csv, by_parquet, by_index):
        assert r.status_code == 200, r.text
    assert by_csv.json()["mean"] == by_parquet.json()["mean"] == by_index.json()["mean"]


def test_a_long_file_name_is_cut_in_messages(client, bars):
    name = "k" * 500 + ".csv"
    message = _refused(_upload(client, name, bars.iloc[:3].to_csv(index=False).encode()), 422, "min_bars=8")
    assert "…" in message


@pytest.mark.parametrize("url", ["/forecast", "/forecast/batch"])
def test_json_nested_100k_deep_is_a_quick_short_4xx_without_traceback(client, url, caplog):
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"bars": ' + deep + b"}", b'{"series": [{"bars": ' + deep + b"}]}"):
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            t0 = time.perf_counter()
            response = client.post(url, content=body, headers={"content-type": "application/json"})
            took = time.perf_counter() - t0
        _refused(response, 422, "over the service limit max_json_depth=64", "max_json_depth")
        assert took < 1.0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
        assert "Traceback" not in caplog.text


def test_brackets_inside_strings_do_not_count_as_nesting(client, bars):
    tricky = '[[{{\\"\\\\' * 1000  # 4000 brackets, escaped quotes and backslashes, in one string
    rows = [{**row, "note": tricky} for row in bars.to_dict("records")]
    r = client.post("/forecast", json={"bars": rows, "horizon": 2, "samples": 1})
    assert r.status_code == 200, r.text[:SHORT]


def test_long_or_odd_values_get_short_messages(client, bars):
    rows = bars.to_dict("records")
    cases = [
        ({"bars": rows, "horizon": "x" * 100_000}, "horizon must be an integer"),
        ({"bars": rows, "quantiles": ["q" * 100_000]}, "quantiles must be numbers"),
        ({"bars": [{**rows[0], "close": "y" * 100_000}, *rows[1:]]}, "column 'close'"),
        ({"bars": {"timestamps": ["2024-01-02"] * 3, "open": [1.0]}}, "columns must be lists of equal length"),
    ]
    for payload, phrase in cases:
        _refused(client.post("/forecast", json=payload), 422, phrase)
    digits = b'{"bars": ' + b"1" * 100_000 + b"}"
    _refused(
        client.post("/forecast", content=digits, headers={"content-type": "application/json"}), 422, "not valid JSON"
    )


def test_json_depth_matches_a_plain_scan(monkeypatch):
    def plain(text: str) -> int:
        depth = deepest = 0
        in_string = escaped = False
        for ch in text:
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
            elif ch in "]}":
                depth -= 1
        return deepest

    rnd = random.Random(7)

    def value(level: int = 0):
        r = rnd.random()
        if level > 7 or r < 0.3:
            return rnd.choice([1, 2.5, None, True, 'a\\"[{', "\\\\", "x" + "\\" * rnd.randint(0, 5), '"]}"'])
        if r < 0.65:
            return [value(level + 1) for _ in range(rnd.randint(0, 4))]
        return {"k" + "\\" * rnd.randint(0, 4) + '"{' + str(i): value(level + 1) for i in range(rnd.randint(0, 4))}

    for _ in range(150):
        text = json.dumps(value())
        for chunk in (3, 64):  # runs of backslashes and strings across chunk edges
            monkeypatch.setattr(inputs, "_JSON_CHUNK", chunk)
            assert json_depth(text.encode()) == plain(text), (text, chunk)
    monkeypatch.undo()
    big = json.dumps({"bars": [{"timestamps": "2024-01-02 09:35", "close": 1.5, "n": '\\"]'}] * 100_000}).encode()
    t0 = time.perf_counter()
    assert json_depth(big, stop_above=64) == 3
    assert time.perf_counter() - t0 < 1.0


def test_short():
    assert short("abc") == "abc"
    assert short("x" * 1000) == "x" * 299 + "…" and len(short("x" * 1000)) == 300
    assert Limits().max_json_depth == 64 and Limits(max_bars=5).max_columns == 64
