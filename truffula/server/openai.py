"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Token probabilities: completions ``logprobs: k`` (with ``echo``, the prompt tokens too, the first
one null; ``echo`` + ``max_tokens: 0`` scores a prompt without generating, as lm-eval does) and
chat ``logprobs`` + ``top_logprobs`` with ``token``, ``logprob`` and ``bytes``, in streams too.
``model`` selects the base model or an adapter id. A stop sequence finishes with "stop".
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from truffula.engine.async_engine import RequestStream
from truffula.engine.output import RequestOutput, TokenInfo
from truffula.sampling.params import SamplingParams
from truffula.server.formats import Accumulator
from truffula.server.params import check_k
from truffula.server.protocol import ChatCompletionRequest, CompletionRequest
from truffula.server.responses import JSON
from truffula.server.state import (
    SSE_HEADERS,
    AdapterRef,
    HTTPError,
    ServerState,
    collect,
    invalid,
    sse_events,
    state_of,
)

router = APIRouter(tags=["OpenAI"])
MAX_N = 16
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "abort": "length"}


def token_string(raw: bytes) -> str:
    """The token as text; a partial UTF-8 piece is spelled ``bytes:\\xNN`` (its bytes are exact)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _common_params(
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
    )


def _n(body: CompletionRequest | ChatCompletionRequest) -> int:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"`n` must be between 1 and {MAX_N}. Given: {n}")
    return n


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    return params if params.seed is None or i == 0 else params.with_updates(seed=params.seed + i)


async def _model_params(state: ServerState, body: Any, params: SamplingParams) -> SamplingParams:
    """OpenAI's ``model`` names the base model or an adapter."""
    return await state.resolve_adapter(AdapterRef(body.model, body.adapter_source), params)


async def _submit_all(
    state: ServerState, items: list[tuple[int, Any, SamplingParams]]
) -> list[tuple[int, Any, RequestStream]]:
    """Submit (index, prompt, params) requests, all or none."""
    streams = await state.start_all([(prompt, params) for _, prompt, params in items])
    return [(i, prompt, s) for (i, prompt, _), s in zip(items, streams, strict=True)]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ------------------------------------------------------------------------------ completions
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
            top = None
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


@router.post("/v1/completions", summary="OpenAI completions (logprobs, echo, streaming)")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = state_of(request)
    if body.suffix:
        raise invalid("suffix", "`suffix` is not supported")
    prompts = _completion_prompts(body)
    n = _n(body)
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
    params = _common_params(body, 1 if score_only else max_tokens, k)
    if body.echo and k >= 0:
        params = params.with_updates(decoder_input_details=True, prompt_k_alternatives=max(k, 0))
    params = await _model_params(state, body, params)
    jobs = await _submit_all(
        state,
        [
            (pi * n + j, prompt, _seeded(params, j))
            for pi, prompt in enumerate(prompts)
            for j in range(n)
        ],
    )
    cid, created, model = (
        f"cmpl-{uuid.uuid4().hex}",
        int(time.time()),
        body.model or state.settings.model_id,
    )
    if body.stream:
        return StreamingResponse(
            sse_events(
                _stream_completions(state, jobs, k, body, score_only, cid, created, model), True
            ),
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
    return JSON(
        {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }
    )


async def _merge(
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


async def _stream_completions(
    state: ServerState,
    jobs: list[tuple[int, Any, RequestStream]],
    k: int,
    body: CompletionRequest,
    score_only: bool,
    cid: str,
    created: int,
    model: str,
) -> AsyncIterator[dict[str, Any]]:
    lps = {index: _CompletionLogprobs(max(k, 0)) for index, _, _ in jobs}
    usage = {"prompt": {}, "completion": 0}
    async for index, prompt, out in _merge(jobs):
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
            usage["prompt"][index // _n(body)] = out.num_prompt_tokens  # type: ignore[index]
            usage["completion"] += 0 if score_only else out.num_generated_tokens  # type: ignore[operator]
        if text or logprobs or finish:
            yield {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
                ],
            }
    if body.stream_options and body.stream_options.include_usage:
        yield {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(sum(usage["prompt"].values()), usage["completion"]),  # type: ignore[union-attr, arg-type]
        }


# ------------------------------------------------------------------------------ chat
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


def chat_ids(state: ServerState, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation formatted by the model's chat template (no extra BOS)."""
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


@router.post("/v1/chat/completions", summary="OpenAI chat completions (logprobs + top_logprobs)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = state_of(request)
    n = _n(body)
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
    params = await _model_params(state, body, _common_params(body, max_tokens, k))
    ids = chat_ids(state, [{"role": m.role, "content": m.text()} for m in body.messages])
    jobs = await _submit_all(state, [(j, ids, _seeded(params, j)) for j in range(n)])
    cid, created, model = (
        f"chatcmpl-{uuid.uuid4().hex}",
        int(time.time()),
        body.model or state.settings.model_id,
    )
    if body.stream:
        return StreamingResponse(
            sse_events(_stream_chat(jobs, k, body, cid, created, model), True),
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
    return JSON(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "truffula",
            "choices": choices,
            "usage": _usage(accs[0].num_prompt_tokens, sum(a.num_generated_tokens for a in accs)),
        }
    )


async def _stream_chat(
    jobs: list[tuple[int, Any, RequestStream]],
    k: int,
    body: ChatCompletionRequest,
    cid: str,
    created: int,
    model: str,
) -> AsyncIterator[dict[str, Any]]:
    def chunk(
        index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "truffula",
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }

    for index, _, _ in jobs:
        yield chunk(index, {"role": "assistant", "content": "", "tool_calls": None})
    prompt_tokens, completion = 0, 0
    async for index, _, out in _merge(jobs):
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
        yield {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "truffula",
            "choices": [],
            "usage": _usage(prompt_tokens, completion),
        }


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
