"""Entropy of a token distribution: exact when the server sent it, else bounds from the top-k.

Derivation of the bounds (all logs natural, entropies in nats, 0 log 0 = 0).

Let the known tokens have probabilities p_1 >= ... >= p_k (the top-k list, plus the chosen token
if it lies outside it) and let r = 1 - sum(p_i) be the tail mass spread over the unknown tokens,
q_1, q_2, ... >= 0 with sum(q_j) = r. The entropy splits exactly::

    H = H_known + H_tail,   H_known = -sum_i p_i log p_i,   H_tail = -sum_j q_j log q_j.

Constraints on the tail: every unknown token is outside the top-k, so q_j <= c := p_k (the
smallest top-k probability; with no top-k list there is no cap and c := r), and there are at most
n := V - k unknown tokens when the vocabulary size V is known.

Lower bound. Entropy is Schur-concave, so it is smallest at the feasible tail vector that
majorizes all others: as many tokens as possible at the cap. With m = floor(r / c) and
s = r - m c, the tail (c, ..., c, s, 0, ...) (m copies of c) has partial sums min(j c, r), the
largest any feasible vector can reach, hence::

    H >= H_known - m c log c - s log s.

Upper bound. Without the cap the tail entropy is largest when the mass is uniform over all n
unknown tokens, q_j = r / n; that vector also satisfies the cap (r / n <= c whenever the data
are consistent, since r <= n c), so::

    H <= H_known - r log(r / n) = H_known + r log n - r log r.

With V unknown, n can be arbitrarily large and r log n grows without bound: the upper bound is
None (unbounded) whenever r > 0. When r is zero (up to rounding) both bounds equal H_known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TAIL_TOLERANCE = 1e-6
"""Tail mass below this is rounding noise in the reported logprobs, not probability."""


@dataclass(frozen=True)
class EntropyEstimate:
    """The entropy (nats) of one position's distribution, or bounds on it."""

    lower: float
    upper: float | None
    """None: unbounded (the tail has mass and the vocabulary size is unknown)."""
    source: str
    """``server`` (exact, sent by the server) or ``bound`` (derived from the top-k)."""

    @property
    def exact(self) -> bool:
        return self.source == "server"

    @property
    def value(self) -> float | None:
        """The entropy when it is known exactly (or the bounds meet), else None."""
        if self.exact or (self.upper is not None and self.upper - self.lower < 1e-9):
            return self.lower
        return None

    def describe(self, digits: int = 2) -> str:
        """``1.23`` (exact), ``1.20-1.31`` (bounded) or ``>=1.20`` (lower bound only)."""
        if self.value is not None:
            return f"{self.value:.{digits}f}"
        if self.upper is None:
            return f"≥{self.lower:.{digits}f}"
        return f"{self.lower:.{digits}f}–{self.upper:.{digits}f}"


def _plogp(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def tail_mass(known_logprobs: Sequence[float]) -> float:
    """1 - sum of the known probabilities, clipped at 0 (rounding can push the sum over 1)."""
    r = 1.0 - float(np.exp(np.asarray(known_logprobs, dtype=np.float64)).sum())
    return r if r > TAIL_TOLERANCE else 0.0


def entropy_bounds(
    known_logprobs: Sequence[float],
    cap_logprob: float | None = None,
    vocab_size: int | None = None,
) -> EntropyEstimate:
    """Bounds on the entropy from partial knowledge of the distribution (see the module doc).

    ``known_logprobs``: logprobs of distinct tokens whose probability is known (the top-k list and
    the chosen token); ``cap_logprob``: an upper limit on every unknown token's logprob (the
    smallest top-k logprob; None = no limit); ``vocab_size``: V, when known.
    """
    p = np.exp(np.asarray(known_logprobs, dtype=np.float64))
    h_known = _plogp(p)
    r = tail_mass(known_logprobs)
    if r == 0.0:
        return EntropyEstimate(h_known, h_known, "bound")
    c = r if cap_logprob is None else min(math.exp(cap_logprob), r)
    if c <= 0.0:
        # Every unknown token is capped at probability 0 yet mass remains: inconsistent data.
        return EntropyEstimate(h_known, None if vocab_size is None else h_known, "bound")
    m = math.floor(r / c + 1e-9)
    s = max(r - m * c, 0.0)
    lower = h_known - m * c * math.log(c) - (s * math.log(s) if s > 0 else 0.0)
    if vocab_size is None:
        return EntropyEstimate(lower, None, "bound")
    n = vocab_size - len(p)
    upper = h_known - r * math.log(r / n) if n > 0 else lower
    return EntropyEstimate(lower, max(upper, lower), "bound")


def exact_entropy(logprobs: Sequence[float]) -> float:
    """-sum p log p over a full distribution given as logprobs."""
    return _plogp(np.exp(np.asarray(logprobs, dtype=np.float64)))
