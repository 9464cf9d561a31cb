"""Adapter management routes: list, load (off the step loop) and unload."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from truffula.adapters.merge import MAX_ADAPTER_ID_LENGTH
from truffula.server.errors import invalid
from truffula.server.protocol import _Lenient, error_responses
from truffula.server.responses import JSON
from truffula.server.state import state_of

router = APIRouter(tags=["Adapters"])


class AdapterRequest(_Lenient):
    adapter_id: str = Field(
        ...,
        min_length=1,
        max_length=MAX_ADAPTER_ID_LENGTH,
        description="local path under --adapter-root, or a hub id in the local HF cache",
    )
    adapter_source: str | None = Field(None, description="local | hub (unset: local, then hub)")


@router.get(
    "/adapters",
    summary="Adapters in host memory and which hold a device slot",
    responses=error_responses(401, 503),
)
async def list_adapters(request: Request) -> JSON:
    got = await state_of(request).adapters()
    return JSON({"adapters": got["adapters"], **got["info"]})


@router.post(
    "/adapters/load",
    summary="Load an adapter into host memory ahead of its requests",
    responses=error_responses(401, 403, 404, 413, 422, 503),
)
async def load_adapter(body: AdapterRequest, request: Request) -> JSON:
    if not body.adapter_id:
        raise invalid("adapter_id", "`adapter_id` cannot be empty")
    key = await state_of(request).load_adapter(body.adapter_id, body.adapter_source)
    return JSON({"loaded": key})


@router.post(
    "/adapters/unload",
    summary="Drop an adapter that no request is using",
    responses=error_responses(401, 404, 409, 413, 422, 503),
)
async def unload_adapter(body: AdapterRequest, request: Request) -> JSON:
    await state_of(request).engine.call("unload_adapter", body.adapter_id)
    return JSON({"unloaded": body.adapter_id})
