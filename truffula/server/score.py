"""``POST /score``: the logprob of given continuations after a prompt, without generating.

Each continuation is tokenized on its own (no special tokens) and appended to the prompt's ids;
one request per continuation runs with ``decoder_input_details`` and ``max_new_tokens=1``
(greedy), and the continuation's positions are read from the returned prompt tokens. The one
generated token is discarded. This is lm-eval-harness's loglikelihood: ``is_greedy`` is true when
every continuation token was the model's most likely token (rank 1).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from truffula.engine.output import TokenInfo
from truffula.sampling.params import SamplingParams
from truffula.server.errors import invalid
from truffula.server.formats import alternative_dict
from truffula.server.params import check_k
from truffula.server.protocol import GENERATION_ERRORS, ScoreRequest, error_responses
from truffula.server.responses import JSON
from truffula.server.state import AdapterRef, state_of
from truffula.server.streams import collect

router = APIRouter(tags=["Scoring"], responses=error_responses(*GENERATION_ERRORS))


def _token(t: TokenInfo, with_alternatives: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": t.id, "text": t.text, "logprob": t.logprob, "rank": t.rank}
    if with_alternatives:
        out["alternative_tokens"] = [alternative_dict(a) for a in t.alternatives or []]
    return out


def _result(continuation: str, tokens: list[TokenInfo], k: int) -> dict[str, Any]:
    total = sum(t.logprob or 0.0 for t in tokens)
    return {
        "continuation": continuation,
        "tokens": [_token(t, k > 0) for t in tokens],
        "total_logprob": total,
        "mean_logprob": total / len(tokens),
        "num_tokens": len(tokens),
        "is_greedy": all(t.rank == 1 for t in tokens),
    }


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The prompt with special tokens, each continuation without them."""
    return [tokenizer.encode(texts[0])] + [
        tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts[1:]
    ]


@router.post("/score", summary="Score continuations of a prompt (per-token and total logprob)")
async def score(body: ScoreRequest, request: Request) -> JSON:
    """For each continuation: its tokens with logprob and rank (and the ``k`` most likely
    alternatives when asked), ``total_logprob``, ``mean_logprob``, ``num_tokens`` and
    ``is_greedy``, under the base model or ``adapter_id``. Nothing is generated."""
    state = state_of(request)
    tokenizer = state.tokenizer
    if not body.prompt:
        raise invalid("prompt", "`prompt` cannot be empty")
    k = check_k("k", body.k, state.limits.max_k_alternatives)
    texts = [body.prompt, *body.continuations]
    encoded = await state.off_loop(sum(map(len, texts)), _encode_all, tokenizer, texts)
    prompt_ids = encoded[0]
    if not prompt_ids:
        raise invalid("prompt", "`prompt` has no tokens")
    sequences = []
    for i, ids in enumerate(encoded[1:]):
        if not ids:
            raise invalid("continuations", f"`continuations[{i}]` cannot be empty")
        if len(prompt_ids) + len(ids) >= state.frontend.max_len:
            raise invalid(
                "continuations",
                f"`prompt` + `continuations[{i}]` must have less than {state.frontend.max_len} tokens "
                f"(the model's maximum length). Given: {len(prompt_ids) + len(ids)}",
            )
        sequences.append(prompt_ids + ids)
    params = SamplingParams(
        max_new_tokens=1,
        temperature=0.0,
        decoder_input_details=True,
        prompt_k_alternatives=k,
        logprobs_mode="raw",
    )
    params = await state.resolve_adapter(AdapterRef(body.adapter_id, body.adapter_source), params)
    streams = await state.start_all([(ids, params) for ids in sequences])
    accs = await asyncio.gather(*(collect(s, request) for s in streams))
    n = len(prompt_ids)
    results = [
        _result(text, (acc.prompt_tokens or [])[n:], k)
        for text, acc in zip(body.continuations, accs, strict=True)
    ]
    headers = {"x-model-id": state.settings.model_id}
    if params.adapter_id:
        headers["x-adapter-id"] = params.adapter_id
    return JSON({"prompt_tokens": n, "results": results}, headers=headers)
