"""JSON-ready dicts of analyses and comparisons (non-finite numbers become null)."""

from __future__ import annotations

import math
from typing import Any

from truffula.analysis.compare import Comparison
from truffula.analysis.entropy import EntropyEstimate
from truffula.analysis.metrics import Analysis, TokenStats


def _f(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def entropy_dict(e: EntropyEstimate | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"value": _f(e.value), "lower": _f(e.lower), "upper": _f(e.upper), "source": e.source}


def token_stats_dict(t: TokenStats) -> dict[str, Any]:
    pos = t.position
    return {
        "index": pos.index,
        "id": pos.id,
        "text": pos.text,
        "special": pos.special,
        "logprob": _f(pos.logprob),
        "prob": _f(t.prob),
        "rank": t.rank,
        "entropy": entropy_dict(t.entropy),
        "margin": _f(t.margin),
        "ambiguous": t.ambiguous,
        "low_confidence": t.low_confidence,
        "alternatives": [
            {"id": a.id, "text": a.text, "logprob": _f(a.logprob), "prob": a.prob}
            for a in pos.alternatives
        ],
    }


def analysis_dict(an: Analysis, top: int = 10) -> dict[str, Any]:
    r = an.response
    return {
        "label": r.label,
        "format": r.format,
        "text": r.text,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": len(r.positions),
        "scored_tokens": an.scored_tokens,
        "sum_logprob": _f(an.sum_logprob),
        "mean_logprob": _f(an.mean_logprob),
        "perplexity": _f(an.perplexity),
        "thresholds": {"ambiguity_margin": an.ambiguity_margin, "low_prob": an.low_prob},
        "notes": list(an.notes),
        "tokens": [token_stats_dict(t) for t in an.tokens],
        "most_ambiguous": [t.index for t in an.most_ambiguous(top)],
        "low_confidence_spans": [
            {
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "min_prob": _f(s.min_prob),
                "mean_logprob": _f(s.mean_logprob),
            }
            for s in an.spans
        ],
    }


def comparison_dict(c: Comparison) -> dict[str, Any]:
    rows = []
    for p in c.positions:
        d = p.divergence
        rows.append(
            {
                "index": p.index,
                "a": None if p.a is None else {"id": p.a.id, "text": p.a.text},
                "b": None if p.b is None else {"id": p.b.id, "text": p.b.text},
                "same_token": p.same_token,
                "same_prefix": p.same_prefix,
                "tv": None if d is None else _f(d.tv),
                "kl_ab": None if d is None else _f(d.kl_ab),
                "kl_ba": None if d is None else _f(d.kl_ba),
                "shared": None if d is None else d.shared,
                "a_token_in_b": _f(p.a_token_in_b),
                "b_token_in_a": _f(p.b_token_in_a),
            }
        )
    return {
        "a": c.a.label,
        "b": c.b.label,
        "first_divergence": c.first_divergence,
        "mean_tv": _f(c.mean_tv),
        "max_tv_index": c.max_tv_index,
        "positions": rows,
    }
