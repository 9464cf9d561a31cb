"""The FastAPI application: routers of each dialect, errors, API key, request metrics."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from truffula import __version__
from truffula.server import adapters, errors, lorax, openai, ops
from truffula.server.state import ServerState

DESCRIPTION = """truffula serves many LoRA adapters on one base model and returns, for every
token, its logprob, rank, the distribution's entropy and the k most likely alternatives.
Dialects: LoRAX (`/generate`, `/generate_stream`, `/`), TGI (`top_n_tokens`), OpenAI (`/v1/*`)."""


class Gate:
    """ASGI middleware: bearer-token check (every route but /health) and per-route counters."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self.state.settings.api_key
        if key and scope["path"] != "/health" and not _authorized(scope, key):
            body = json.dumps(
                {
                    "error": "missing or invalid API key (Authorization: Bearer <key>)",
                    "error_type": "authentication",
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            self.state.metrics.observe_http("unauthorized", 401)
            return
        status = {"code": 500}

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or (
                "unmatched" if status["code"] == 404 else scope["path"]
            )
            self.state.metrics.observe_http(name, status["code"])


def _authorized(scope: dict[str, Any], key: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            given = value.decode("latin-1")
            return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), key)
    return False


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="truffula", version=__version__, description=DESCRIPTION, docs_url="/docs")
    app.state.truffula = state
    errors.install(app)
    app.include_router(ops.router)
    app.include_router(lorax.router)
    app.include_router(openai.router)
    app.include_router(adapters.router)
    from truffula.server import score, ui

    app.include_router(score.router)
    app.include_router(ui.router)

    @app.get("/api-doc/openapi.json", include_in_schema=False)
    async def openapi_alias() -> JSONResponse:
        return JSONResponse(
            get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
        )

    # Non-streamed bodies are gzipped for clients that ask (Starlette never compresses
    # text/event-stream); level 5 keeps the API process's time per byte low.
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=5)
    app.add_middleware(Gate, state=state)
    return app
