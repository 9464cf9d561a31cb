"""Engine records -> JSON-ready dicts in the LoRAX / TGI dialect (truffula's native format).

A token is ``{id, text, logprob, special, skipped, rank, entropy, alternative_tokens?}``;
``alternative_tokens`` is present only when alternatives were asked. Every logprob is a finite
float (the engine never reports -inf or NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from truffula.engine.output import Alternative, LazyAlternatives, RequestOutput, TokenInfo


def alternative_dict(alt: Alternative) -> dict[str, Any]:
    return {"id": alt.id, "text": alt.text, "logprob": alt.logprob}


def token_dict(t: TokenInfo, with_alternatives: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": t.id,
        "text": t.text,
        "logprob": t.logprob,
        "special": t.special,
        "skipped": False,
    }
    if t.rank is not None:
        out["rank"] = t.rank
        out["entropy"] = t.entropy
    alts = t.alternatives
    if with_alternatives and alts is not None:
        out["alternative_tokens"] = (
            alts.as_dicts()
            if isinstance(alts, LazyAlternatives)
            else [alternative_dict(a) for a in alts]
        )
    return out


def prefill_dict(t: TokenInfo, position: int) -> dict[str, Any]:
    """A prompt token; position 0 has no logprob (null), as in LoRAX and TGI."""
    out = token_dict(t)
    if position == 0:
        out["logprob"] = None
        out.pop("rank", None)
        out.pop("entropy", None)
    return out


@dataclass
class Accumulator:
    """Collects a request's streamed RequestOutputs into one response."""

    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_tokens: list[TokenInfo] | None = None
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    seed: int | None = None
    keep_tokens: bool = True
    """False for a stream, whose events carry the records: the whole text and the counts are
    kept, the records are not (a stream holds no growing list for the collector to walk)."""

    def add(self, out: RequestOutput) -> None:
        if self.keep_tokens:
            self.tokens += out.tokens
        self.text += out.text
        if out.prompt_tokens is not None:
            self.prompt_tokens = out.prompt_tokens
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_generated_tokens = out.num_generated_tokens or self.num_generated_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            if out.generated_text is not None:
                self.text = out.generated_text
        self.seed = out.seed


def details_dict(acc: Accumulator, sampled_seed: bool) -> dict[str, Any]:
    """LoRAX ``details``: finish reason, counts, seed, prefill and tokens."""
    return {
        "finish_reason": acc.finish_reason or "length",
        "prompt_tokens": acc.num_prompt_tokens,
        "generated_tokens": acc.num_generated_tokens,
        "skipped_tokens": 0,
        "seed": acc.seed if sampled_seed else None,
        "prefill": [prefill_dict(t, i) for i, t in enumerate(acc.prompt_tokens or [])],
        "tokens": [token_dict(t) for t in acc.tokens],
    }


def top_tokens(t: TokenInfo) -> list[dict[str, Any]]:
    """TGI ``top_tokens`` entry of one generated position."""
    return [
        {"id": a.id, "text": a.text, "logprob": a.logprob, "special": a.special}
        for a in (t.alternatives or [])
    ]
