"""``POST /v1/chat/completions``: chat with ``logprobs`` + ``top_logprobs`` (``token``,
``logprob``, ``bytes``), in streams too. Special tokens are left out of the logprobs content."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from truffula.engine.async_engine import RequestStream
from truffula.engine.output import TokenInfo
from truffula.server.errors import invalid
from truffula.server.formats import Accumulator
from truffula.server.openai.common import (
    FINISH,
    Envelope,
    chat_ids,
    merge_streams,
    model_params,
    n_of,
    sampling_params,
    seeded,
    submit_all,
    token_string,
    usage,
)
from truffula.server.params import check_k
from truffula.server.protocol import GENERATION_ERRORS, ChatCompletionRequest, error_responses
from truffula.server.responses import JSON
from truffula.server.state import state_of
from truffula.server.streams import SSE_HEADERS, SSE_RESPONSE, collect, sse_events

router = APIRouter(tags=["OpenAI"], responses=error_responses(*GENERATION_ERRORS, openai=True))


def _chat_entry(t: TokenInfo) -> dict[str, Any]:
    return {
        "token": token_string(t.bytes),
        "logprob": t.logprob,
        "bytes": list(t.bytes),
        "top_logprobs": [
            {"token": token_string(a.bytes), "logprob": a.logprob, "bytes": list(a.bytes)}
            for a in (t.alternatives or [])
        ],
    }


def _chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {"content": [_chat_entry(t) for t in tokens if not t.special], "refusal": None}


@router.post(
    "/v1/chat/completions",
    summary="OpenAI chat completions (logprobs + top_logprobs)",
    responses=SSE_RESPONSE,
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = state_of(request)
    n = n_of(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true")
    k = -1
    if body.logprobs:
        k = (
            0
            if body.top_logprobs in (None, 0)
            else check_k("top_logprobs", body.top_logprobs, state.limits.max_k_alternatives)
        )
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    if max_tokens is not None and max_tokens <= 0:
        raise invalid("max_tokens", "`max_tokens` must be >= 1")
    params = await model_params(state, body, sampling_params(body, max_tokens, k))
    ids = await chat_ids(state, [{"role": m.role, "content": m.text()} for m in body.messages])
    jobs = await submit_all(state, [(j, ids, seeded(params, j)) for j in range(n)])
    env = Envelope(
        "chat.completion", body.model or state.settings.model_id, "chatcmpl", fingerprint=True
    )
    if body.stream:
        env.object = "chat.completion.chunk"
        return StreamingResponse(
            sse_events(_stream_chat(jobs, k, body, env), True),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    accs: list[Accumulator] = await asyncio.gather(*(collect(s, request) for _, _, s in jobs))
    choices = [
        {
            "index": j,
            "message": {"role": "assistant", "content": acc.text},
            "logprobs": _chat_logprobs(acc.tokens) if k >= 0 else None,
            "finish_reason": FINISH.get(acc.finish_reason or "length"),
        }
        for j, acc in enumerate(accs)
    ]
    generated = sum(a.num_generated_tokens for a in accs)
    return JSON(env.body(choices, usage=usage(accs[0].num_prompt_tokens, generated)))


async def _stream_chat(
    jobs: list[tuple[int, Any, RequestStream]],
    k: int,
    body: ChatCompletionRequest,
    env: Envelope,
) -> AsyncIterator[dict[str, Any]]:
    def chunk(
        index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return env.body([choice])

    for index, _, _ in jobs:
        yield chunk(index, {"role": "assistant", "content": "", "tool_calls": None})
    prompt_tokens, completion = 0, 0
    async for index, _, out in merge_streams(jobs):
        logprobs = _chat_logprobs(out.tokens) if k >= 0 else None
        if out.text or (logprobs and logprobs["content"]):
            yield chunk(
                index, {"role": "assistant", "content": out.text, "tool_calls": None}, logprobs
            )
        if out.finished:
            prompt_tokens = out.num_prompt_tokens
            completion += out.num_generated_tokens
            yield chunk(
                index,
                {"role": "assistant", "content": None, "tool_calls": None},
                None,
                FINISH.get(out.finish_reason or "length"),
            )
    if body.stream_options and body.stream_options.include_usage:
        yield env.body([], usage=usage(prompt_tokens, completion))
