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

from truffula.adapters.store import AdapterStore
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
    default_adapter_source: str | None = None
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

    @property
    def adapters(self) -> AdapterStore:
        return self.engine.core.adapters  # type: ignore[no-any-return]

    def loaded_adapter_ids(self) -> list[str]:
        return self.adapters.loaded_ids()

    def adapter_info(self) -> dict[str, Any]:
        store = self.adapters
        return {
            "max_active_adapters": store.num_slots,
            "max_lora_rank": store.max_rank,
            "active_adapters": store.num_active,
            "loaded_adapters": len(store.loaded_ids()),
            "adapter_root": str(store.root),
            "adapter_sources": ["local", "hub"],
        }

    async def load_adapter(self, adapter_id: str, source: str | None) -> str:
        """Read an adapter into host memory in a worker thread: the step loop keeps running."""
        return await asyncio.to_thread(
            self.adapters.load, adapter_id, source or self.settings.default_adapter_source
        )

    async def preload_adapter(self, adapter_id: str) -> None:
        await self.load_adapter(adapter_id, None)

    async def resolve_adapter(self, p: Any, params: SamplingParams) -> SamplingParams:
        """The adapter a request names (``adapter_id`` or ``merged_adapters``), loaded and ready."""
        adapter_id = getattr(p, "adapter_id", None) if p is not None else None
        merged = getattr(p, "merged_adapters", None) if p is not None else None
        source = getattr(p, "adapter_source", None) if p is not None else None
        source = source or self.settings.default_adapter_source
        wants = merged is not None or adapter_id not in (None, "", self.settings.model_id)
        if wants and self.core.serving_path == "fallback":
            raise AdapterError(
                f"adapters are not supported for {self.core.architecture} (transformers fallback)",
                422,
            )
        if merged is not None:
            from truffula.adapters.merge import MergeSpec

            spec = MergeSpec.parse(
                merged.ids,
                merged.weights,
                merged.merge_strategy,
                merged.density,
                merged.majority_sign_method,
            )
            key = await asyncio.to_thread(self.adapters.load_merged, spec, source)
            return params.with_updates(adapter_id=key)
        if adapter_id in (None, "", self.settings.model_id):
            return params.with_updates(adapter_id=None)
        key = await self.load_adapter(adapter_id, source)
        return params.with_updates(adapter_id=key)


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
