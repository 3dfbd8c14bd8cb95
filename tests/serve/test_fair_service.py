"""The service under load and abuse: bounded cost per request, a lane for small requests, cancellation of abandoned
work, no answers to other sites or foreign Host names, token files, and a bounded shutdown (issue 22)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("mcp")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from kronos.errors import ConfigError  # noqa: E402
from kronos.serve.app import allowed_hosts, create_app  # noqa: E402
from kronos.serve.command import resolve_token  # noqa: E402
from kronos.serve.engine import ForecastEngine, Settings, request_cost  # noqa: E402
from kronos.serve.inputs import LimitError, Limits  # noqa: E402

from .._support.browser import free_port, live_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STARTER = ROOT / "examples" / "models" / "starter"


def _bars(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    return pd.DataFrame(
        {
            "timestamps": pd.date_range("2020-01-01", periods=n, freq="D"),
            "open": close,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "volume": 1e6,
            "amount": 1e7 * close,
        }
    )


def _rows(frame: pd.DataFrame) -> list[dict]:
    out = frame.copy()
    out["timestamps"] = out["timestamps"].dt.strftime("%Y-%m-%d")
    return out.to_dict("records")


@pytest.fixture(scope="module")
def engine(one_thread):
    eng = ForecastEngine.load(
        str(STARTER / "tokenizer"),
        str(STARTER / "predictor"),
        device="cpu",
        max_context=512,
        name="starter",
        limits=Limits(max_request_seconds=30.0, max_bars=1024),
    )
    yield eng
    eng.shutdown()


# A request that takes a few seconds on the 2-core CI machine (the sliding 512-bar window at every step), and one that
# takes a few tens of milliseconds.
BIG = dict(horizon=32, samples=48)
SMALL = dict(horizon=4, samples=1, top_k=1)


def test_cost_estimate_grows_with_every_dimension_and_refuses_before_work(engine):
    base = request_cost([512], 32, 16, 512) @ engine.speed
    for bigger in (request_cost([512] * 4, 32, 16, 512), request_cost([512], 64, 16, 512),
                   request_cost([512], 32, 64, 512), request_cost([1024], 32, 16, 512)):  # fmt: skip
        assert bigger @ engine.speed > base
    history = engine.history_for(_bars(600))
    saved = engine.limits.max_request_seconds
    engine.limits.max_request_seconds = 0.05
    before = dict(engine.stats)
    try:
        with pytest.raises(LimitError, match=r"max_request_seconds=0\.05") as info:
            asyncio.run(engine.forecast([history] * 8, Settings(horizon=64, samples=64)))
    finally:
        engine.limits.max_request_seconds = saved
    assert info.value.limit == "max_request_seconds" and "about" in str(info.value)
    assert engine.stats["batches"] == before["batches"]  # refused before any work


def test_the_default_limits_keep_the_worst_legal_request_short(engine):
    """With the CLI's default budget (4 s), the largest request the other limits allow is refused up front, and
    one just under the budget finishes in well under 10 s."""
    limits = Limits()
    worst = request_cost([limits.max_bars] * limits.max_batch_series, limits.max_horizon, limits.max_samples, 512)
    assert engine.estimate_seconds(worst) > 4.0
    history = engine.history_for(_bars(600))
    samples = 64
    while engine.estimate_seconds(request_cost([len(history)], 32, samples, 512)) > 4.0 and samples > 1:
        samples //= 2
    started = time.perf_counter()
    asyncio.run(engine.forecast([history], Settings(horizon=32, samples=samples, seed=1)))
    asyncio.run(engine.close())
    assert time.perf_counter() - started < 10.0


def test_a_small_request_is_not_stuck_behind_a_large_one(engine):
    history = engine.history_for(_bars(600))
    small_history = engine.history_for(_bars(60, seed=2))

    async def go():
        big = asyncio.ensure_future(engine.forecast([history] * 2, Settings(**BIG)))
        await asyncio.sleep(0.3)  # the big one is running on the large lane
        started = time.perf_counter()
        small = await engine.forecast([small_history], Settings(**SMALL))
        small_s = time.perf_counter() - started
        big_done = big.done()
        await big
        await engine.close()
        return small_s, big_done, small

    small_s, big_done, small = asyncio.run(go())
    assert not big_done, "the large request should still be running when the small one is answered"
    assert small_s < 2.0
    assert small[0]["batch_size"] == 1


def test_max_queue_counts_running_and_queued_requests(engine):
    from kronos.serve.engine import QueueFullError

    history = engine.history_for(_bars(600))
    saved = engine.limits.max_queue
    engine.limits.max_queue = 1

    async def go():
        big = asyncio.ensure_future(engine.forecast([history], Settings(**BIG)))
        await asyncio.sleep(0.3)
        try:
            await engine.forecast([history], Settings(**SMALL))
            refused = None
        except QueueFullError as exc:
            refused = exc
        big.cancel()
        await asyncio.sleep(0.5)
        after = await engine.forecast([history], Settings(**SMALL))
        await engine.close()
        return refused, after

    try:
        refused, after = asyncio.run(go())
    finally:
        engine.limits.max_queue = saved
    assert refused is not None and "max_queue=1" in str(refused)
    assert after[0]["batch_size"] == 1


def test_a_disconnected_clients_forecast_stops_within_a_second(engine):
    bars = _rows(_bars(600))
    app = create_app(engine, mcp=False)
    with live_server(app) as url:
        before = engine.stats["cancelled"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/forecast", json={"bars": bars, **BIG}, timeout=1.0)
        gone = time.perf_counter()
        lane = engine._lanes["large"]
        while lane.running is not None and time.perf_counter() - gone < 5:
            time.sleep(0.02)
        stopped = time.perf_counter() - gone
        assert engine.stats["cancelled"] == before + 1
        assert stopped < 1.0, f"the abandoned forecast ran on for {stopped:.2f} s"
        r = httpx.post(url + "/forecast", json={"bars": bars[:80], **SMALL}, timeout=10)
        assert r.status_code == 200 and r.json()["queue_wait_ms"] < 500


def test_no_token_mode_refuses_other_sites_and_shows_no_absolute_paths(engine):
    with TestClient(create_app(engine, mcp=False), base_url="http://127.0.0.1:8000") as c:
        bars = _rows(_bars(40))
        ok = c.post("/forecast", json={"bars": bars, **SMALL}, headers={"origin": "http://127.0.0.1:8000"})
        assert ok.status_code == 200, ok.text  # the page the service serves itself
        form = c.post("/forecast", data={"bars": "x"})  # a cross-site HTML form
        assert form.status_code == 415 and "application/json" in form.json()["error"]
        plain = c.post("/forecast", content=b'{"bars": []}', headers={"content-type": "text/plain"})
        assert plain.status_code == 415
        other = c.post("/forecast", json={"bars": bars}, headers={"origin": "http://127.0.0.1.evil.example:8000"})
        assert other.status_code == 403
        assert c.post("/forecast", json={"bars": bars}, headers={"origin": "null"}).status_code == 403
        rebinding = c.get("/models", headers={"host": "attacker.example:8000"})
        assert rebinding.status_code == 400 and str(ROOT) not in rebinding.text
        models = c.get("/models").json()
        assert not any(str(v).startswith("/") for v in (models["models"][0]["model"], models["models"][0]["tokenizer"]))
        assert "starter/predictor" in models["models"][0]["model"]
    with TestClient(create_app(engine, mcp=False, token="s3cret"), base_url="http://127.0.0.1") as c:
        models = c.get("/models", headers={"authorization": "Bearer s3cret"}).json()
        assert models["models"][0]["model"] == str(STARTER / "predictor")


def test_allowed_hosts_follow_the_bind_address():
    assert "localhost" in allowed_hosts("127.0.0.1") and "evil.example" not in allowed_hosts("127.0.0.1")
    assert allowed_hosts("10.0.0.5") == ["10.0.0.5"]
    assert allowed_hosts("0.0.0.0") == ["*"]
    assert allowed_hosts("0.0.0.0", ["kronos.lan"]) == ["kronos.lan"]


def test_token_from_a_file_or_the_environment(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("KRONOS_API_TOKEN", raising=False)
    f = tmp_path / "token"
    f.write_text("abc123\n")
    assert resolve_token("0.0.0.0", "", str(f)) == "abc123"
    monkeypatch.setenv("KRONOS_API_TOKEN", "from-env")
    assert resolve_token("0.0.0.0", "") == "from-env"
    with caplog.at_level("WARNING"):
        assert resolve_token("127.0.0.1", "on-the-command-line") == "on-the-command-line"
    assert "process list" in caplog.text
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        resolve_token("127.0.0.1", "", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read --token-file"):
        resolve_token("127.0.0.1", "", str(tmp_path / "missing"))


def _serve(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kronos.cli", "serve", "--tokenizer", str(STARTER / "tokenizer"),
           "--model", str(STARTER / "predictor"), "--device", "cpu", "--port", str(port),
           "--max-request-seconds", "60", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)


def _post_in_background(url: str, body: dict) -> threading.Thread:
    def post():
        try:
            httpx.post(url + "/forecast", json=body, timeout=60)
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigterm_gives_a_running_forecast_its_grace_then_stops_and_a_second_exits_at_once():
    bars = _rows(_bars(600))
    proc, url = _serve("--shutdown-grace", "1", "--client-timeout", "1")
    try:
        # a client that never finishes its headers is cut off after --client-timeout
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sock.settimeout(5)
            started = time.perf_counter()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.perf_counter() - started < 3
        _post_in_background(url, {"bars": bars, "horizon": 64, "samples": 64})  # ~10+ s of work
        time.sleep(1.0)
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.perf_counter() - started < 5.0  # grace 1 s, then stopped at the next decode step
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url = _serve("--shutdown-grace", "60")
    try:
        _post_in_background(url, {"bars": bars, "horizon": 64, "samples": 64})
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None  # still in its 60 s grace
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        assert time.perf_counter() - started < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
