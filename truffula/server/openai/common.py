"""What the OpenAI routes share: parameters, adapters from ``model``, the response envelope,
token strings, usage, and merging several request streams (``n``, several prompts)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from truffula.engine.async_engine import RequestStream
from truffula.engine.output import RequestOutput
from truffula.sampling.params import SamplingParams
from truffula.server.errors import HTTPError, invalid
from truffula.server.params import check_structured
from truffula.server.protocol import ChatCompletionRequest, CompletionRequest, first_surrogate
from truffula.server.state import AdapterRef, ServerState
from truffula.structured.spec import only_one, response_format, structured_outputs

MAX_N = 16
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "abort": "length"}


def token_string(raw: bytes) -> str:
    """The token as text; a partial UTF-8 piece is spelled ``bytes:\\xNN`` (its bytes are exact)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def sampling_params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, k: int
) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed,
        stop=tuple(stop),
        ignore_eos=bool(
            getattr(body, "ignore_eos", None) or getattr(body, "ignore_eos_token", None)
        ),
        details=k >= 0,
        return_k_alternatives=max(k, 0),
        logprobs_mode=body.logprobs_mode or "processed",  # type: ignore[arg-type]
        speculative=body.speculative is not False,
        structured=only_one(
            response_format(body.response_format), structured_outputs(body.structured_outputs)
        ),
    )


def n_of(body: CompletionRequest | ChatCompletionRequest) -> int:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"`n` must be between 1 and {MAX_N}. Given: {n}")
    return n


def seeded(params: SamplingParams, i: int) -> SamplingParams:
    return params if params.seed is None or i == 0 else params.with_updates(seed=params.seed + i)


async def model_params(state: ServerState, body: Any, params: SamplingParams) -> SamplingParams:
    """OpenAI's ``model`` names the base model or an adapter; a structured-output constraint is
    compiled (checked) here, before anything runs."""
    params = await state.resolve_adapter(AdapterRef(body.model, body.adapter_source), params)
    await check_structured(state, params)
    return params


async def submit_all(
    state: ServerState, items: list[tuple[int, Any, SamplingParams]]
) -> list[tuple[int, Any, RequestStream]]:
    """Submit (index, prompt, params) requests, all or none."""
    streams = await state.start_all([(prompt, params) for _, prompt, params in items])
    return [(i, prompt, s) for (i, prompt, _), s in zip(items, streams, strict=True)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def merge_streams(
    jobs: list[tuple[int, Any, RequestStream]],
) -> AsyncIterator[tuple[int, Any, RequestOutput]]:
    """Interleave several request streams as their outputs arrive."""
    queue: asyncio.Queue[tuple[int, Any, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, extra: Any, stream: RequestStream) -> None:
        try:
            async with stream:
                async for out in stream:
                    await queue.put((index, extra, out))
        except BaseException as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, x, s)) for i, x, s in jobs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for _, _, s in jobs:
            s.close()


async def chat_ids(
    state: ServerState, messages: list[dict[str, Any]], field: str = "messages"
) -> list[int]:
    """Token ids of a conversation formatted by the model's chat template (no extra BOS); long
    conversations are formatted and tokenized in a worker thread."""
    if first_surrogate(messages):
        raise invalid(field, f"`{field}` must be valid Unicode text (no lone surrogates)")
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return await state.off_loop(chars, _chat_ids, state, messages)


def _chat_ids(state: ServerState, messages: list[dict[str, Any]]) -> list[int]:
    tok = state.tokenizer
    if not tok.has_chat_template:
        raise HTTPError(
            422,
            "Failed applying chat template to inputs: the model has no chat template",
            "template_error",
        )
    try:
        text = tok.apply_chat_template(messages)
    except Exception as exc:  # jinja raises several types for bad conversations
        raise HTTPError(
            422, f"Failed applying chat template to inputs: {exc}", "template_error"
        ) from exc
    return tok.encode(text, add_special_tokens=False)


@dataclass
class Envelope:
    """The fields every OpenAI response object and stream chunk repeats."""

    object: str
    model: str
    prefix: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    fingerprint: bool = False

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.prefix}-{uuid.uuid4().hex}"

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
        }
        if self.fingerprint:
            out["system_fingerprint"] = "truffula"
        out["choices"] = choices
        out.update(extra)
        return out
