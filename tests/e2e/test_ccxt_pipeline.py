"""The complete pipeline (fast mode, tiny models) on the ccxt crypto source, fed by a loopback Binance server."""

import json

import pandas as pd
import pytest

from e2e.test_pipeline import latest_run, run_script, write_config

pytest.importorskip("ccxt")
pytestmark = pytest.mark.slow  # end-to-end / subprocess tests: `make test-fast` skips them


def test_ccxt_pipeline_against_loopback_binance(tmp_path):
    from _support.binance_server import BinanceTestServer

    with BinanceTestServer() as server:
        cfg = write_config(
            tmp_path,
            data_source="ccxt",
            ccxt_exchange="binance",
            ccxt_symbols=["BTC/USDT", "ETH/USDT"],
            ccxt_timeframe="1h",
            ccxt_since="2024-01-01",
            ccxt_until="2024-02-01",
            ccxt_api_url=server.root,
            ccxt_retries=1,
            ccxt_timeout=5.0,
            split_ratios=[0.6, 0.2, 0.2],
        )
        r = run_script(
            ["-m", "kronos.cli", "pipeline", "--cpu", "--fast-mode", "--config-path", str(cfg), "--skip-backtest"]
        )
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "data/processed/manifest.json").read_text())
    assert sorted(manifest["symbols"]) == ["BTC/USDT", "ETH/USDT"]
    assert manifest["source_info"]["amount"] == "quote volume"
    fc = pd.read_parquet(latest_run(tmp_path) / "backtest_results/finetune_backtest_demo/forecast_latest.parquet")
    assert set(fc["symbol"]) == {"BTC/USDT", "ETH/USDT"}
    # 24/7: the forecast continues hour by hour, weekends included
    for _, group in fc.groupby("symbol"):
        steps = pd.to_datetime(group["timestamps"]).drop_duplicates().sort_values().diff().dropna()
        assert (steps == pd.Timedelta("1h")).all()
