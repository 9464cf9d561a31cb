"""What every route shares: the engine client, the server settings (``settings.py``) and
metrics, preparing and submitting requests, and adapters (``AdapterRef``)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from truffula.config import LimitsConfig
from truffula.engine.async_engine import AsyncEngine, RequestStream
from truffula.engine.frontend import Frontend
from truffula.engine.messages import EngineRequest
from truffula.engine.tokenizer import Tokenizer
from truffula.errors import AdapterError
from truffula.sampling.params import SamplingParams
from truffula.server.metrics import Metrics
from truffula.server.observe import track
from truffula.server.settings import ServerSettings

LONG_PROMPT_CHARS = 256
"""Texts longer than this are tokenized (and chat templates applied) in a worker thread. The
fast tokenizer lets go of the GIL while it encodes, so the event loop goes on serving streams
meanwhile: 64 prompts of 512 tokens arriving together held an API process's loop for 40-90 ms
when tokenized on it. Below this size the hop to a thread costs more than the encoding."""
T = TypeVar("T")


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

    async def off_loop(self, chars: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (tokenizing, a chat template): in a worker thread when it works on
        more than ``LONG_PROMPT_CHARS`` characters, so the event loop keeps answering."""
        if chars > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def prepare(self, prompt: str | list[int], params: SamplingParams) -> EngineRequest:
        """Validate and tokenize; long texts are tokenized in a worker thread, so the event
        loop keeps answering other requests."""
        chars = len(prompt) if isinstance(prompt, str) else 0
        return await self.off_loop(chars, self.engine.prepare, prompt, params)

    async def start(self, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Prepare and submit one request (its HTTP request's log line and trace name it)."""
        stream = self.engine.submit(await self.prepare(prompt, params))
        track(stream)
        return stream

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
        return await self.engine.call("adapters")

    async def loaded_adapter_ids(self) -> list[str]:
        return [a["id"] for a in (await self.adapters())["adapters"]]

    async def load_adapter(self, adapter_id: str, source: str | None) -> str:
        """Read an adapter into host memory; the engine does it beside its step loop."""
        source = source or self.settings.default_adapter_source
        return await self.engine.call("load_adapter", adapter_id, source)

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

            max_ids = self.engine.config.lora.max_merged_adapters
            MergeSpec.parse(**ref.merged, max_ids=max_ids)  # checked here, merged in the engine
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
    return request.app.state.truffula
