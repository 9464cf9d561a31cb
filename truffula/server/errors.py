"""Every error becomes ``{"error": message, "error_type": kind}`` with LoRAX's status codes:
422 validation (malformed JSON and wrong types too), 424 generation, 429 overloaded."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from truffula.errors import (
    AdapterError,
    EngineOverloadedError,
    GenerationError,
    RequestValidationError,
)
from truffula.server.state import HTTPError

log = logging.getLogger("truffula.server")


def error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    if isinstance(exc, RequestValidationError):
        return 422, {"error": f"Input validation error: {exc}", "error_type": "validation"}
    if isinstance(exc, EngineOverloadedError):
        return 429, {"error": "Model is overloaded", "error_type": "overloaded"}
    if isinstance(exc, AdapterError):
        return exc.status, {"error": str(exc), "error_type": "adapter"}
    if isinstance(exc, GenerationError):
        return 424, {"error": str(exc), "error_type": "generation"}
    if isinstance(exc, HTTPError):
        return exc.status, {"error": str(exc), "error_type": exc.kind}
    if isinstance(exc, ValueError):
        return 422, {"error": f"Input validation error: {exc}", "error_type": "validation"}
    log.exception("unexpected error", exc_info=exc)
    return 500, {"error": f"Internal error: {type(exc).__name__}: {exc}", "error_type": "internal"}


def pydantic_message(exc: FastAPIValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        where = ".".join(loc) or "body"
        parts.append(f"`{where}`: {err.get('msg')}")
    return "; ".join(parts) or "invalid request body"


def install(app: FastAPI) -> None:
    async def on_ours(_: Request, exc: Exception) -> JSONResponse:
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    async def on_pydantic(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FastAPIValidationError)
        msg = pydantic_message(exc)
        return JSONResponse(
            {"error": f"Input validation error: {msg}", "error_type": "validation"}, status_code=422
        )

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not_found", 405: "method_not_allowed", 401: "authentication"}.get(
            exc.status_code, "http"
        )
        return JSONResponse(
            {"error": str(exc.detail), "error_type": kind}, status_code=exc.status_code
        )

    for cls in (
        RequestValidationError,
        EngineOverloadedError,
        AdapterError,
        GenerationError,
        HTTPError,
        Exception,
    ):
        app.add_exception_handler(cls, on_ours)
    app.add_exception_handler(FastAPIValidationError, on_pydantic)
    app.add_exception_handler(StarletteHTTPException, on_http)
