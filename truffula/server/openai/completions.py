"""``POST /v1/completions``: text completions with legacy ``logprobs: k`` (tokens,
token_logprobs, top_logprobs, text_offset); with ``echo`` the prompt tokens too (the first one
null); ``echo`` + ``max_tokens: 0`` scores a prompt without generating, as lm-eval does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from truffula.engine.async_engine import RequestStream
from truffula.engine.output import TokenInfo
from truffula.server.errors import invalid
from truffula.server.openai.common import (
    FINISH,
    Envelope,
    merge_streams,
    model_params,
    n_of,
    sampling_params,
    seeded,
    submit_all,
    token_string,
    usage,
)
from truffula.server.protocol import (
    GENERATION_ERRORS,
    MAX_SUBREQUESTS,
    CompletionRequest,
    error_responses,
)
from truffula.server.responses import JSON
from truffula.server.state import ServerState, state_of
from truffula.server.streams import SSE_HEADERS, SSE_RESPONSE, collect, sse_events

router = APIRouter(tags=["OpenAI"], responses=error_responses(*GENERATION_ERRORS, openai=True))


class _CompletionLogprobs:
    """Legacy completions ``logprobs`` block: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.offset = 0
        self.block: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }

    def add(self, tokens: list[TokenInfo], first_is_null: bool = False) -> dict[str, list[Any]]:
        part: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for i, t in enumerate(tokens):
            null = first_is_null and i == 0
            top: dict[str, float] | None = None
            if not null and self.k > 0:
                top = {}
                for a in t.alternatives or []:
                    key = token_string(a.bytes)
                    top[key] = max(a.logprob, top.get(key, -1e30))
            part["tokens"].append(token_string(t.bytes) if t.bytes else t.text)
            part["token_logprobs"].append(None if null else t.logprob)
            part["top_logprobs"].append(top)
            part["text_offset"].append(self.offset)
            self.offset += len(t.text)
        for key, values in part.items():
            self.block[key] += values
        return part


def _completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if not prompts or any(len(x) == 0 for x in prompts):
        raise invalid("prompt", "`prompt` cannot be empty")
    return prompts


@router.post(
    "/v1/completions",
    summary="OpenAI completions (logprobs, echo, streaming)",
    responses=SSE_RESPONSE,
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = state_of(request)
    if body.suffix:
        raise invalid("suffix", "`suffix` is not supported")
    if body.best_of not in (None, 1):
        raise invalid(
            "best_of",
            f"`best_of` must be 1 (or null); use `n` for more choices. Given: {body.best_of}",
        )
    prompts = _completion_prompts(body)
    n = n_of(body)
    if len(prompts) * n > MAX_SUBREQUESTS:
        raise invalid(
            "prompt",
            f"at most {MAX_SUBREQUESTS} completions per request (prompts x `n`). "
            f"Given: {len(prompts)} x {n}",
        )
    k = -1 if body.logprobs is None else body.logprobs
    if k > state.limits.max_k_alternatives:
        raise invalid(
            "logprobs", f"`logprobs` must be <= {state.limits.max_k_alternatives}. Given: {k}"
        )
    if k < -1:
        raise invalid("logprobs", "`logprobs` must be >= 0")
    max_tokens = body.max_tokens
    score_only = max_tokens == 0
    if score_only and not body.echo:
        raise invalid("max_tokens", "`max_tokens` must be >= 1 (0 is allowed only with `echo`)")
    if max_tokens is not None and max_tokens < 0:
        raise invalid("max_tokens", "`max_tokens` must be >= 0")
    params = sampling_params(body, 1 if score_only else max_tokens, k)
    if body.echo and k >= 0:
        params = params.with_updates(decoder_input_details=True, prompt_k_alternatives=max(k, 0))
    params = await model_params(state, body, params)
    jobs = await submit_all(
        state,
        [
            (pi * n + j, prompt, seeded(params, j))
            for pi, prompt in enumerate(prompts)
            for j in range(n)
        ],
    )
    env = Envelope("text_completion", body.model or state.settings.model_id, "cmpl")
    if body.stream:
        return StreamingResponse(
            sse_events(_stream_completions(state, jobs, k, body, score_only, env), True),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    accs = await asyncio.gather(*(collect(s, request) for _, _, s in jobs))
    choices = []
    for (index, prompt, _), acc in zip(jobs, accs, strict=True):
        prompt_text = prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt, False)
        lp = _CompletionLogprobs(max(k, 0)) if k >= 0 else None
        text = "" if score_only else acc.text
        if body.echo:
            if lp is not None and acc.prompt_tokens:
                lp.add(acc.prompt_tokens, first_is_null=True)
            text = prompt_text + text
        if lp is not None and not score_only:
            lp.add(acc.tokens)
        choices.append(
            {
                "index": index,
                "text": text,
                "logprobs": lp.block if lp else None,
                "finish_reason": "length"
                if score_only
                else FINISH.get(acc.finish_reason or "length"),
            }
        )
    prompt_tokens = sum(accs[i * n].num_prompt_tokens for i in range(len(prompts)))
    completion_tokens = 0 if score_only else sum(a.num_generated_tokens for a in accs)
    return JSON(env.body(choices, usage=usage(prompt_tokens, completion_tokens)))


async def _stream_completions(
    state: ServerState,
    jobs: list[tuple[int, Any, RequestStream]],
    k: int,
    body: CompletionRequest,
    score_only: bool,
    env: Envelope,
) -> AsyncIterator[dict[str, Any]]:
    lps = {index: _CompletionLogprobs(max(k, 0)) for index, _, _ in jobs}
    prompt_counts: dict[int, int] = {}
    completion_count = 0
    async for index, prompt, out in merge_streams(jobs):
        text, logprobs = "", None
        if out.prompt_tokens is not None and body.echo:
            text = prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt, False)
            if k >= 0:
                logprobs = lps[index].add(out.prompt_tokens, first_is_null=True)
        if not score_only:
            text += out.text
            if k >= 0:
                part = lps[index].add(out.tokens)
                logprobs = (
                    part if logprobs is None else {key: logprobs[key] + part[key] for key in part}
                )
        finish = None
        if out.finished:
            finish = "length" if score_only else FINISH.get(out.finish_reason or "length")
            prompt_counts[index // n_of(body)] = out.num_prompt_tokens
            completion_count += 0 if score_only else out.num_generated_tokens
        if text or logprobs or finish:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            yield env.body([choice])
    if body.stream_options and body.stream_options.include_usage:
        yield env.body([], usage=usage(sum(prompt_counts.values()), completion_count))
