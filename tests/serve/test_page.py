"""The web page in a real headless Chromium: load /, upload the bundled CSV, see the forecast drawn."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _support.browser import chromium, live_server, wait_for  # noqa: E402
from kronos.serve.app import create_app  # noqa: E402
from kronos.serve.engine import ForecastEngine  # noqa: E402

pytestmark = pytest.mark.slow  # a browser and a live server

TESTS = Path(__file__).resolve().parents[1]
TINY = TESTS / "fixtures" / "parity-tiny" / "tiny"
CSV = TESTS / "fixtures" / "kline_5min.csv"


def test_page_upload_csv_draws_forecast_and_bands(one_thread, tmp_path, dataset):
    engine = ForecastEngine.load(
        str(TINY / "tokenizer"), str(TINY / "predictor"), device="cpu", max_context=64, dataset=str(dataset)
    )
    try:
        with live_server(create_app(engine)) as url, chromium() as driver:
            driver.get(url + "/")
            wait_for(driver, "document.body.dataset.ready")
            assert "predictor" in driver.find_element("id", "model-info").text
            options = driver.execute_script("return [...document.querySelectorAll('#symbol option')].length")
            assert options == 9  # placeholder + the dataset's 8 symbols
            driver.find_element("id", "horizon").clear()
            driver.find_element("id", "horizon").send_keys("12")
            driver.find_element("id", "samples").clear()
            driver.find_element("id", "samples").send_keys("8")
            driver.find_element("id", "file").send_keys(str(CSV))  # the drop zone's file input
            wait_for(driver, "document.body.dataset.forecast === 'ready' || document.body.dataset.forecast === 'error'")
            assert driver.execute_script("return document.body.dataset.forecast") == "ready", driver.find_element(
                "id", "status"
            ).text
            drawn = driver.execute_script("return window.kronosView.drawn")
            assert drawn["candles"] == 300 and drawn["mean"] == 12 and drawn["p_up"] == 12
            assert drawn["band_low"] == 12 and drawn["band_high"] == 12 and drawn["volume"] == 312
            assert driver.execute_script("return document.querySelectorAll('#price-chart canvas').length") > 0
            assert "kline_5min.csv" in driver.find_element("id", "status").text
            shot = tmp_path / "page.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("KRONOS_SCREENSHOT"):  # maintainers: refresh docs/serve.png
                shutil.copy(shot, os.environ["KRONOS_SCREENSHOT"])
            # a dataset symbol, then an error shown on the page instead of a chart
            driver.execute_script("document.getElementById('file').value = ''")
            symbol = driver.execute_script("return document.querySelectorAll('#symbol option')[1].value")
            driver.execute_script(
                f"const s = document.getElementById('symbol'); s.value = '{symbol}';"
                "s.dispatchEvent(new Event('change'))"
            )
            wait_for(driver, f"window.kronosView.result && window.kronosView.result.symbol === '{symbol}'")
            driver.find_element("id", "horizon").clear()
            driver.find_element("id", "horizon").send_keys("100000")
            driver.find_element("id", "go").click()
            wait_for(driver, "document.body.dataset.forecast === 'error'")
            assert "max_horizon" in driver.find_element("id", "status").text
    finally:
        engine.shutdown()
