"""Refresh docs/serve.png: the web page of `kronos serve --run` forecasting one symbol of the run's dataset.

    python tools/screenshot_serve.py --run outputs --symbol SH600036 --out docs/serve.png

Serves the run's model in use (with its calibration) on a loopback port, opens the page in headless Chromium
(Debian's chromium + chromium-driver), picks the symbol and saves the screenshot once the forecast is drawn.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="outputs")
    ap.add_argument("--symbol", required=True)
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--serve-args", default="", help="more `kronos serve` flags, e.g. '--model PATH --calibration F'")
    args = ap.parse_args()

    import shlex

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select

    from kronos.cli import build_parser
    from kronos.serve.app import create_app
    from kronos.serve.command import build_engine

    serve_args = build_parser().parse_args(
        ["serve", "--run", args.run, "--device", "cpu", *shlex.split(args.serve_args)]
    )
    engine, run = build_engine(serve_args)
    app = create_app(engine, run=run, host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    profile = tempfile.mkdtemp(prefix="kronos-shot-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1100,820",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        deadline = time.time() + 60
        while not driver.execute_script("return document.body.dataset.ready") and time.time() < deadline:
            time.sleep(0.2)
        horizon = driver.find_element("id", "horizon")
        horizon.clear()
        horizon.send_keys(str(args.horizon))
        Select(driver.find_element("id", "symbol")).select_by_value(args.symbol)
        deadline = time.time() + 180
        while driver.execute_script("return document.body.dataset.forecast") not in ("ready", "error"):
            if time.time() > deadline:
                print("error: the forecast did not finish", file=sys.stderr)
                return 1
            time.sleep(0.2)
        if driver.execute_script("return document.body.dataset.forecast") == "error":
            print("error: " + driver.find_element("id", "status").text, file=sys.stderr)
            return 1
        time.sleep(0.5)
        driver.save_screenshot(args.out)
        print(f"{args.out}: {driver.find_element('id', 'status').text}")
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
