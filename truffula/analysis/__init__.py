"""Make token probabilities readable: per-token statistics, reranking, adapter comparison.

Depends only on numpy and the response data (rich for the terminal renderer)::

    from truffula.analysis import parse, analyze, compare, rerank

    an = analyze(parse(response_json))      # truffula/LoRAX, TGI or OpenAI format
    an.perplexity, an.most_ambiguous(5), an.spans
    compare(parse(with_adapter), parse(base)).first_divergence
    rerank([resp1, resp2, resp3])[0].index   # best by mean token logprob

See docs/analysis.md for the formulas.
"""

from __future__ import annotations

from truffula.analysis.compare import AlignedPosition, Comparison, Divergence, compare, divergence
from truffula.analysis.entropy import EntropyEstimate, entropy_bounds, exact_entropy
from truffula.analysis.html import html_report
from truffula.analysis.metrics import (
    Analysis,
    Span,
    TokenStats,
    analyze,
    low_confidence_spans,
    margin,
    position_entropy,
    rank,
)
from truffula.analysis.parse import FormatError, detect, parse, parse_all
from truffula.analysis.rerank import Ranked, length_penalty, rerank
from truffula.analysis.types import Alternative, Position, Response

__all__ = [
    "AlignedPosition",
    "Alternative",
    "Analysis",
    "Comparison",
    "Divergence",
    "EntropyEstimate",
    "FormatError",
    "Position",
    "Ranked",
    "Response",
    "Span",
    "TokenStats",
    "analyze",
    "compare",
    "detect",
    "divergence",
    "entropy_bounds",
    "exact_entropy",
    "html_report",
    "length_penalty",
    "low_confidence_spans",
    "margin",
    "parse",
    "parse_all",
    "position_entropy",
    "rank",
    "rerank",
]
