"""Rank candidate generations by length-normalized logprob.

score = sum(logprob) / lp(N) over the N tokens that have a logprob, where

- ``alpha=None`` (default): lp(N) = N, the mean token logprob (= -log perplexity);
- ``alpha=a``: GNMT's length penalty lp(N) = ((5 + N) / 6) ** a (Wu et al. 2016); ``a=0`` gives
  the plain sum (favours short answers), larger ``a`` favours longer ones.

A candidate with no scored token gets score -inf and sorts last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from truffula.analysis.parse import parse
from truffula.analysis.types import Response


@dataclass
class Ranked:
    index: int
    """Position of the candidate in the input list."""
    score: float
    sum_logprob: float
    tokens: int
    response: Response


def length_penalty(n: int, alpha: float | None = None) -> float:
    """The divisor of the summed logprob: N, or GNMT's ((5 + N) / 6) ** alpha."""
    if alpha is None:
        return float(n)
    return ((5.0 + n) / 6.0) ** alpha


def score(response: Response, alpha: float | None = None) -> Ranked:
    lps = [p.logprob for p in response.positions if p.logprob is not None]
    total = math.fsum(lps)
    value = total / length_penalty(len(lps), alpha) if lps else -math.inf
    return Ranked(-1, value, total, len(lps), response)


def rerank(
    candidates: Sequence[Response | Mapping[str, Any]], alpha: float | None = None
) -> list[Ranked]:
    """Candidates (Responses or raw responses in any parsed format), best first; ties keep the
    input order."""
    out = []
    for i, cand in enumerate(candidates):
        resp = cand if isinstance(cand, Response) else parse(cand)
        ranked = score(resp, alpha)
        ranked.index = i
        out.append(ranked)
    return sorted(out, key=lambda r: (-r.score, r.index))
