"""``GET /v1/models``: the base model and the loaded adapters (each usable as ``model``)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from truffula.server.protocol import error_responses
from truffula.server.responses import JSON
from truffula.server.state import state_of

router = APIRouter(tags=["OpenAI"], responses=error_responses(401, 503, openai=True))


@router.get("/v1/models", summary="The base model and the loaded adapters")
async def models(request: Request) -> JSON:
    state = state_of(request)
    created = int(state.settings.started)
    data = [
        {
            "id": state.settings.model_id,
            "object": "model",
            "created": created,
            "owned_by": "truffula",
        }
    ]
    for adapter_id in await state.loaded_adapter_ids():
        data.append(
            {
                "id": adapter_id,
                "object": "model",
                "created": created,
                "owned_by": "truffula",
                "parent": state.settings.model_id,
            }
        )
    return JSON({"object": "list", "data": data})
