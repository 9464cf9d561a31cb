"""Adapter management routes: list, load (off the step loop) and unload."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from truffula.server.protocol import _Lenient
from truffula.server.state import invalid, state_of

router = APIRouter(tags=["Adapters"])


class AdapterRequest(_Lenient):
    adapter_id: str = Field(
        ..., description="local path under --adapter-root, or a hub id in the local HF cache"
    )
    adapter_source: str | None = Field(None, description="local | hub (unset: local, then hub)")


def _listing(request: Request) -> list[dict]:
    store = state_of(request).adapters
    out = []
    for key in store.loaded_ids():
        slot = store.slot_of.get(key)
        weights = store.host[key]
        out.append(
            {
                "id": key,
                "rank": weights.rank,
                "modules": len(weights.modules),
                "active": slot is not None,
                "slot": slot,
                "requests": store.users.get(key, 0),
            }
        )
    return out


@router.get("/adapters", summary="Adapters in host memory and which hold a device slot")
async def list_adapters(request: Request) -> JSONResponse:
    return JSONResponse({"adapters": _listing(request), **state_of(request).adapter_info()})


@router.post("/adapters/load", summary="Load an adapter into host memory ahead of its requests")
async def load_adapter(body: AdapterRequest, request: Request) -> JSONResponse:
    if not body.adapter_id:
        raise invalid("adapter_id", "`adapter_id` cannot be empty")
    key = await state_of(request).load_adapter(body.adapter_id, body.adapter_source)
    return JSONResponse({"loaded": key})


@router.post("/adapters/unload", summary="Drop an adapter that no request is using")
async def unload_adapter(body: AdapterRequest, request: Request) -> JSONResponse:
    state_of(request).adapters.unload(body.adapter_id)
    return JSONResponse({"unloaded": body.adapter_id})
