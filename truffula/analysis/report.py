"""Several responses to one prompt, read together: ``Run``s analyzed and compared, their JSON
document and their terminal rendering (what ``truffula inspect`` shows).

Takes the responses as JSON-ready dicts (any dialect ``parse`` reads); how they were generated
is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from truffula.analysis.compare import Comparison, compare
from truffula.analysis.export import analysis_dict, comparison_dict
from truffula.analysis.metrics import Analysis, analyze
from truffula.analysis.parse import parse


@dataclass
class Run:
    adapter: str | None
    label: str
    response: dict[str, Any]
    analysis: Analysis | None = None


def analyze_runs(runs: list[Run], vocab_size: int | None = None) -> Comparison | None:
    """Fill in each run's analysis; with two runs, compare them token by token."""
    for run in runs:
        resp = parse(run.response)
        resp.label, resp.vocab_size = run.label, vocab_size
        run.analysis = analyze(resp)
    if len(runs) != 2:
        return None
    a, b = (r.analysis for r in runs)
    assert a is not None and b is not None
    return compare(a.response, b.response)


def report_dict(header: dict[str, Any], runs: list[Run], comp: Comparison | None) -> dict[str, Any]:
    """``header`` (how the runs were made), then per run the raw response and its analysis."""
    return {
        **header,
        "runs": [
            {
                "adapter": r.adapter,
                "label": r.label,
                "response": r.response,
                "analysis": analysis_dict(r.analysis) if r.analysis else None,
            }
            for r in runs
        ],
        "comparison": None if comp is None else comparison_dict(comp),
    }


def render_terminal(runs: list[Run], comp: Comparison | None) -> None:
    """Each run's text colored by probability and its tables; the comparison of two runs."""
    from rich.console import Console

    from truffula.analysis.terminal import render, render_comparison

    console = Console(highlight=False)
    for r in runs:
        assert r.analysis is not None
        render(r.analysis, console, title=r.label if comp is not None else None)
    if comp is not None:
        a, b = (r.analysis for r in runs)
        assert a is not None and b is not None
        render_comparison(a, b, comp, console)
