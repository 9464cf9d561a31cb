"""OpenAI-compatible routes: ``/v1/completions`` (completions.py), ``/v1/chat/completions``
(chat.py), ``/v1/models`` (models.py). ``model`` selects the base model or an adapter id; a stop
sequence finishes with "stop"."""

from __future__ import annotations

from fastapi import APIRouter

from truffula.server.openai import chat, completions, models

router = APIRouter()
for part in (completions, chat, models):
    router.include_router(part.router)
