"""The REST API, the web page and the MCP endpoint of ``kronos serve``, in one FastAPI app.

Routes: ``GET /health``, ``GET /models``, ``POST /forecast`` (JSON rows or a CSV/Parquet upload),
``POST /forecast/batch``, ``GET /symbols``, ``GET /symbols/{symbol}/forecast``, ``GET /run`` (a pipeline run's
results), ``/mcp`` (MCP streamable HTTP), ``/`` (the page) and ``/docs`` (OpenAPI). Every error is JSON
``{"error": "...", "limit": "..."?}`` with a 4xx status; the service never dies on a bad request.

Safe without a token: only the bound host names are served (Starlette's trusted-host middleware; a DNS-rebinding
page's foreign ``Host`` gets a 400), state-changing requests must be JSON or multipart (a cross-site form or
``text/plain`` POST gets a 415) and a foreign ``Origin`` gets a 403; ``/models`` and ``/symbols`` name files, not
absolute paths, unless a token guards the service. A client that sends its body too slowly gets a 408; a request
whose client goes away is cancelled (:class:`~kronos.serve.engine.ForecastEngine`).
"""

import asyncio
import contextlib
import hmac
import json
import logging
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from kronos.errors import KronosError
from kronos.serve.engine import ForecastEngine, QueueFullError, Settings
from kronos.serve.inputs import (
    LimitError,
    check_limit,
    frame_from_rows,
    frame_from_upload,
    parse_json_body,
    short,
    upload_label,
)
from kronos.serve.mcp import build_mcp

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/health",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
BODY_TYPES = ("application/json", "multipart/form-data")  # what a state-changing request may send
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
ANY_ADDRESS = ("0.0.0.0", "::", "")
CLIENT_GONE = 499  # the status logged for a request whose client disconnected (nobody reads it)


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``Host`` header names served for a bind address: a loopback bind serves the loopback names, a specific
    address serves itself, a wildcard bind (0.0.0.0, ::) any name unless ``extra`` lists them; plus ``extra``."""
    names = list(extra)
    if host in LOCAL_NAMES:
        names += LOCAL_NAMES
    elif host in ANY_ADDRESS:
        names += [] if extra else ["*"]
    else:
        names += [host, f"[{host}]"] if ":" in host else [host]
    return list(dict.fromkeys(names))


SETTING_FIELDS = {
    "horizon": int,
    "samples": int,
    "T": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "quantiles": list,
    "return_samples": bool,
}
FORECAST_FIELDS = {"bars", "model", "history", *SETTING_FIELDS}
BATCH_FIELDS = {"series", "model", *SETTING_FIELDS}


def _json_response(status: int, payload: dict) -> tuple[int, list, bytes]:
    body = json.dumps(payload, allow_nan=False).encode()
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


async def _send(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Pure ASGI: the token check (every route but /health) and the request body bound (413, names the limit).

    The token may come as ``Authorization: Bearer T``, ``X-API-Token: T``, ``?token=T`` (for opening the page; it
    is then kept in a cookie) or that cookie.
    """

    def __init__(self, app, token: str | None, max_body: int, body_timeout: float = 10.0) -> None:
        self.app = app
        self.token = token or None
        self.max_body = int(max_body)
        self.body_timeout = float(body_timeout)

    @staticmethod
    def _refusal(scope, headers: Headers) -> tuple[int, str] | None:
        """Why a state-changing request is refused before anything else: a body type a cross-site form can send, or
        an ``Origin`` other than the service's own."""
        if scope.get("method", "GET") in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != headers.get("host", "").lower():
                return 403, short(
                    f"cross-origin request from {origin!r} refused; the service answers pages it serves itself "
                    "and clients that send no Origin header"
                )
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in BODY_TYPES:
            return 415, short(
                f"content type {ctype or 'none'!r} refused; send application/json (or multipart/form-data for a "
                "file upload)"
            )
        return None

    def _authorised(self, scope, headers: Headers) -> tuple[bool, bool]:
        if self.token is None or scope["path"] in OPEN_PATHS:
            return True, False
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        if "x-api-token" in headers:
            given.append(headers["x-api-token"].strip())
        cookie = SimpleCookie()
        with contextlib.suppress(Exception):
            cookie.load(headers.get("cookie", ""))
        if "kronos_token" in cookie:
            given.append(cookie["kronos_token"].value)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        from_query = query.get("token", [])
        given.extend(from_query)
        ok = any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)
        return ok, ok and bool(from_query)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_headers = Headers(scope=scope)  # parsed once: origin, content type, token, length
        refusal = self._refusal(scope, request_headers)
        if refusal is not None:
            return await _send(send, *_json_response(refusal[0], {"error": refusal[1]}))
        ok, set_cookie = self._authorised(scope, request_headers)
        if not ok:
            status, headers, body = _json_response(
                401,
                {
                    "error": "missing or wrong API token; send 'Authorization: Bearer <token>' (the --token / "
                    "KRONOS_API_TOKEN the service was started with)"
                },
            )
            return await _send(send, status, headers + [(b"www-authenticate", b"Bearer")], body)
        if "content-length" in request_headers:
            try:
                length = int(request_headers["content-length"])
            except ValueError:
                length = 0
            if length > self.max_body:
                return await _send(
                    send,
                    *_json_response(
                        413,
                        {
                            "error": f"request body is {length} bytes, over the service limit "
                            f"max_body_bytes={self.max_body}",
                            "limit": "max_body_bytes",
                        },
                    ),
                )
        received = 0
        limit = self.max_body
        body_done = scope.get("method", "GET") in SAFE_METHODS
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # after the body: wait for the client to go away (disconnect), without a deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise LimitError(
                    f"request body not received within body_timeout_s={self.body_timeout:g} seconds",
                    "body_timeout_s",
                    408,
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise LimitError(
                        f"request body is over the service limit max_body_bytes={limit}", "max_body_bytes", 413
                    )
                body_done = not message.get("more_body", False)
            return message

        async def send_with_cookie(message):
            if set_cookie and message["type"] == "http.response.start":
                cookie = f"kronos_token={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message = {**message, "headers": list(message.get("headers", [])) + [(b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, limited_receive, send_with_cookie)


class RequestError(KronosError):
    """A request field is unknown or of the wrong kind."""


class ClientGone(Exception):
    """The client disconnected while its forecast was queued or running."""


def _settings(body: dict, allowed: set, defaults: dict | None = None) -> Settings:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    values = dict(defaults or {})
    values.update({k: v for k, v in body.items() if k in SETTING_FIELDS and v is not None})
    for key, value in values.items():
        kind = SETTING_FIELDS[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif kind is list and not isinstance(value, list):
            raise RequestError(f"'{key}' must be a list of numbers, e.g. [0.1, 0.9]")
        elif kind is bool and not isinstance(value, bool):
            raise RequestError(f"'{key}' must be true or false, got {value!r}")
    if "quantiles" in values:
        values["quantiles"] = tuple(values["quantiles"])
    return Settings(**values)


def _check_echo(n: Any) -> int:
    """The ``history`` field (bars to echo back), checked before any work is done."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RequestError(f"'history' must be an integer >= 0 (bars to echo back), got {n!r}")
    return n


def _with_history(result: dict, frame, n: Any) -> dict:
    """Echo the last ``n`` bars of the history into the result (for drawing it beside the forecast)."""
    n = _check_echo(n)
    if n:
        tail = frame.iloc[-min(n, len(frame)) :]
        result["history"] = {
            "timestamps": [t.isoformat() for t in tail["timestamps"]],
            **{c: tail[c].round(6).tolist() for c in ("open", "high", "low", "close", "volume")},
        }
    return result


def _form_value(raw: str, key: str) -> Any:
    kind = SETTING_FIELDS.get(key, int if key == "history" else None)
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind is list:
            return [float(x) for x in raw.replace(",", " ").split()]
    except ValueError:
        assert kind is not None  # only the conversions above raise it
        raise RequestError(f"form field '{key}' must be a {kind.__name__}, got {raw!r}") from None
    return raw


def create_app(
    engine: ForecastEngine,
    *,
    token: str | None = None,
    run=None,
    mcp: bool = True,
    host: str = "127.0.0.1",
    hosts: list[str] | tuple[str, ...] = (),
):
    """The FastAPI app over ``engine``; ``run`` is a :class:`kronos.serve.run.RunFolder` for the run view.

    ``host`` is the bind address: only the names :func:`allowed_hosts` gives for it (plus ``hosts``) are served, and
    on a local one the MCP endpoint also refuses foreign Host/Origin headers (DNS rebinding protection of the SDK).
    Without a ``token``, file locations are shown as names only."""
    names = allowed_hosts(host, hosts)

    def public(path: Any) -> str | None:
        """A file location as shown to clients: the absolute path behind a token; else relative to the working
        folder or the run folder when inside one, or its name only."""
        if path in (None, ""):
            return None
        if token:
            return str(path)
        p = Path(str(path)).expanduser()
        for base in [Path.cwd()] + ([run.dir] if run is not None else []):
            with contextlib.suppress(ValueError, OSError):
                rel = p.resolve().relative_to(Path(base).resolve())
                if rel.parts:
                    return str(rel)
        return p.resolve().name

    mcp_server = None
    if mcp:
        mcp_server = build_mcp(engine)
        mcp_http = mcp_server.streamable_http_app(
            streamable_http_path="/mcp", stateless_http=True, json_response=True, host=host
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with contextlib.AsyncExitStack() as stack:
            if mcp_server is not None:
                await stack.enter_async_context(mcp_server.session_manager.run())
            try:
                yield
            finally:
                await engine.close()

    app = FastAPI(
        title="Kronos forecasting service",
        version="1",
        lifespan=lifespan,
        description="Forecast K-lines with a loaded Kronos model: REST, MCP (/mcp) and a web page (/).",
    )
    app.state.engine = engine

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(KronosError)
    async def _kronos_error(request: Request, exc: KronosError):
        if isinstance(exc, LimitError):
            return error(exc.status, short(exc), limit=exc.limit)
        if isinstance(exc, QueueFullError):
            return error(503, short(exc), limit="max_queue")
        return error(422, short(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error(
            exc.status_code,
            str(exc.detail) if exc.status_code != 404 else f"no route {request.method} {request.url.path}; see /docs",
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the service keeps running")

    @app.get("/health")
    async def health() -> dict:
        """Liveness (no token needed)."""
        return {"status": "ok", "model": engine.info.name, "batching": engine.batching, **engine.stats}

    @app.get("/models")
    async def models() -> dict:
        """What is loaded: model sizes, max context, the calibration's validation coverage; and the limits."""
        models = engine.models()
        for m in models:
            m["tokenizer"], m["model"] = public(m["tokenizer"]), public(m["model"])
            if m.get("calibration"):
                m["calibration"] = {**m["calibration"], "file": public(m["calibration"]["file"])}
        return {
            "models": models,
            "limits": engine.limits.to_dict(),
            "dataset": public(engine.dataset.path) if engine.dataset else None,
            "run": public(run.dir) if run is not None else None,
        }

    async def until_gone(request: Request, work) -> Any:
        """Await ``work`` (an engine forecast) unless the client disconnects first: then it is cancelled (the
        engine drops it or stops it between decode steps) and :class:`ClientGone` ends the request."""
        task = asyncio.ensure_future(work)

        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            watcher.cancel()
        if task.cancelled():
            raise ClientGone()
        return task.result()

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        log.info("%s %s: the client went away; its forecast was cancelled", request.method, request.url.path)
        return error(CLIENT_GONE, "client closed the request")

    async def _json_body(request: Request) -> dict:
        # size and nesting depth are checked on the raw bytes before json.loads; the message is short
        body = parse_json_body(await request.body(), engine.limits)
        if not isinstance(body, dict):
            raise RequestError('request body must be a JSON object, e.g. {"bars": [...], "horizon": 24}')
        return body

    forecast_doc = {
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["bars"],
                        "properties": {
                            "bars": {
                                "type": "array",
                                "items": {"type": "object"},
                                "description": "rows with timestamps, open, high, low, close[, volume, amount]",
                            },
                            "horizon": {"type": "integer", "default": 24},
                            "samples": {"type": "integer", "default": 16},
                            "T": {"type": "number", "default": 1.0},
                            "top_k": {"type": "integer", "default": 0},
                            "top_p": {"type": "number", "default": 0.9},
                            "seed": {"type": "integer"},
                            "quantiles": {"type": "array", "items": {"type": "number"}, "default": [0.1, 0.5, 0.9]},
                            "return_samples": {"type": "boolean", "default": False},
                            "model": {"type": "string"},
                        },
                    }
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "horizon": {"type": "integer"},
                            "samples": {"type": "integer"},
                            "seed": {"type": "integer"},
                        },
                    }
                },
            }
        }
    }

    @app.post("/forecast", openapi_extra=forecast_doc)
    async def forecast(request: Request):
        """Forecast one series: JSON ``{"bars": [...], "horizon": 24, ...}`` or a multipart CSV/Parquet upload."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            await request.body()  # read under the body limit first
            form = await request.form(max_files=1, max_fields=len(SETTING_FIELDS) + 2)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError("multipart upload needs a 'file' field holding a CSV or Parquet file")
            fields = {k: _form_value(v, k) for k, v in form.items() if k != "file" and isinstance(v, str)}
            echo = _check_echo(fields.pop("history", 0))
            settings = _settings(fields, FORECAST_FIELDS - {"bars"})
            engine.check_model(fields.get("model"))
            table = await asyncio.to_thread(  # sized up (rows, columns, types) before it is decoded
                frame_from_upload, await upload.read(), upload.filename or "upload", limits=engine.limits
            )
            where = upload_label(upload.filename or "upload")
        else:
            body = await _json_body(request)
            settings = _settings(body, FORECAST_FIELDS)
            engine.check_model(body.get("model"))
            echo = _check_echo(body.get("history", 0))
            if "bars" not in body:
                raise RequestError("missing field 'bars': a list of rows with timestamps, open, high, low, close")
            table = frame_from_rows(body["bars"])
            where = "bars"
        history = await asyncio.to_thread(engine.history_for, table, where)  # parsing stays off the event loop
        result = (await until_gone(request, engine.forecast([history], settings)))[0]
        return JSONResponse(_with_history(result, history, echo))

    @app.post("/forecast/batch")
    async def forecast_batch(request: Request):
        """Forecast many series with one setting: ``{"series": [{"bars": [...]}, ...], "horizon": 24}``."""
        body = await _json_body(request)
        settings = _settings(body, BATCH_FIELDS)
        engine.check_model(body.get("model"))
        series = body.get("series")
        if not isinstance(series, list) or not series:
            raise RequestError('\'series\' must be a non-empty list of {"bars": [...]} or {"symbol": ...}')

        check_limit(len(series), "max_batch_series", engine.limits, "number of series")
        histories = []
        for i, item in enumerate(series):
            if not isinstance(item, dict) or not ({"bars", "symbol"} & set(item)):
                raise RequestError(f'series {i}: give {{"bars": [...]}} or {{"symbol": "..."}}')
            if "symbol" in item:
                histories.append(engine.symbol_history(str(item["symbol"])))
            else:
                table = frame_from_rows(item["bars"], f"series {i}")
                histories.append(await asyncio.to_thread(engine.history_for, table, f"series {i}"))
        return JSONResponse({"forecasts": await until_gone(request, engine.forecast(histories, settings))})

    @app.get("/symbols")
    async def symbols() -> dict:
        """The loaded dataset's symbols (with bar counts and time ranges)."""
        if engine.dataset is None:
            raise RequestError("no dataset is loaded; start the service with --dataset PATH or --run DIR")
        return {"dataset": public(engine.dataset.path), "symbols": engine.dataset.symbols()}

    @app.get("/symbols/{symbol}/forecast")
    async def symbol_forecast(
        request: Request,
        symbol: str,
        horizon: int | None = None,
        samples: int | None = None,
        seed: int | None = None,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        history: int = 200,
        quantiles: str = "0.1,0.5,0.9",
    ):
        """Forecast after a dataset symbol's latest bar; the response also carries the last ``history`` bars."""
        _check_echo(history)
        qs = _form_value(quantiles, "quantiles")
        settings = Settings(
            horizon=horizon, samples=samples, seed=seed, T=T, top_k=top_k, top_p=top_p, quantiles=tuple(qs)
        )
        frame = engine.symbol_history(symbol)
        result = (await until_gone(request, engine.forecast([frame], settings)))[0]
        result["symbol"] = symbol
        return JSONResponse(_with_history(result, frame, history))

    @app.get("/run")
    async def run_view() -> dict:
        """The pipeline run's training curves, evaluation table and backtest curves (with ``--run``)."""
        if run is None:
            raise RequestError("no pipeline run is loaded; start the service with --run DIR")
        return await asyncio.to_thread(run.summary)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if mcp_server is not None:
        app.router.routes.extend(r for r in mcp_http.routes if getattr(r, "path", "") == "/mcp")
    app.add_middleware(
        GuardMiddleware,
        token=token,
        max_body=engine.limits.max_body_bytes,
        body_timeout=engine.limits.body_timeout_s,
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=names)  # outermost: a foreign Host gets nothing else
    return app
