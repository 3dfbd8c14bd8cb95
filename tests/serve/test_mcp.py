"""The MCP server with the official SDK's client: in-process, and over stdio as `kronos mcp` (subprocess)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

from kronos.serve.engine import ForecastEngine  # noqa: E402
from kronos.serve.mcp import build_mcp  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
TINY = TESTS / "fixtures" / "parity-tiny" / "tiny"
CSV = TESTS / "fixtures" / "kline_5min.csv"


def _bars(n: int = 60) -> list[dict]:
    return pd.read_csv(CSV).iloc[:n].to_dict("records")


async def _exercise(client) -> None:
    names = {t.name for t in (await client.list_tools()).tools}
    assert {"forecast", "list_models", "list_symbols"} <= names
    models = await client.call_tool("list_models", {})
    assert not models.is_error and models.structured_content["models"][0]["max_context"] == 64
    res = await client.call_tool("forecast", {"bars": _bars(), "horizon": 3, "samples": 4, "seed": 1})
    assert not res.is_error, res.content
    out = res.structured_content
    assert len(out["timestamps"]) == 3 and len(out["p_up"]) == 3 and set(out["quantiles"]) == {"0.1", "0.5", "0.9"}
    bad = await client.call_tool("forecast", {"bars": _bars()[::-1], "horizon": 3})
    assert bad.is_error and "not sorted" in bad.content[0].text
    none = await client.call_tool("forecast", {"horizon": 3})
    assert none.is_error and "exactly one of 'bars'" in none.content[0].text
    symbols = await client.call_tool("list_symbols", {})
    assert symbols.structured_content["symbols"] == []


@pytest.mark.slow
def test_mcp_tools_in_process(one_thread):
    engine = ForecastEngine.load(str(TINY / "tokenizer"), str(TINY / "predictor"), device="cpu", max_context=64)

    async def go():
        async with Client(build_mcp(engine)) as client:
            await _exercise(client)
        await engine.close()

    try:
        asyncio.run(go())
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_kronos_mcp_over_stdio():
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "kronos.cli",
            "-q",
            "mcp",
            "--tokenizer",
            str(TINY / "tokenizer"),
            "--model",
            str(TINY / "predictor"),
            "--max-context",
            "64",
            "--device",
            "cpu",
        ],
        env=env,
        cwd=str(REPO),
    )

    async def go():
        async with Client(params, read_timeout_seconds=120) as client:
            await _exercise(client)

    asyncio.run(go())
