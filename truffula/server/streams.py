"""Reading a request's outputs for HTTP: collecting them (aborting when the client goes away)
and serializing events as server-sent events (msgspec JSON; an error after the stream opened
becomes an error event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi import Request

from truffula import stalls
from truffula.engine.async_engine import RequestStream
from truffula.server.errors import ClientDisconnected, error_body
from truffula.server.formats import Accumulator


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


def sse_events(
    events: AsyncIterator[dict[str, Any]], done_marker: bool = False
) -> AsyncIterator[bytes]:
    """Serialize events as SSE; an error after the stream opened becomes an error event
    (each stream's pauses logged under ``TRUFFULA_STALL_LOG``)."""
    return stalls.timed_events(_sse_events(events, done_marker), "an SSE")


async def _sse_events(
    events: AsyncIterator[dict[str, Any]], done_marker: bool
) -> AsyncIterator[bytes]:
    try:
        async for ev in events:
            yield sse_data(ev)
    except Exception as exc:
        _, body = error_body(exc)
        yield sse_data(body)
    if done_marker:
        yield sse_data("[DONE]")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a JSON body, or server-sent events when streaming",
        "content": {"text/event-stream": {}},
    }
}
"""OpenAPI: a route that answers JSON or, with ``stream``, server-sent events."""
