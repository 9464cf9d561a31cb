"""LoRAX / TGI routes: ``POST /generate``, ``/generate_stream``, ``/`` and ``/invocations``.

Differences from LoRAX, all on purpose: alternatives come back whenever they are asked (also
with ``details: false``), every logprob is a finite number, tokens carry ``rank`` and
``entropy``, and malformed JSON gets the same ``{"error", "error_type"}`` body as other errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from truffula.sampling.params import SamplingParams
from truffula.server.formats import Accumulator, details_dict, prefill_dict, token_dict, top_tokens
from truffula.server.params import RouteOptions, check_structured, lorax_params
from truffula.server.protocol import (
    GENERATION_ERRORS,
    CompatGenerateRequest,
    GenerateRequest,
    error_responses,
)
from truffula.server.responses import JSON
from truffula.server.state import AdapterRef, ServerState, state_of
from truffula.server.streams import SSE_HEADERS, SSE_RESPONSE, collect, sse_events

router = APIRouter(tags=["LoRAX / TGI"], responses=error_responses(*GENERATION_ERRORS))


def response_dict(inputs: str, acc: Accumulator, opts: RouteOptions) -> dict[str, Any]:
    text = inputs + acc.text if opts.return_full_text else acc.text
    out: dict[str, Any] = {"generated_text": text}
    if opts.include_details:
        details = details_dict(acc, opts.sampling)
        if opts.top_n:
            details["top_tokens"] = [top_tokens(t) for t in acc.tokens]
        out["details"] = details
    return out


def _headers(state: ServerState, acc: Accumulator, params: SamplingParams) -> dict[str, str]:
    headers = {
        "x-model-id": state.settings.model_id,
        "x-prompt-tokens": str(acc.num_prompt_tokens),
        "x-generated-tokens": str(acc.num_generated_tokens),
        "x-total-tokens": str(acc.num_prompt_tokens + acc.num_generated_tokens),
    }
    if params.adapter_id:
        headers["x-adapter-id"] = params.adapter_id
    return headers


async def prompt_of(body: GenerateRequest, state: ServerState) -> str | list[int]:
    """``inputs`` as given, or through the chat template when ``apply_chat_template`` is set."""
    if not (body.parameters and body.parameters.apply_chat_template):
        return body.inputs
    from truffula.server.openai.common import chat_ids

    try:
        messages = json.loads(body.inputs)
    except (json.JSONDecodeError, RecursionError, ValueError):
        messages = None
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        messages = [{"role": "user", "content": body.inputs}]
    return await chat_ids(state, messages, "inputs")


async def run_generate(
    body: GenerateRequest, request: Request
) -> tuple[dict[str, Any], dict[str, str]]:
    state = state_of(request)
    params, opts = lorax_params(body.parameters, state, stream=False)
    await check_structured(state, params)
    params = await state.resolve_adapter(AdapterRef.of(body.parameters), params)
    if opts.best_of > 1:
        return await _best_of(body, request, params, opts), {"x-model-id": state.settings.model_id}
    acc = await collect(await state.start(await prompt_of(body, state), params), request)
    return response_dict(body.inputs, acc, opts), _headers(state, acc, params)


async def _best_of(
    body: GenerateRequest, request: Request, params: SamplingParams, opts: RouteOptions
) -> dict[str, Any]:
    """Sample ``best_of`` sequences (fresh seeds); answer the one with the highest total logprob."""
    state = state_of(request)
    variants = [
        params.with_updates(seed=state.random_seed(), details=True) for _ in range(opts.best_of)
    ]
    prompt = await prompt_of(body, state)
    streams = await state.start_all([(prompt, v) for v in variants])
    accs = await asyncio.gather(*(collect(s, request) for s in streams))
    order = sorted(range(len(accs)), key=lambda i: -sum(t.logprob or 0.0 for t in accs[i].tokens))
    best = accs[order[0]]
    out = response_dict(body.inputs, best, opts)
    out.setdefault("details", details_dict(best, True))["best_of_sequences"] = [
        {
            "generated_text": (body.inputs if opts.return_full_text else "") + accs[i].text,
            "finish_reason": accs[i].finish_reason,
            "generated_tokens": accs[i].num_generated_tokens,
            "seed": accs[i].seed,
            "prefill": [prefill_dict(t, j) for j, t in enumerate(accs[i].prompt_tokens or [])],
            "tokens": [token_dict(t) for t in accs[i].tokens],
        }
        for i in order[1:]
    ]
    return out


async def open_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """Validate and submit first (errors answer with a status), then stream token events."""
    state = state_of(request)
    params, opts = lorax_params(body.parameters, state, stream=True)
    await check_structured(state, params)
    params = await state.resolve_adapter(AdapterRef.of(body.parameters), params)
    stream = await state.start(await prompt_of(body, state), params)

    async def events() -> AsyncIterator[dict[str, Any]]:
        acc = Accumulator(keep_tokens=False)
        async with stream:
            async for out in stream:
                acc.add(out)
                for i, tok in enumerate(out.tokens):
                    ev: dict[str, Any] = {
                        "token": token_dict(tok),
                        "generated_text": None,
                        "details": None,
                    }
                    if opts.top_n:
                        ev["top_tokens"] = top_tokens(tok)
                    if out.finished and i == len(out.tokens) - 1:
                        ev["generated_text"] = (
                            body.inputs if opts.return_full_text else ""
                        ) + acc.text
                        if opts.stream_details:
                            ev["details"] = {
                                "finish_reason": acc.finish_reason,
                                "prompt_tokens": acc.num_prompt_tokens,
                                "generated_tokens": acc.num_generated_tokens,
                                "seed": acc.seed if opts.sampling else None,
                            }
                    yield ev

    headers = {**SSE_HEADERS, "x-model-id": state.settings.model_id}
    return StreamingResponse(sse_events(events()), media_type="text/event-stream", headers=headers)


@router.post("/generate", summary="Generate text (one response object)")
async def generate(body: GenerateRequest, request: Request) -> JSON:
    """LoRAX ``/generate``. With ``return_k_alternatives`` (or TGI's ``top_n_tokens``) every
    generated token carries its ``alternative_tokens``; ``decoder_input_details`` adds the prompt."""
    out, headers = await run_generate(body, request)
    return JSON(out, headers=headers)


@router.post(
    "/generate_stream",
    summary="Generate text as server-sent events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """One ``data:`` event per token ``{token, generated_text, details}``; the last event has the
    whole text. Alternatives come with every token event."""
    return await open_stream(body, request)


async def _compat(body: CompatGenerateRequest, request: Request) -> Any:
    if body.stream:
        return await open_stream(body, request)
    out, headers = await run_generate(body, request)
    return JSON([out], headers=headers)


@router.post(
    "/",
    summary="LoRAX client route: generate or stream; non-streaming answer is a list",
    responses=SSE_RESPONSE,
)
async def compat_generate(body: CompatGenerateRequest, request: Request) -> Any:
    """The route ``lorax-client`` and ``text-generation`` call: ``{inputs, parameters, stream}``."""
    return await _compat(body, request)


@router.post("/invocations", summary="SageMaker alias of POST /", responses=SSE_RESPONSE)
async def invocations(body: CompatGenerateRequest, request: Request) -> Any:
    return await _compat(body, request)
