"""``kronos serve``: a forecasting service (REST API, MCP server, web page) over one micro-batching engine.

Needs the ``serve`` extra (``pip install 'kronos[serve]'``): FastAPI, uvicorn, python-multipart and the ``mcp`` SDK.
"""
from kronos.serve.engine import ForecastEngine, Settings
from kronos.serve.inputs import Limits

__all__ = ["ForecastEngine", "Limits", "Settings"]
