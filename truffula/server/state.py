"""What every route shares: the engine, the server settings, metrics, and the request helpers
(error type, parameter mapping, streaming and disconnect handling)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from truffula.engine.async_engine import AsyncEngine, RequestStream
from truffula.engine.core import Request as EngineRequest
from truffula.errors import AdapterError, RequestValidationError
from truffula.sampling.params import SamplingParams
from truffula.server.formats import Accumulator
from truffula.server.metrics import Metrics


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


@dataclass
class ServerSettings:
    model_id: str
    api_key: str | None = None
    max_best_of: int = 2
    default_adapter_source: str = "local"
    version: str = ""
    started: float = field(default_factory=time.time)


@dataclass
class ServerState:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: Metrics

    @property
    def core(self):  # type: ignore[no-untyped-def]
        return self.engine.core

    @property
    def limits(self):  # type: ignore[no-untyped-def]
        return self.engine.core.config.limits

    def random_seed(self) -> int:
        return random.randrange(2**63)

    def submit(self, req: EngineRequest) -> RequestStream:
        return self.engine.submit(req)

    def loaded_adapter_ids(self) -> list[str]:
        return []

    def adapter_info(self) -> dict[str, Any]:
        return {}

    async def preload_adapter(self, adapter_id: str) -> None:
        raise AdapterError(f"adapter {adapter_id!r} cannot be loaded: no adapter support", 404)

    async def resolve_adapter(self, p: Any, params: SamplingParams) -> SamplingParams:
        """The adapter a request names (``adapter_id`` / ``merged_adapters``), ready to serve."""
        adapter_id = getattr(p, "adapter_id", None) if p is not None else None
        merged = getattr(p, "merged_adapters", None) if p is not None else None
        if merged is None and adapter_id in (None, "", self.settings.model_id):
            return params.with_updates(adapter_id=None)
        raise AdapterError(f"adapter {adapter_id!r} cannot be served: no adapters are loaded", 404)


def state_of(request: Request) -> ServerState:
    return request.app.state.truffula  # type: ignore[no-any-return]


async def collect(
    stream: RequestStream, request: Request | None, poll: float = 0.25
) -> Accumulator:
    """Gather a request's outputs; if the HTTP client goes away first, abort the request."""
    acc = Accumulator()

    async def consume() -> None:
        async for out in stream:
            acc.add(out)

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=poll)
            if not done and request is not None and await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected
        task.result()
    finally:
        if not task.done():
            task.cancel()
        stream.close()
    return acc


def sse_data(payload: dict[str, Any] | str) -> bytes:
    body = payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)
    return f"data: {body}\n\n".encode()


async def sse_events(
    events: AsyncIterator[dict[str, Any]], done_marker: bool = False
) -> AsyncIterator[bytes]:
    """Serialize events as SSE; an error after the stream opened becomes an error event."""
    from truffula.server.errors import error_body

    try:
        async for ev in events:
            yield sse_data(ev)
    except Exception as exc:
        _, body = error_body(exc)
        yield sse_data(body)
    if done_marker:
        yield sse_data("[DONE]")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
