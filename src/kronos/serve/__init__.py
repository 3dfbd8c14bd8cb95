"""``kronos serve``: a forecasting service (REST API, MCP server, web page) over one micro-batching engine.

Needs the ``serve`` extra (``pip install 'kronos-kline[serve]'``): FastAPI, uvicorn, python-multipart and the ``mcp``
SDK.
Modules: :mod:`~kronos.serve.engine` (models, micro-batching), :mod:`~kronos.serve.inputs` (request checks and
limits), :mod:`~kronos.serve.app` (REST + page), :mod:`~kronos.serve.mcp` (MCP tools), :mod:`~kronos.serve.run`
(a pipeline run's results), :mod:`~kronos.serve.command` (the CLI commands).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ForecastEngine", "Limits", "Settings"]


def __getattr__(name: str) -> Any:  # lazy: the CLI imports kronos.serve.command without loading pandas/torch
    if name in ("ForecastEngine", "Settings"):
        from kronos.serve import engine

        return getattr(engine, name)
    if name == "Limits":
        from kronos.serve.inputs import Limits

        return Limits
    raise AttributeError(name)
