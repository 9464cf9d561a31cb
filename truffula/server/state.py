"""What every route shares: the engine, the server settings, metrics, and the request helpers
(error type, parameter mapping, streaming and disconnect handling)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import Request

from truffula.config import LimitsConfig
from truffula.engine.async_engine import AsyncEngine, RequestStream
from truffula.engine.frontend import Frontend
from truffula.engine.messages import EngineRequest
from truffula.engine.tokenizer import Tokenizer
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


LONG_PROMPT_CHARS = 4096


def invalid(field_name: str, message: str) -> RequestValidationError:
    return RequestValidationError(field_name, message)


@dataclass
class ServerSettings:
    model_id: str
    api_key: str | None = None
    max_best_of: int = 2
    default_adapter_source: str | None = None
    version: str = ""
    api_server_count: int = 1
    started: float = field(default_factory=time.time)


@dataclass
class ServerState:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: Metrics

    @property
    def frontend(self) -> Frontend:
        return self.engine.frontend

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.frontend.tokenizer

    @property
    def limits(self) -> LimitsConfig:
        return self.engine.config.limits

    def random_seed(self) -> int:
        return random.randrange(2**63)

    async def prepare(self, prompt: str | list[int], params: SamplingParams) -> EngineRequest:
        """Validate and tokenize; long texts are tokenized in a worker thread, so the event
        loop keeps answering other requests."""
        if isinstance(prompt, str) and len(prompt) > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(self.engine.prepare, prompt, params)
        return self.engine.prepare(prompt, params)

    async def start(self, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Prepare and submit one request."""
        return self.engine.submit(await self.prepare(prompt, params))

    async def start_all(
        self, items: list[tuple[str | list[int], SamplingParams]]
    ) -> list[RequestStream]:
        """Prepare and submit several requests, all or none: a failure (validation, 429)
        closes the ones already submitted, which aborts them."""
        streams: list[RequestStream] = []
        try:
            for prompt, params in items:
                streams.append(await self.start(prompt, params))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    async def adapters(self) -> dict[str, Any]:
        """``{"adapters": [{id, rank, modules, active, slot, requests}], "info": {...}}``."""
        return await self.engine.call("adapters")  # type: ignore[no-any-return]

    async def loaded_adapter_ids(self) -> list[str]:
        return [a["id"] for a in (await self.adapters())["adapters"]]

    async def load_adapter(self, adapter_id: str, source: str | None) -> str:
        """Read an adapter into host memory; the engine does it beside its step loop."""
        source = source or self.settings.default_adapter_source
        return await self.engine.call("load_adapter", adapter_id, source)  # type: ignore[no-any-return]

    async def preload_adapter(self, adapter_id: str) -> None:
        await self.load_adapter(adapter_id, None)

    async def resolve_adapter(self, ref: AdapterRef, params: SamplingParams) -> SamplingParams:
        """The adapter a request names (an id or a merge), loaded and ready."""
        wants = ref.merged is not None or ref.adapter_id not in (None, "", self.settings.model_id)
        if wants and self.frontend.serving_path == "fallback":
            raise AdapterError(
                f"adapters are not supported for {self.frontend.architecture} "
                "(transformers fallback)",
                422,
            )
        source = ref.source or self.settings.default_adapter_source
        if ref.merged is not None:
            from truffula.adapters.merge import MergeSpec

            MergeSpec.parse(**ref.merged)  # validated here, merged in the engine process
            key = await self.engine.call("load_merged", ref.merged, source)
            return params.with_updates(adapter_id=key)
        if ref.adapter_id in (None, "", self.settings.model_id):
            return params.with_updates(adapter_id=None)
        key = await self.load_adapter(ref.adapter_id, source)
        return params.with_updates(adapter_id=key)


@dataclass(frozen=True)
class AdapterRef:
    """What a request says about adapters: an id, or a merge (``MergeSpec.parse`` keywords)."""

    adapter_id: str | None = None
    source: str | None = None
    merged: dict[str, Any] | None = None
    """Keywords of ``MergeSpec.parse``: ids, weights, strategy, density, sign."""

    @classmethod
    def of(cls, p: Any) -> AdapterRef:
        """From LoRAX ``parameters`` (``adapter_id``, ``adapter_source``, ``merged_adapters``)."""
        if p is None:
            return cls()
        merged = None
        if p.merged_adapters is not None:
            m = p.merged_adapters
            merged = {
                "ids": m.ids,
                "weights": m.weights,
                "strategy": m.merge_strategy,
                "density": m.density,
                "sign": m.majority_sign_method,
            }
        return cls(p.adapter_id, p.adapter_source, merged)


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
    body = payload.encode() if isinstance(payload, str) else msgspec.json.encode(payload)
    return b"data: " + body + b"\n\n"


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
