"""One typed view of a generation, whatever API format it came in.

Parsers (``truffula.analysis.parse``) turn truffula/LoRAX, TGI and OpenAI responses into a
``Response``: the generated text and, per generated position, the chosen token with its logprob,
its rank and the entropy of the distribution when the server sent them, and the top-k
alternatives (most likely first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TokenKey = int | str


@dataclass(frozen=True)
class Alternative:
    """One of the k most likely tokens at a position."""

    id: int | None
    """Token id; None where the format has none (OpenAI)."""
    text: str
    logprob: float
    """Natural log of the probability; ``-inf`` for a token the server masked (JSON null)."""
    special: bool = False

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


@dataclass
class Position:
    """One generated token and what the server said about the distribution it came from."""

    index: int
    id: int | None
    text: str
    logprob: float | None
    """None when the server sent none (e.g. a null logprob)."""
    special: bool = False
    rank: int | None = None
    """1 = most likely; only when the server sent it (truffula extension)."""
    entropy: float | None = None
    """Exact entropy in nats of the distribution the token was drawn from (truffula extension)."""
    alternatives: list[Alternative] = field(default_factory=list)
    """The top-k tokens, sorted by logprob descending; empty when none were reported."""

    @property
    def prob(self) -> float | None:
        return None if self.logprob is None else math.exp(self.logprob)


@dataclass
class Response:
    """A generated sequence with per-token probability data."""

    text: str
    positions: list[Position]
    format: str
    """``truffula`` (LoRAX dialect), ``tgi``, ``openai-chat`` or ``openai-completions``."""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    vocab_size: int | None = None
    """Vocabulary size when known; it makes the entropy upper bound finite."""
    label: str | None = None
    """Free-form name for display, e.g. the adapter id."""

    @property
    def has_ids(self) -> bool:
        return all(p.id is not None for p in self.positions)


def token_key(token_id: int | None, text: str, by_id: bool) -> TokenKey:
    """The identity of a token: its id when both sides of a comparison have ids, else its text."""
    if by_id and token_id is not None:
        return token_id
    return text


def show(text: str) -> str:
    """A token's text made visible: quoted, with backslashes, newlines and tabs escaped."""
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") + "'"
