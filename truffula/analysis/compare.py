"""Compare two responses to the same prompt (two adapters, or an adapter and the base model).

Alignment is by position: generated token i of ``a`` against token i of ``b``. The contexts are
identical up to and including the first position where the chosen tokens part
(``first_divergence``); after it the two models condition on different text, so later
divergences are reported but flagged ``same_prefix=False``.

Divergence at one position. Each side reports the probabilities of a set of tokens (its top-k
and its chosen token): K_a and K_b. Let S = K_a ∩ K_b be the shared tokens. Both distributions
are coarse-grained onto the same partition of the vocabulary: one bucket per shared token s, and
one bucket ``other`` holding every remaining token::

    P(s) = exp(logprob(s)),  P(other) = 1 - sum_{s in S} P(s)   (clipped at 0; < 1e-6 -> 0)

Both P_a and P_b are then known exactly on every bucket, and

    TV      = 1/2 * sum_buckets |P_a - P_b|
    KL(a|b) = sum_buckets P_a log(P_a / P_b)   (0 where P_a = 0; inf where P_b = 0 < P_a)

By the data-processing inequality, coarse-graining never increases TV or KL, so these values are
lower bounds on the divergences of the full reported distributions; with S = the whole vocabulary
they are exact. A token in only one top-k is lumped into ``other`` because its probability under
the other side is unknown (only bounded by that side's smallest top-k probability).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from truffula.analysis.entropy import TAIL_TOLERANCE
from truffula.analysis.metrics import known_logprobs
from truffula.analysis.types import Position, Response, token_key


@dataclass
class Divergence:
    tv: float
    kl_ab: float
    kl_ba: float
    shared: int
    """Number of shared tokens |S| (the partition has |S| + 1 buckets)."""


@dataclass
class AlignedPosition:
    index: int
    a: Position | None
    b: Position | None
    same_token: bool
    same_prefix: bool
    """Both sides generated this position from the same text (index <= first divergence)."""
    divergence: Divergence | None
    a_token_in_b: float | None
    """Logprob that b gave to a's chosen token, when b reported it."""
    b_token_in_a: float | None


@dataclass
class Comparison:
    a: Response
    b: Response
    positions: list[AlignedPosition]
    first_divergence: int | None
    """First index where the chosen tokens differ (or one sequence has ended); None if equal."""
    mean_tv: float | None
    """Mean TV over the positions generated from the same prefix."""
    max_tv_index: int | None


def _kl(p: list[float], q: list[float]) -> float:
    total = 0.0
    for x, y in zip(p, q, strict=True):
        if x <= 0.0:
            continue
        if y <= 0.0:
            return math.inf
        total += x * math.log(x / y)
    return max(total, 0.0)


def divergence(a: Position, b: Position, by_id: bool = True) -> Divergence:
    """TV and both KLs over the shared tokens plus one ``other`` bucket (module doc)."""
    ka, kb = known_logprobs(a, by_id), known_logprobs(b, by_id)
    shared = [key for key in ka if key in kb]
    pa = [math.exp(ka[s]) for s in shared]
    pb = [math.exp(kb[s]) for s in shared]
    for probs in (pa, pb):
        rest = 1.0 - math.fsum(probs)
        probs.append(rest if rest > TAIL_TOLERANCE else 0.0)
    tv = 0.5 * math.fsum(abs(x - y) for x, y in zip(pa, pb, strict=True))
    return Divergence(tv, _kl(pa, pb), _kl(pb, pa), len(shared))


def _cross(me: Position, other: Position, by_id: bool) -> float | None:
    return known_logprobs(other, by_id).get(token_key(me.id, me.text, by_id))


def compare(a: Response, b: Response) -> Comparison:
    """Align ``a`` and ``b`` token by token (see the module doc)."""
    by_id = a.has_ids and b.has_ids
    n = max(len(a.positions), len(b.positions))
    first: int | None = None
    rows = []
    for i in range(n):
        pa = a.positions[i] if i < len(a.positions) else None
        pb = b.positions[i] if i < len(b.positions) else None
        same = (
            pa is not None
            and pb is not None
            and token_key(pa.id, pa.text, by_id) == token_key(pb.id, pb.text, by_id)
        )
        if not same and first is None:
            first = i
        div = a_in_b = b_in_a = None
        if pa is not None and pb is not None:
            div, a_in_b, b_in_a = (
                divergence(pa, pb, by_id),
                _cross(pa, pb, by_id),
                _cross(pb, pa, by_id),
            )
        rows.append(
            AlignedPosition(
                index=i,
                a=pa,
                b=pb,
                same_token=same,
                same_prefix=first is None or i <= first,
                divergence=div,
                a_token_in_b=a_in_b,
                b_token_in_a=b_in_a,
            )
        )
    tvs = [(r.divergence.tv, r.index) for r in rows if r.same_prefix and r.divergence]
    return Comparison(
        a=a,
        b=b,
        positions=rows,
        first_divergence=first,
        mean_tv=math.fsum(t for t, _ in tvs) / len(tvs) if tvs else None,
        max_tv_index=max(tvs, key=lambda t: (t[0], -t[1]))[1] if tvs else None,
    )
