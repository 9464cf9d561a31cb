"""Per-token and per-sequence statistics of a ``Response``.

- probability p = exp(logprob);
- entropy: the server's exact value when sent, else bounds from the top-k (``entropy.py``);
- margin = logprob(chosen) - max logprob of the *other* reported alternatives, i.e. the log of
  the odds between the chosen token and its best rival: > 0 when the chosen token was the most
  likely, < 0 when a less likely token was sampled, None when no rival is known;
- ambiguous: |margin| < ``ambiguity_margin`` (default 0.5 nats: the rival is more than ~61% as
  likely as the chosen token, or more likely but by less than that factor);
- low-confidence spans: maximal runs of tokens with p < ``low_prob``, runs separated by at most
  ``max_gap`` confident tokens merged into one span;
- mean logprob over the N tokens with a logprob, and perplexity = exp(-mean logprob).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from truffula.analysis.entropy import EntropyEstimate, entropy_bounds
from truffula.analysis.types import Position, Response, TokenKey, token_key

DEFAULT_AMBIGUITY_MARGIN = 0.5
DEFAULT_LOW_PROB = 0.5


def known_logprobs(pos: Position, by_id: bool = True) -> dict[TokenKey, float]:
    """Token key -> logprob for every token whose probability the response states."""
    out = {token_key(a.id, a.text, by_id): a.logprob for a in pos.alternatives}
    if pos.logprob is not None:
        out.setdefault(token_key(pos.id, pos.text, by_id), pos.logprob)
    return out


def position_entropy(pos: Position, vocab_size: int | None = None) -> EntropyEstimate | None:
    """Exact entropy when the server sent it; else bounds from the alternatives; else None."""
    if pos.entropy is not None:
        return EntropyEstimate(pos.entropy, pos.entropy, "server")
    known = known_logprobs(pos, by_id=pos.id is not None)
    if not known:
        return None
    cap = pos.alternatives[-1].logprob if pos.alternatives else None
    return entropy_bounds(list(known.values()), cap, vocab_size)


def margin(pos: Position) -> float | None:
    """logprob(chosen) - best logprob among the other alternatives; None if none is known."""
    if pos.logprob is None:
        return None
    by_id = pos.id is not None
    me = token_key(pos.id, pos.text, by_id)
    others = [a.logprob for a in pos.alternatives if token_key(a.id, a.text, by_id) != me]
    if not others:
        return None
    return pos.logprob - max(others)


def rank(pos: Position) -> int | None:
    """The server's rank, else 1 + the number of alternatives strictly more likely than the chosen
    token when it appears among them; None when it cannot be known."""
    if pos.rank is not None:
        return pos.rank
    if pos.logprob is None:
        return None
    by_id = pos.id is not None
    me = token_key(pos.id, pos.text, by_id)
    if all(token_key(a.id, a.text, by_id) != me for a in pos.alternatives):
        return None
    return 1 + sum(a.logprob > pos.logprob for a in pos.alternatives)


@dataclass
class TokenStats:
    """What the analysis says about one generated position."""

    position: Position
    prob: float | None
    rank: int | None
    entropy: EntropyEstimate | None
    margin: float | None
    ambiguous: bool
    low_confidence: bool

    @property
    def index(self) -> int:
        return self.position.index

    @property
    def text(self) -> str:
        return self.position.text


@dataclass
class Span:
    """Tokens ``start .. end - 1`` (a run of low-confidence tokens, possibly merged)."""

    start: int
    end: int
    text: str
    min_prob: float
    mean_logprob: float


@dataclass
class Analysis:
    response: Response
    tokens: list[TokenStats]
    spans: list[Span]
    sum_logprob: float | None
    mean_logprob: float | None
    perplexity: float | None
    scored_tokens: int
    ambiguity_margin: float
    low_prob: float
    notes: list[str] = field(default_factory=list)

    def most_ambiguous(self, n: int = 10) -> list[TokenStats]:
        """The n positions with the smallest |margin| (positions without a margin excluded)."""
        with_margin = [t for t in self.tokens if t.margin is not None]
        return sorted(with_margin, key=lambda t: (abs(t.margin or 0.0), t.index))[:n]


def sequence_scores(logprobs: list[float]) -> tuple[float | None, float | None, float | None]:
    """(sum, mean, perplexity) of a list of token logprobs; Nones for an empty list."""
    if not logprobs:
        return None, None, None
    total = math.fsum(logprobs)
    mean = total / len(logprobs)
    return total, mean, math.exp(-mean)


def low_confidence_spans(tokens: list[TokenStats], low_prob: float, max_gap: int = 0) -> list[Span]:
    """Runs of tokens with p < low_prob; runs at most ``max_gap`` tokens apart are merged."""
    runs: list[list[int]] = []
    for i, t in enumerate(tokens):
        if not t.low_confidence:
            continue
        if runs and i - runs[-1][1] - 1 <= max_gap:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    spans = []
    for a, b in runs:
        part = tokens[a : b + 1]
        lps = [t.position.logprob for t in part if t.position.logprob is not None]
        spans.append(
            Span(
                start=part[0].index,
                end=part[-1].index + 1,
                text="".join(t.text for t in part),
                min_prob=min(t.prob for t in part if t.prob is not None),
                mean_logprob=math.fsum(lps) / len(lps),
            )
        )
    return spans


def analyze(
    response: Response,
    ambiguity_margin: float = DEFAULT_AMBIGUITY_MARGIN,
    low_prob: float = DEFAULT_LOW_PROB,
    max_gap: int = 0,
    vocab_size: int | None = None,
) -> Analysis:
    """Compute every per-token and per-sequence statistic of ``response``."""
    vocab = vocab_size or response.vocab_size
    stats = []
    for pos in response.positions:
        p = pos.prob
        m = margin(pos)
        stats.append(
            TokenStats(
                position=pos,
                prob=p,
                rank=rank(pos),
                entropy=position_entropy(pos, vocab),
                margin=m,
                ambiguous=m is not None and abs(m) < ambiguity_margin,
                low_confidence=p is not None and p < low_prob,
            )
        )
    lps = [p.logprob for p in response.positions if p.logprob is not None]
    total, mean, ppl = sequence_scores(lps)
    notes = []
    if any(t.entropy is not None and not t.entropy.exact for t in stats):
        notes.append(
            "entropy not sent by the server: shown as bounds derived from the top-k alternatives"
        )
    if len(lps) < len(response.positions):
        notes.append(f"{len(response.positions) - len(lps)} token(s) without a logprob skipped")
    return Analysis(
        response=response,
        tokens=stats,
        spans=low_confidence_spans(stats, low_prob, max_gap),
        sum_logprob=total,
        mean_logprob=mean,
        perplexity=ppl,
        scored_tokens=len(lps),
        ambiguity_margin=ambiguity_margin,
        low_prob=low_prob,
        notes=notes,
    )
