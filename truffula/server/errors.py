"""Every error becomes ``{"error": message, "error_type": kind}`` (``{"error": {"message",
"type", "param", "code"}}`` on the OpenAI routes) with LoRAX's status codes: 422 validation
(malformed JSON, invalid UTF-8 and wrong types too), 424 generation, 429 overloaded, 503 engine
gone or shutting down; 401, 405 (with ``Allow``) and 413 for what is refused before a route runs.
docs/operations.md lists them all."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from truffula.errors import (
    AdapterError,
    EngineDeadError,
    EngineOverloadedError,
    GenerationError,
    RequestValidationError,
)

log = logging.getLogger("truffula.server")


class HTTPError(Exception):
    """An error answered as ``{"error": message, "error_type": kind}`` with ``status``."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class ClientDisconnected(Exception):
    pass


def invalid(field_name: str, message: str) -> RequestValidationError:
    return RequestValidationError(field_name, message)


def error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    if isinstance(exc, RequestValidationError):
        return 422, {"error": f"Input validation error: {exc}", "error_type": "validation"}
    if isinstance(exc, EngineOverloadedError):
        return 429, {"error": "Model is overloaded", "error_type": "overloaded"}
    if isinstance(exc, AdapterError):
        return exc.status, {"error": str(exc), "error_type": "adapter"}
    if isinstance(exc, EngineDeadError):
        return 503, {"error": f"Service unavailable: {exc}", "error_type": "unavailable"}
    if isinstance(exc, GenerationError):
        return 424, {"error": str(exc), "error_type": "generation"}
    if isinstance(exc, HTTPError):
        return exc.status, {"error": str(exc), "error_type": exc.kind}
    if isinstance(exc, ClientDisconnected):  # nobody reads it; recorded as 499, not logged
        return 499, {"error": "client closed the request", "error_type": "aborted"}
    if isinstance(exc, ValueError):
        return 422, {"error": f"Input validation error: {exc}", "error_type": "validation"}
    log.exception("unexpected error", exc_info=exc)
    return 500, {"error": f"Internal error: {type(exc).__name__}: {exc}", "error_type": "internal"}


def dialect(path: str, status: int, body: dict[str, str], param: str | None = None) -> dict:
    """OpenAI routes (``path`` under ``/v1/``) answer ``{"error": {"message", "type", "param",
    "code"}}``, which the openai client shows; LoRAX routes keep ``{"error", "error_type"}``."""
    if not path.startswith("/v1/"):
        return body
    return {
        "error": {
            "message": body["error"],
            "type": body["error_type"],
            "param": param,
            "code": status,
        }
    }


def _loc(err: dict) -> list[str]:
    """A validation error's field path, without ``body`` and the tags of tagged unions (which
    start with ``~``: they name a body shape, not a field)."""
    return [str(x) for x in err.get("loc", ()) if x != "body" and not str(x).startswith("~")]


def pydantic_field(exc: FastAPIValidationError) -> str | None:
    """The first field a validation error names (``parameters.top_k``), if any."""
    for err in exc.errors():
        loc = _loc(err)
        if loc and err.get("type") != "json_invalid":
            return ".".join(loc)
    return None


def pydantic_message(exc: FastAPIValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = _loc(err)
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        where = ".".join(loc) or "body"
        parts.append(f"`{where}`: {err.get('msg')}")
    return "; ".join(parts) or "invalid request body"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the path takes (Starlette names only the first route's), and
    HEAD wherever GET is (the middleware answers HEAD as GET)."""
    methods = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            methods.append(method)
    if "GET" in methods:
        methods.insert(1, "HEAD")
    return methods


def install(app: FastAPI) -> None:
    async def on_ours(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_body(exc)
        param = getattr(exc, "field", None)
        return JSONResponse(dialect(request.url.path, status, body, param), status_code=status)

    async def on_pydantic(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FastAPIValidationError)
        body = {
            "error": f"Input validation error: {pydantic_message(exc)}",
            "error_type": "validation",
        }
        param = pydantic_field(exc)
        return JSONResponse(dialect(request.url.path, 422, body, param), status_code=422)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "error parsing the body": invalid UTF-8, an integer of more than 4300
            # digits, ... -- malformed JSON to the client, as the docs say
            cause = exc.__cause__
            body = {
                "error": "Input validation error: malformed JSON body: "
                f"{type(cause).__name__}: {str(cause)[:200]}",
                "error_type": "validation",
            }
            return JSONResponse(dialect(path, 422, body), status_code=422)
        kinds = {404: "not_found", 405: "method_not_allowed", 401: "authentication"}
        body = {"error": str(exc.detail), "error_type": kinds.get(exc.status_code, "http")}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(
            dialect(path, exc.status_code, body), status_code=exc.status_code, headers=headers
        )

    ours = (
        RequestValidationError,
        EngineOverloadedError,
        EngineDeadError,
        AdapterError,
        GenerationError,
        HTTPError,
        ClientDisconnected,
    )
    for cls in (*ours, Exception):
        app.add_exception_handler(cls, on_ours)
    app.add_exception_handler(FastAPIValidationError, on_pydantic)
    app.add_exception_handler(StarletteHTTPException, on_http)
