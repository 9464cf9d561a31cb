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
from truffula.server import adapters, errors, lorax, openai, ops, tokens
from truffula.server.observe import Observe
from truffula.server.state import ServerState

DESCRIPTION = """truffula serves many LoRA adapters on one base model and returns, for every
token, its logprob, rank, the distribution's entropy and the k most likely alternatives.
Dialects: LoRAX (`/generate`, `/generate_stream`, `/`), TGI (`top_n_tokens`), OpenAI (`/v1/*`)."""


class Gate:
    """ASGI middleware, before any route runs: the bearer-token check (every route but
    /health and the playground's static page), the body limit (``--max-request-bytes``), HEAD answered as GET without a body,
    and per-route request counters.

    The body limit is enforced before anything is parsed: a ``Content-Length`` above it is
    answered 413 at once, without reading the body; a body without one (chunked) is read up to
    the limit and answered 413 as soon as it passes it, without reading the rest. Either way the
    connection is closed after the 413."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.state.settings
        key = settings.api_key
        if key and not _public(scope) and not _authorized(scope, key):
            await _reject(
                scope,
                send,
                401,
                "missing or invalid API key (Authorization: Bearer <key>)",
                "authentication",
                [(b"www-authenticate", b"Bearer")],
            )
            self.state.metrics.observe_http("unauthorized", 401)
            return
        limit = settings.max_request_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > limit:
                await _too_large(scope, send, limit)
                self.state.metrics.observe_http("too_large", 413)
                return
        elif _header(scope, b"transfer-encoding") is not None:
            body = await _read_body(receive, limit)
            if body is None:
                await _too_large(scope, send, limit)
                self.state.metrics.observe_http("too_large", 413)
                return
            receive = _replay(body, receive)
        if scope["method"] == "HEAD":  # the server sends HEAD's headers without the body
            scope = {**scope, "method": "GET"}
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


def _public(scope: dict[str, Any]) -> bool:
    """What answers without the API key: /health, and the playground's page and files (which
    hold nothing of the server: the page asks for the key before it calls the API)."""
    path = scope["path"]
    if path == "/health":
        return True
    return scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith("/ui/"))


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1").strip()
    return None


def _authorized(scope: dict[str, Any], key: str) -> bool:
    """Compared as bytes: a header of any bytes (non-ASCII too) is simply not the key."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, given = bytes(value).partition(b" ")
            return scheme == b"Bearer" and hmac.compare_digest(given.strip(), key.encode())
    return False


async def _read_body(receive: Any, limit: int) -> list[dict[str, Any]] | None:
    """The body's messages, or None as soon as they pass ``limit`` bytes."""
    messages = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    """A ``receive`` that gives ``messages`` back first (one body), then the connection's."""
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
    first: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]
    first += [m for m in messages if m["type"] != "http.request"]

    async def replay() -> dict[str, Any]:
        if first:
            return first.pop(0)
        return await receive()

    return replay


async def _too_large(scope: dict[str, Any], send: Any, limit: int) -> None:
    await _reject(
        scope,
        send,
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(--max-request-bytes)",
        "payload_too_large",
        [(b"connection", b"close")],
    )


async def _reject(
    scope: dict[str, Any],
    send: Any,
    status: int,
    message: str,
    kind: str,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """An error answered by the middleware itself, in the route's dialect."""
    body = json.dumps(
        errors.dialect(scope["path"], status, {"error": message, "error_type": kind})
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="truffula", version=__version__, description=DESCRIPTION, docs_url="/docs")
    app.state.truffula = state
    errors.install(app)
    app.include_router(ops.router)
    app.include_router(tokens.router)
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
    app.add_middleware(Observe)  # outermost: 401s and 413s get a request id too
    return app
