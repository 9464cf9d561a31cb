"""Request ids, logs and traces of every HTTP request.

Each request gets an id: the client's ``X-Request-Id`` when it sends a sane one, else a fresh
one; it comes back as the ``x-request-id`` header and is on every log record written while the
request runs. ``--log-format json`` writes one JSON object a line (``time, level, logger,
message, request_id`` and the fields a record carries) and one ``request`` line per HTTP request
(method, path, status, duration). ``truffula.server.tracing`` adds the spans.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

from truffula.logs import JSONFormatter
from truffula.server import tracing

REQUEST_ID: ContextVar[str | None] = ContextVar("truffula_request_id", default=None)
_STREAMS: ContextVar[list[Any] | None] = ContextVar("truffula_streams", default=None)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("truffula.access")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


def configure_logging(fmt: str, level: str, prefix: str = "") -> dict[str, Any] | None:
    """Root logging of an API process; returns uvicorn's ``log_config`` (None: its default)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("truffula").setLevel(logging.INFO)
    access_log.setLevel(logging.INFO if fmt == "json" or level == "debug" else logging.WARNING)
    if fmt != "json":
        return None
    # uvicorn's own loggers through the same handler (JSON), not its coloured text ones
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            name: {"level": level.upper(), "propagate": True}
            for name in ("uvicorn", "uvicorn.error")
        },
    }


def track(stream: Any) -> None:
    """Remember an engine request (``RequestStream``) the current HTTP request started: its
    spans and its id in the request's log line."""
    streams = _STREAMS.get()
    if streams is not None:
        streams.append(stream)


def request_id_of(scope: dict[str, Any]) -> str:
    for key, value in scope.get("headers", []):
        if key == b"x-request-id":
            given = value.decode("latin-1")
            if _SANE_ID.fullmatch(given):
                return given
    return uuid.uuid4().hex


class Observe:
    """ASGI middleware: request id, the request's trace spans, the ``request`` log line."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        token = REQUEST_ID.set(request_id)
        streams: list[Any] = []
        streams_token = _STREAMS.set(streams)
        trace = tracing.RequestTrace(scope, request_id) if tracing.enabled() else None
        started = time.monotonic()
        status = {"code": 500}

        async def send_observed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
                if trace is not None:
                    trace.response_started(message["status"], headers)
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            _STREAMS.reset(streams_token)
            if trace is not None:
                trace.end(streams)
            if access_log.isEnabledFor(logging.INFO):
                extra = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status["code"],
                    "duration_ms": round(1000 * (time.monotonic() - started), 2),
                }
                if streams:
                    extra["engine_request_ids"] = [s.request_id for s in streams]
                access_log.info(
                    "%s %s %d", scope["method"], scope["path"], status["code"], extra=extra
                )
            REQUEST_ID.reset(token)
