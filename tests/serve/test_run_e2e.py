"""`kronos serve --run` on a freshly trained pipeline run (tiny models, fast mode, real Qlib data): a forecast for
data the run never saw over HTTP, the MCP tools over streamable HTTP, and both views of the page in Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("mcp")

from _support.browser import chromium, free_port, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CONFIG = {
    "data_source": "qlib",
    "qlib_data_path": str(FIXTURES / "qlib_cn"),
    "instrument": "csi300",
    "dataset_begin_time": "2021-01-01",
    "dataset_end_time": "2024-12-31",
    "train_time_range": ["2021-01-01", "2023-06-30"],
    "val_time_range": ["2023-04-01", "2023-12-31"],
    "test_time_range": ["2023-10-01", "2024-12-31"],
    "backtest_time_range": ["2024-11-01", "2024-12-31"],
    "dataset_path": "data/processed",
    "save_path": "outputs/models",
    "backtest_result_path": "outputs/backtest_results",
    "lookback_window": 30,
    "predict_window": 5,
    "epochs": 1,
    "batch_size": 8,
    "n_train_iter": 48,
    "n_val_iter": 16,
    "log_interval": 2,
    "pretrained_tokenizer_path": "",
    "pretrained_predictor_path": "",
    "tokenizer_preset": "tiny",
    "predictor_preset": "tiny",
    "tokenizer_learning_rate": 0.002,
    "predictor_learning_rate": 0.002,
    "inference_sample_count": 2,
    "eval_max_anchors": 8,
    "calibration_min_forecasts": 10,  # tiny data: keep the test fast
    "plot_n_symbols": 1,
    "backtest_n_symbol_hold": 3,
    "backtest_n_symbol_drop": 1,
    "backtest_hold_thresh": 1,
    "num_workers": 0,
}


def _env() -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_run")
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    r = subprocess.run(
        [sys.executable, "-m", "kronos.cli", "pipeline", "--cpu", "--fast-mode", "--config-path", "config.json"],
        cwd=tmp,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    port = free_port()
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kronos.cli", "serve", "--run", "outputs", "--port", str(port), "--device", "cpu"],
        cwd=tmp,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, (tmp / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        yield url, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_forecast_for_unseen_data_over_http(served_run):
    url, tmp = served_run
    models = httpx.get(url + "/models").json()
    assert models["run"].endswith("outputs") and models["dataset"]
    assert "finetune_predictor" in models["models"][0]["model"]
    with open(FIXTURES / "kline_5min.csv", "rb") as f:  # 5-minute bars of another market: never seen in training
        r = httpx.post(
            url + "/forecast", files={"file": ("kline_5min.csv", f)}, data={"horizon": "8", "samples": "4"}, timeout=120
        )
    assert r.status_code == 200, r.text
    res = r.json()
    last = pd.read_csv(FIXTURES / "kline_5min.csv")["timestamps"].iloc[-1]
    assert len(res["timestamps"]) == 8 and pd.Timestamp(res["timestamps"][0]) > pd.Timestamp(last)
    assert all(0.0 <= p <= 1.0 for p in res["p_up"])
    symbols = httpx.get(url + "/symbols").json()["symbols"]
    assert symbols
    assert httpx.get(f"{url}/symbols/{symbols[0]['symbol']}/forecast", params={"horizon": 3}, timeout=120).is_success
    # the run's calibrate step wrote calibration.json: its horizon (predict_window 5) gets calibrated bands
    cal = models["models"][0]["calibration"]
    assert cal and cal["horizon"] == 5 and cal["lookback"] == 30
    # ... and the validation outcomes it saved beside it: the service's bands adapt to what was realised
    assert cal["adaptive"] and cal["adaptive"]["outcomes"] > 0 and cal["adaptive"]["half_life_bars"] == 60
    sym = httpx.get(
        f"{url}/symbols/{symbols[0]['symbol']}/forecast", params={"horizon": 5, "samples": 8}, timeout=120
    ).json()
    assert sym["calibrated"] is True and sym["context_bars"] == 30 and len(sym["p_up_raw"]) == 5


def test_mcp_over_streamable_http(served_run):
    from mcp import Client

    url, _ = served_run

    async def go():
        async with Client(url + "/mcp") as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == {"forecast", "list_models", "list_symbols"}
            symbols = (await client.call_tool("list_symbols", {})).structured_content["symbols"]
            res = await client.call_tool("forecast", {"symbol": symbols[0]["symbol"], "horizon": 3, "samples": 2})
            assert not res.is_error and len(res.structured_content["p_up"]) == 3
            bad = await client.call_tool("forecast", {"symbol": "../../etc/passwd", "horizon": 3})
            assert bad.is_error and "unknown symbol" in bad.content[0].text

    asyncio.run(go())


def test_page_forecast_and_run_views(served_run):
    url, tmp = served_run
    with chromium() as driver:
        driver.get(url + "/")
        wait_for(driver, "document.body.dataset.ready")
        driver.find_element("id", "file").send_keys(str(FIXTURES / "kline_5min.csv"))
        wait_for(
            driver,
            "document.body.dataset.forecast === 'ready' || document.body.dataset.forecast === 'error'",
            timeout=120,
        )
        drawn = driver.execute_script("return window.kronosView.drawn")
        assert drawn.get("mean") == 24 and drawn.get("band_low") == 24 and drawn.get("band_high") == 24, (
            driver.find_element("id", "status").text
        )
        driver.save_screenshot(str(tmp / "forecast_view.png"))
        if os.environ.get("KRONOS_SCREENSHOT"):  # maintainers: refresh docs/serve.png
            driver.save_screenshot(os.environ["KRONOS_SCREENSHOT"])
        driver.find_element("id", "tab-run").click()
        run = wait_for(driver, "window.kronosView.run")
        assert run["curves"]["predictor"] and run["curves"]["tokenizer"]
        rows = run["evaluation"]["rows"]  # metrics.json: the model in use beside the baselines
        assert run["evaluation"]["model"] in rows and {"last_value", "random_walk"} <= set(rows)
        assert rows[run["evaluation"]["model"]]["crps_rel"] > 0
        assert run["backtest"], "no backtest curves"
        assert len(driver.find_elements("css selector", "#eval-table tr")) >= 3
        assert driver.execute_script("return document.querySelectorAll('#curves-chart canvas').length") > 0
        driver.save_screenshot(str(tmp / "run_view.png"))
        assert (tmp / "run_view.png").stat().st_size > 10_000
