"""Plain data the runner returns to the engine each step (Python numbers and lists only)."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Probabilities around one token position: the token, its logprob and rank, the entropy of
    the distribution and the top-k (ids and logprobs, most likely first). A msgspec struct: the
    engine process sends it to the API process as it is. It holds numbers only, so it can take
    no part in a reference cycle and the garbage collector does not track it (``gc=False``)."""

    token_id: int
    logprob: float
    rank: int
    entropy: float
    top_ids: list[int] = msgspec.field(default_factory=list)
    top_logprobs: list[float] = msgspec.field(default_factory=list)


@dataclass
class SeqOutput:
    request_id: str
    sampled: int | None
    """The next token, when this step ended the sequence's known tokens."""
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """Prompt positions ``prompt_logprobs_start, prompt_logprobs_start + 1, ...``."""
    prompt_logprobs_start: int = 0
    accepted: list[int] = field(default_factory=list)
    """Tokens after ``sampled`` from the same step: drafted tokens the step's samples confirmed,
    then the sample after the last of them (speculative decoding)."""
    accepted_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    """Parallel to ``accepted``: each token's statistics at its own position."""


@dataclass
class RunnerOutput:
    seqs: list[SeqOutput]
