"""Request parameters of each dialect -> the engine's SamplingParams, with LoRAX's messages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from truffula.sampling.params import SamplingParams
from truffula.server.errors import invalid
from truffula.server.protocol import GenerateParameters
from truffula.server.state import ServerState
from truffula.structured.spec import only_one, response_format, tgi_grammar


@dataclass
class RouteOptions:
    """What a LoRAX/TGI route does with the engine's outputs."""

    return_full_text: bool
    include_details: bool
    stream_details: bool
    top_n: int
    best_of: int
    sampling: bool


def check_k(name: str, k: int | None, limit: int) -> int:
    if k is None:
        return 0
    if k <= 0:
        raise invalid(name, f"`{name}` must be strictly positive")
    if k > limit:
        raise invalid(
            name, f"`{name}` must be <= {limit} (the server's max_k_alternatives). Given: {k}"
        )
    return k


async def check_structured(state: ServerState, params: SamplingParams) -> None:
    """Compile (or find cached) the request's grammar in a worker thread, with a time limit: an
    invalid or slow one is a 422 naming its field before anything runs, and the event loop keeps
    answering meanwhile."""
    if params.structured is not None:
        await asyncio.to_thread(state.frontend.grammars.check_with_timeout, params.structured)


def _max_new_tokens(p: GenerateParameters) -> tuple[int | None, str]:
    """``max_new_tokens``, or its vLLM / OpenAI name ``max_tokens``; both only if they agree."""
    if p.max_tokens is None:
        return p.max_new_tokens, "max_new_tokens"
    if p.max_new_tokens is not None and p.max_new_tokens != p.max_tokens:
        raise invalid(
            "max_tokens", "`max_tokens` is another name of `max_new_tokens`: give one of them"
        )
    return p.max_tokens, "max_tokens"


def lorax_params(
    p: GenerateParameters | None, state: ServerState, stream: bool
) -> tuple[SamplingParams, RouteOptions]:
    p = p or GenerateParameters()
    limit = state.limits.max_k_alternatives
    if p.top_k is not None and p.top_k <= 0:
        raise invalid("top_k", "`top_k` must be strictly positive")
    structured = only_one(response_format(p.response_format), tgi_grammar(p.grammar))
    if p.adapter_id and p.merged_adapters is not None:
        raise invalid("adapter_id", "at most one of `adapter_id` or `adapters` may be provided")
    k_alt = check_k("return_k_alternatives", p.return_k_alternatives, limit)
    top_n = check_k("top_n_tokens", p.top_n_tokens, limit)
    prompt_k = check_k("prompt_k_alternatives", p.prompt_k_alternatives, limit)
    sampling = bool(p.do_sample) or (
        (p.temperature is not None and p.temperature not in (0.0, 1.0))
        or p.top_k is not None
        or (p.top_p is not None and p.top_p < 1.0)
        or (p.typical_p is not None and p.typical_p < 1.0)
        or (p.min_p is not None and p.min_p > 0)
    )
    if p.temperature == 0.0:
        sampling = False
    best_of = p.best_of if p.best_of is not None else 1
    if best_of != 1:
        if best_of <= 0 or best_of > state.settings.max_best_of:
            raise invalid(
                "best_of",
                f"`best_of` must be > 0 and <= {state.settings.max_best_of}. Given: {best_of}",
            )
        if stream:
            raise invalid("best_of", "`best_of` != 1 is not supported when streaming tokens")
        if not sampling:
            raise invalid("best_of", "you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise invalid("seed", "`seed` must not be set when `best_of` > 1")
    max_new, max_name = _max_new_tokens(p)
    decoder_input = bool(p.decoder_input_details) or prompt_k > 0
    if stream and decoder_input:
        raise invalid(
            "decoder_input_details",
            "`decoder_input_details` == true is not supported when streaming tokens",
        )
    seed = p.seed
    if sampling and seed is None:
        seed = state.random_seed()  # reported back so the request can be replayed
    k = max(k_alt, top_n)
    include_details = bool(p.details) or decoder_input or k > 0 or best_of > 1
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        min_p=p.min_p or 0.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        seed=seed if sampling else None,
        stop=(p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ()),
        ignore_eos=bool(p.ignore_eos_token or p.ignore_eos),
        truncate=p.truncate,
        details=include_details or stream,  # stream events always carry the token's logprob
        return_k_alternatives=k,
        logprobs_mode=p.logprobs_mode or "processed",  # type: ignore[arg-type]
        speculative=p.speculative is not False,
        decoder_input_details=decoder_input,
        prompt_k_alternatives=prompt_k,
        adapter_id=p.adapter_id or None,
        structured=structured,
    )
    if max_new is not None and max_new <= 0:
        raise invalid(max_name, f"`{max_name}` must be strictly positive")
    params.validate(state.limits)
    opts = RouteOptions(
        return_full_text=bool(p.return_full_text),
        include_details=include_details,
        stream_details=bool(p.details),
        top_n=top_n,
        best_of=best_of,
        sampling=sampling,
    )
    return params, opts
