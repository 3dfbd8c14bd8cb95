"""MCP server (official ``mcp`` SDK): tools ``forecast``, ``list_models`` and ``list_symbols`` over one engine.

``kronos mcp`` serves it over stdio; ``kronos serve`` mounts it as streamable HTTP at ``/mcp``. Bad input gives a
tool error (``isError``) with the same one-line message as the REST API's 422.
"""

from __future__ import annotations

from typing import Any

from kronos.errors import KronosError
from kronos.serve.engine import ForecastEngine, Settings
from kronos.serve.inputs import frame_from_rows


def build_mcp(engine: ForecastEngine):
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer(
        name="kronos",
        log_level="WARNING",
        instructions="Forecast financial K-lines (OHLCV bars) with a loaded Kronos model. Call list_models and "
        "list_symbols first; forecast takes either bars or a dataset symbol.",
    )

    @server.tool()
    async def forecast(
        bars: list[dict[str, Any]] | None = None,
        symbol: str | None = None,
        horizon: int | None = None,
        samples: int | None = None,
        quantiles: list[float] | None = None,
        seed: int | None = None,
        T: float = 1.0,
        top_p: float = 0.9,
    ) -> dict[str, Any]:
        """Forecast the next `horizon` bars after the given history.

        `horizon` defaults to 24 bars and `samples` (sampled paths) to 16, within the service limits.
        Give `bars` (rows with timestamps, open, high, low, close[, volume, amount], oldest first) or the `symbol`
        of the loaded dataset. Returns forecast timestamps, mean OHLCV per step, quantile bands (default 0.1/0.5/0.9)
        and p_up: the probability per step that close ends above the last close.
        """
        try:
            if (bars is None) == (symbol is None):
                raise KronosError("give exactly one of 'bars' (a list of OHLCV rows) or 'symbol' (see list_symbols)")
            history = (
                engine.symbol_history(symbol)
                if symbol is not None
                else engine.history_for(frame_from_rows(bars), "bars")
            )
            settings = Settings(
                horizon=horizon,
                samples=samples,
                seed=seed,
                T=T,
                top_p=top_p,
                quantiles=tuple(quantiles) if quantiles is not None else (0.1, 0.5, 0.9),
            )
            result = (await engine.forecast([history], settings))[0]
        except KronosError as exc:
            raise ToolError(str(exc)) from None
        if symbol is not None:
            result["symbol"] = symbol
        return result

    @server.tool()
    async def list_models() -> dict[str, Any]:
        """The loaded model(s): parameter counts, max context, calibration coverage; and the request limits."""
        return {"models": engine.models(), "limits": engine.limits.to_dict()}

    @server.tool()
    async def list_symbols() -> dict[str, Any]:
        """Symbols of the loaded dataset with their bar counts and time ranges (empty when none is loaded)."""
        if engine.dataset is None:
            return {"dataset": None, "symbols": []}
        return {"dataset": engine.dataset.path, "symbols": engine.dataset.symbols()}

    return server


def run_stdio(engine: ForecastEngine) -> None:
    """Serve the MCP tools over stdin/stdout until the client closes the connection."""
    build_mcp(engine).run("stdio")
