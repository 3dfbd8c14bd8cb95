"""The REST API of `kronos serve` against the app in-process (httpx through Starlette's TestClient)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("mcp")

from fastapi.testclient import TestClient  # noqa: E402

from kronos.errors import ConfigError  # noqa: E402
from kronos.serve.app import create_app  # noqa: E402
from kronos.serve.command import resolve_token  # noqa: E402
from kronos.serve.engine import ForecastEngine, Settings  # noqa: E402
from kronos.serve.inputs import Limits  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
TINY = TESTS / "fixtures" / "parity-tiny" / "tiny"
CSV = TESTS / "fixtures" / "kline_5min.csv"


@pytest.fixture(scope="module")
def engine(one_thread):
    eng = ForecastEngine.load(
        str(TINY / "tokenizer"),
        str(TINY / "predictor"),
        device="cpu",
        max_context=64,
        name="tiny",
        limits=Limits(max_horizon=16, max_samples=8, max_bars=600, max_body_bytes=200_000),
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def bars():
    return pd.read_csv(CSV).iloc[:80].to_dict("records")


def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/models").json()
    model = info["models"][0]
    assert model["name"] == "tiny" and model["max_context"] == 64 and model["parameters"] > 1000
    assert info["limits"]["max_horizon"] == 16
    assert client.get("/openapi.json").json()["paths"]["/forecast"]["post"]


def test_forecast_json_rows(client, bars):
    r = client.post(
        "/forecast",
        json={"bars": bars, "horizon": 6, "samples": 4, "seed": 3, "quantiles": [0.1, 0.9], "return_samples": True},
    )
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res["timestamps"]) == 6 and pd.Timestamp(res["timestamps"][0]) > pd.Timestamp(bars[-1]["timestamps"])
    assert set(res["mean"]) == {"open", "high", "low", "close", "volume", "amount"}
    lo, hi = np.array(res["quantiles"]["0.1"]["close"]), np.array(res["quantiles"]["0.9"]["close"])
    assert (lo <= hi).all()
    paths = np.array(res["samples"]["close"])
    assert paths.shape == (4, 6)
    np.testing.assert_allclose(res["mean"]["close"], paths.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(res["p_up"], (paths > bars[-1]["close"]).mean(axis=0))
    assert res["queue_wait_ms"] >= 0 and res["batch_size"] == 1 and res["model"] == "tiny"


def test_upload_csv_equals_json_rows_for_a_seed(client, bars):
    frame = pd.DataFrame(bars)
    by_json = client.post("/forecast", json={"bars": bars, "horizon": 4, "samples": 3, "seed": 11}).json()
    by_file = client.post(
        "/forecast",
        files={"file": ("k.csv", frame.to_csv(index=False).encode())},
        data={"horizon": "4", "samples": "3", "seed": "11", "history": "10"},
    ).json()
    assert by_file["mean"] == by_json["mean"] and by_file["quantiles"] == by_json["quantiles"]
    assert by_file["history"]["close"] == [round(v, 6) for v in frame["close"].iloc[-10:]]
    pq = client.post(
        "/forecast",
        files={"file": ("k.parquet", frame.to_parquet(index=False))},
        data={"horizon": "4", "samples": "3", "seed": "11"},
    ).json()
    assert pq["mean"] == by_json["mean"]


def test_batch_endpoint_mixed_lengths_equal_single_greedy(client, bars):
    series = [{"bars": bars}, {"bars": bars[-40:]}, {"bars": bars[:50]}]
    r = client.post("/forecast/batch", json={"series": series, "horizon": 3, "top_k": 1})
    assert r.status_code == 200, r.text
    batch = r.json()["forecasts"]
    assert [f["batch_size"] for f in batch] == [3, 3, 3]
    for item, got in zip(series, batch):
        single = client.post("/forecast", json={"bars": item["bars"], "horizon": 3, "top_k": 1}).json()
        np.testing.assert_allclose(got["mean"]["close"], single["mean"]["close"], rtol=1e-5)


def test_concurrent_requests_share_one_batch(engine, bars):
    history = engine.history_for(pd.DataFrame(bars))
    histories = [history.iloc[i:].reset_index(drop=True) for i in range(6)]

    async def go():
        settings = [Settings(horizon=3, samples=1, top_k=1) for _ in histories]
        together = await asyncio.gather(*(engine.forecast([h], s) for h, s in zip(histories, settings)))
        alone = [await engine.forecast([h], Settings(horizon=3, samples=1, top_k=1)) for h in histories]
        await engine.close()
        return together, alone

    together, alone = asyncio.run(go())
    assert max(r[0]["batch_size"] for r in together) > 1
    for a, b in zip(together, alone):
        assert b[0]["batch_size"] == 1
        np.testing.assert_allclose(a[0]["mean"]["close"], b[0]["mean"]["close"], rtol=1e-5)


def test_seeded_sampling_runs_alone_and_repeats(engine, bars):
    history = engine.history_for(pd.DataFrame(bars))

    async def go():
        out = await asyncio.gather(
            *(engine.forecast([history], Settings(horizon=3, samples=4, seed=5)) for _ in range(3))
        )
        await engine.close()
        return out

    results = asyncio.run(go())
    assert all(r[0]["batch_size"] == 1 for r in results)
    assert results[0][0]["mean"] == results[1][0]["mean"] == results[2][0]["mean"]


def _bad_requests(bars):
    """Eighteen kinds of bad request: (name, kwargs for client.request, expected status, phrase in the error)."""
    nan = [dict(b) for b in bars]
    nan[7]["close"] = float("nan")
    dup = bars[:20] + bars[19:30]
    boolean, crossed, tiny, huge = ([dict(b) for b in bars] for _ in range(4))
    boolean[5]["close"] = True
    crossed[9]["high"], crossed[9]["low"] = crossed[9]["low"] - 1.0, crossed[9]["high"]
    tiny = [{**b, **{c: b[c] * 1e-9 for c in ("open", "high", "low", "close")}} for b in bars]
    huge[3]["close"] = 1e39
    post = dict(method="POST", url="/forecast")
    return [
        ("boolean price", dict(post, json={"bars": boolean}), 422, "column 'close' holds True at row 5"),
        ("high below low", dict(post, json={"bars": crossed}), 422, "is below low"),
        ("prices too small", dict(post, json={"bars": tiny}), 422, "prices must lie in"),
        ("price too large", dict(post, json={"bars": huge}), 422, "at row 3"),
        ("negative history", dict(post, json={"bars": bars, "history": -1}), 422, "'history' must be an integer"),
        ("invalid JSON", dict(post, content=b"{not json", headers=JSON), 422, "not valid JSON"),
        ("missing bars", dict(post, json={"horizon": 3}), 422, "missing field 'bars'"),
        ("too few bars", dict(post, json={"bars": bars[:3]}), 422, "min_bars=8"),
        ("NaN", dict(post, content=_nan_json(nan), headers=JSON), 422, "missing or infinite value at row 7"),
        ("unsorted", dict(post, json={"bars": bars[::-1]}), 422, "not sorted"),
        ("duplicates", dict(post, json={"bars": dup}), 422, "duplicate timestamp"),
        ("horizon over limit", dict(post, json={"bars": bars, "horizon": 999}), 422, "max_horizon=16"),
        ("model path", dict(post, json={"bars": bars, "model": "/etc/passwd"}), 422, "unknown model"),
        ("malformed CSV", dict(post, files={"file": ("x.csv", b'a,b\n1,2\n"3')}), 422, "cannot be read"),
        ("body too large", dict(post, json={"bars": bars * 40}), 413, "max_body_bytes=200000"),
        # a cross-site form, a foreign page, a DNS-rebinding Host: refused before anything runs
        ("text/plain", dict(post, content=b'{"bars": []}', headers={"content-type": "text/plain"}), 415, "text/plain"),
        (
            "foreign Origin",
            dict(post, json={"bars": bars}, headers={"origin": "http://evil.example"}),
            403,
            "cross-origin",
        ),
        ("foreign Host", dict(method="GET", url="/models", headers={"host": "attacker.example"}), 400, "Invalid host"),
    ]


JSON = {"content-type": "application/json"}


def _nan_json(rows) -> bytes:
    import json

    return json.dumps({"bars": rows}).encode()  # Python writes NaN, as many clients do


@pytest.mark.slow
def test_200_bad_requests_get_4xx_and_the_service_stays_up(client, bars):
    kinds = _bad_requests(bars)
    assert len(kinds) == 18
    for i in range(200):
        name, request, status, phrase = kinds[i % len(kinds)]
        r = client.request(**request)
        assert r.status_code == status, (name, r.text)
        assert phrase in r.text and len(r.text) < 600, (name, r.text)
    assert client.get("/health").status_code == 200
    assert client.post("/forecast", json={"bars": bars, "horizon": 2, "samples": 1}).status_code == 200


def test_token_required_everywhere_but_health(engine, bars):
    with TestClient(create_app(engine, token="s3cret", mcp=False), base_url="http://127.0.0.1") as c:
        assert c.get("/health").status_code == 200
        r = c.get("/models")
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert c.post("/forecast", json={"bars": bars}).status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = c.get("/?token=s3cret")  # opening the page with ?token= keeps the token in a cookie
        assert page.status_code == 200 and "kronos_token" in page.headers.get("set-cookie", "")
        assert c.get("/models").status_code == 200


def test_non_local_host_needs_a_token(monkeypatch):
    monkeypatch.delenv("KRONOS_API_TOKEN", raising=False)
    assert resolve_token("127.0.0.1", "") is None
    with pytest.raises(ConfigError, match="--token"):
        resolve_token("0.0.0.0", "")
    monkeypatch.setenv("KRONOS_API_TOKEN", "abc")
    assert resolve_token("0.0.0.0", "") == "abc"


def test_dataset_symbols(one_thread, dataset):
    eng = ForecastEngine.load(
        str(TINY / "tokenizer"), str(TINY / "predictor"), device="cpu", max_context=64, dataset=str(dataset)
    )
    try:
        with TestClient(create_app(eng, mcp=False), base_url="http://127.0.0.1") as c:
            symbols = c.get("/symbols").json()["symbols"]
            assert len(symbols) == 8 and symbols[0]["bars"] > 100
            sym = symbols[0]["symbol"]
            res = c.get(f"/symbols/{sym}/forecast", params={"horizon": 3, "samples": 2, "history": 20}).json()
            assert res["symbol"] == sym and len(res["timestamps"]) == 3 and len(res["history"]["close"]) == 20
            assert pd.Timestamp(res["timestamps"][0]) > pd.Timestamp(symbols[0]["last"])
            r = c.get("/symbols/NOPE/forecast")
            assert r.status_code == 422 and "unknown symbol" in r.json()["error"]
            batch = c.post("/forecast/batch", json={"series": [{"symbol": sym}], "horizon": 2, "samples": 1})
            assert batch.status_code == 200
    finally:
        eng.shutdown()


def test_calibrated_bands_for_the_calibrations_horizon(one_thread, tmp_path, bars):
    from kronos.evaluate.calibration import Calibration, model_fingerprint
    from kronos.inference.predictor import sample_quantiles

    plain = ForecastEngine.load(str(TINY / "tokenizer"), str(TINY / "predictor"), device="cpu", max_context=64)
    cal = Calibration(
        method="spread_scale",
        levels=[0.8],
        horizon=4,
        lookback=40,
        fingerprint=model_fingerprint(plain.predictor, 40, 4),
        params={"scale": [2.0] * 4},
        p_up={"method": "platt", "a": 1.0, "b": 0.0},
        coverage_after={"0.8": 0.79},
    )
    cal.save(tmp_path / "calibration.json")
    eng = ForecastEngine.load(
        str(TINY / "tokenizer"),
        str(TINY / "predictor"),
        device="cpu",
        max_context=64,
        calibration=str(tmp_path / "calibration.json"),
    )
    try:
        with TestClient(create_app(eng, mcp=False), base_url="http://127.0.0.1") as c:
            info = c.get("/models").json()["models"][0]["calibration"]
            assert info["horizon"] == 4 and info["coverage_after"] == {"0.8": 0.79}
            body = {"bars": bars, "horizon": 4, "samples": 6, "seed": 2, "return_samples": True}
            res = c.post("/forecast", json=body).json()
            assert res["calibrated"] is True and res["context_bars"] == 40 and "p_up_raw" in res
            paths = np.array(res["samples"]["close"])
            med, raw_lo = np.median(paths, axis=0), sample_quantiles(paths, [0.1])[0]
            # spread_scale 2: the band's distance from the median doubles (up to the JSON rounding)
            np.testing.assert_allclose(np.array(res["quantiles"]["0.1"]["close"]) - med, 2 * (raw_lo - med), atol=1e-3)
            other = c.post("/forecast", json=dict(body, horizon=3)).json()
            assert other["calibrated"] is False and "horizon 4" in other["calibration_note"]
            # all the bars normalise the forecast; the model's window sees at most max_context of them
            assert other["history_bars"] == len(bars) and other["context_bars"] == min(len(bars), 64)
    finally:
        plain.shutdown()
        eng.shutdown()


def test_cli_refuses_unsafe_or_incomplete_starts(tmp_path, capsys, monkeypatch):
    from kronos.cli import main

    monkeypatch.delenv("KRONOS_API_TOKEN", raising=False)
    assert (
        main(["serve", "--host", "0.0.0.0", "--tokenizer", str(TINY / "tokenizer"), "--model", str(TINY / "predictor")])
        == 1
    )
    assert "--token" in capsys.readouterr().err
    assert main(["serve"]) == 1
    assert "give --tokenizer and --model" in capsys.readouterr().err
    assert main(["mcp", "--run", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pipeline_config.json" in err and err.count("\n") == 1


def test_full_queue_is_a_503_naming_the_limit(engine, bars):
    """max_queue bounds every admitted, unfinished request: running, gathered by the batcher or queued."""
    import threading

    from kronos.serve.engine import QueueFullError

    history = engine.history_for(pd.DataFrame(bars))
    saved, release = engine.limits.max_queue, threading.Event()

    async def go():
        engine._lanes["small"].executor.submit(release.wait)  # the small lane's worker is busy until released
        first = asyncio.ensure_future(engine.forecast([history], Settings(horizon=2, samples=1)))
        await asyncio.sleep(0.5)  # the batcher took it and waits for the worker
        second = asyncio.ensure_future(engine.forecast([history], Settings(horizon=2, samples=1)))
        await asyncio.sleep(0.05)  # queued: max_queue=2 requests are now admitted and unfinished
        try:
            await engine.forecast([history], Settings(horizon=2, samples=1))
            refused = None
        except QueueFullError as exc:
            refused = exc
        release.set()
        await asyncio.gather(first, second)
        after = await engine.forecast([history], Settings(horizon=2, samples=1))  # finished ones free their places
        await engine.close()
        return refused, after

    engine.limits.max_queue = 2
    try:
        refused, after = asyncio.run(go())
    finally:
        engine.limits.max_queue = saved
        release.set()
    assert refused is not None and "max_queue=2" in str(refused)
    assert after[0]["batch_size"] == 1


def test_adaptive_bands_use_only_outcomes_realised_before_the_requests_last_bar(one_thread, tmp_path, bars):
    from kronos.evaluate.calibration import Calibration, model_fingerprint
    from kronos.inference.outcomes import BandOutcomes, outcomes_path

    plain = ForecastEngine.load(str(TINY / "tokenizer"), str(TINY / "predictor"), device="cpu", max_context=64)
    cal = Calibration(
        method="vol_scaled", levels=[0.8], horizon=4, lookback=40,
        fingerprint=model_fingerprint(plain.predictor, 40, 4), params={"0.8": [1.0] * 4},
    )  # fmt: skip
    cal.save(tmp_path / "calibration.json")
    last_bar = pd.Timestamp(bars[-1]["timestamps"])
    before = pd.date_range(end=last_bar - pd.Timedelta(days=1), periods=200, freq="D").to_numpy()
    after = pd.date_range(start=last_bar + pd.Timedelta(days=1), periods=200, freq="D").to_numpy()
    BandOutcomes(
        target=np.concatenate([before, after]).astype("datetime64[ns]"),
        scores={"0.8": np.concatenate([np.full(200, 2.0), np.full(200, 9.0)])},  # later outcomes: never read
        bar=np.timedelta64(1, "D"), calendar=np.concatenate([before, after]).astype("datetime64[ns]"),
        fingerprint=cal.fingerprint,
    ).save(outcomes_path(tmp_path / "calibration.json"))  # fmt: skip
    static_dir = tmp_path / "static"
    static_dir.mkdir()
    cal.save(static_dir / "calibration.json")
    engines = {
        name: ForecastEngine.load(
            str(TINY / "tokenizer"), str(TINY / "predictor"), device="cpu", max_context=64, calibration=str(path)
        )
        for name, path in (("adaptive", tmp_path / "calibration.json"), ("static", static_dir / "calibration.json"))
    }
    try:
        body = {"bars": bars, "horizon": 4, "samples": 6, "seed": 2, "quantiles": [0.1, 0.5, 0.9]}
        res = {}
        for name, eng in engines.items():
            with TestClient(create_app(eng, mcp=False), base_url="http://127.0.0.1") as c:
                res[name] = c.post("/forecast", json=body).json()
                info = c.get("/models").json()["models"][0]["calibration"]
                assert (info["adaptive"] is not None) == (name == "adaptive")
        assert info["adaptive"] is None and res["adaptive"]["calibrated"] is True
        half = {k: np.array(r["quantiles"]["0.9"]["close"]) - np.array(r["quantiles"]["0.5"]["close"])
                for k, r in res.items()}  # fmt: skip
        # the outcomes up to the last bar all sat at twice the band: the band doubles (the later 9s are unread)
        np.testing.assert_allclose(half["adaptive"], 2.0 * half["static"], rtol=1e-3, atol=1e-3)
    finally:
        plain.shutdown()
        for eng in engines.values():
            eng.shutdown()
