"""Terminal rendering with rich: tokens colored by probability, tables of ambiguous positions."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from truffula.analysis.compare import Comparison
from truffula.analysis.metrics import Analysis, TokenStats
from truffula.analysis.types import show

SCALE: list[tuple[float, str]] = [
    (0.9, "green"),
    (0.6, "yellow"),
    (0.3, "dark_orange"),
    (0.1, "red"),
    (0.0, "bold white on red"),
]
"""(lowest probability, style): a token gets the first style whose bound it reaches."""


def style_for(prob: float | None) -> str:
    if prob is None:
        return "dim"
    for bound, style in SCALE:
        if prob >= bound:
            return style
    return SCALE[-1][1]


def legend() -> Text:
    out = Text("p ")
    labels = ["≥0.9", "≥0.6", "≥0.3", "≥0.1", "<0.1"]
    for (_, style), label in zip(SCALE, labels, strict=True):
        out.append(f" {label} ", style=style)
    return out


def colored_tokens(an: Analysis, highlight: int | None = None) -> Text:
    """The generation, one span per token, colored by probability; special tokens in italics;
    the token at ``highlight`` (a first divergence) underlined and reversed."""
    out = Text()
    for t in an.tokens:
        style = style_for(t.prob)
        if t.position.special:
            style += " italic"
        if highlight is not None and t.index == highlight:
            style += " underline reverse"
        out.append(t.text, style=style)
    return out


def summary(an: Analysis) -> Text:
    r = an.response
    parts = [f"{len(r.positions)} tokens", f"finish: {r.finish_reason or '?'}"]
    if an.mean_logprob is not None and an.perplexity is not None:
        parts += [f"mean logprob {an.mean_logprob:.3f}", f"perplexity {an.perplexity:.3f}"]
    parts.append(
        f"{sum(t.ambiguous for t in an.tokens)} ambiguous (|margin|<{an.ambiguity_margin})"
    )
    parts.append(f"{len(an.spans)} low-confidence span(s) (p<{an.low_prob})")
    return Text(" · ".join(parts), style="bold")


def _alternatives(t: TokenStats, limit: int = 5) -> str:
    alts = t.position.alternatives[:limit]
    return "\n".join(f"{show(a.text)} {a.prob:.3f}" for a in alts) or "-"


def ambiguity_table(an: Analysis, top: int = 10) -> Table:
    table = Table(title=f"Most ambiguous positions (smallest |margin|, top {top})")
    for name, justify in [
        ("#", "right"),
        ("token", "left"),
        ("p", "right"),
        ("rank", "right"),
        ("entropy", "right"),
        ("margin", "right"),
        ("alternatives (p)", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for t in an.most_ambiguous(top):
        table.add_row(
            str(t.index),
            Text(show(t.text), style=style_for(t.prob)),
            "-" if t.prob is None else f"{t.prob:.3f}",
            "-" if t.rank is None else str(t.rank),
            "-" if t.entropy is None else t.entropy.describe(),
            "-" if t.margin is None else f"{t.margin:+.3f}",
            _alternatives(t),
        )
    return table


def render(an: Analysis, console: Console, top: int = 10, title: str | None = None) -> None:
    """Print one analysis: header, colored text, ambiguity table, low-confidence spans."""
    if title:
        console.rule(Text(title))
    console.print(colored_tokens(an), soft_wrap=True)
    console.print()
    console.print(summary(an))
    console.print(legend())
    for note in an.notes:
        console.print(Text(f"note: {note}", style="dim"))
    if any(t.margin is not None for t in an.tokens):
        console.print(ambiguity_table(an, top))
    else:
        console.print("no alternatives reported: ask with k >= 2 to see margins", style="dim")
    for s in an.spans[:top]:
        console.print(
            Text(f"low confidence [{s.start}:{s.end}] ")
            + Text(show(s.text), style="red")
            + Text(f" min p {s.min_prob:.3f}")
        )


def render_comparison(
    a: Analysis, b: Analysis, comp: Comparison, console: Console, top: int = 10
) -> None:
    """Both generations, the first divergence, and the positions where they differ most."""
    first = comp.first_divergence
    for name, an in ((comp.a.label or "a", a), (comp.b.label or "b", b)):
        console.print(Text(f"{name}: ", style="bold") + colored_tokens(an, first), soft_wrap=True)
    console.rule("comparison")
    if first is None:
        console.print("identical token sequences")
    else:
        row = comp.positions[first]
        a_txt = "(ended)" if row.a is None else show(row.a.text)
        b_txt = "(ended)" if row.b is None else show(row.b.text)
        console.print(Text(f"first divergence at token {first}: {a_txt} vs {b_txt}", style="bold"))
        la, lb = comp.a.label or "a", comp.b.label or "b"
        for who, other, txt, lp in (
            (lb, la, a_txt, row.a_token_in_b),
            (la, lb, b_txt, row.b_token_in_a),
        ):
            if lp is not None:
                console.print(
                    Text(
                        f"  {who} gave {other}'s token {txt} p {math.exp(lp):.3f} (logprob {lp:.3f})"
                    )
                )
    if comp.mean_tv is not None:
        console.print(f"mean TV over the shared prefix: {comp.mean_tv:.4f} (lower bound)")
    table = Table(title="Largest divergences before the texts part (TV, KL: lower bounds)")
    for name in ("#", "a", "b", "TV", "KL(a‖b)", "KL(b‖a)", "shared"):
        table.add_column(name, justify="left" if name in ("a", "b") else "right")
    rows = [r for r in comp.positions if r.same_prefix and r.divergence is not None]
    rows.sort(key=lambda r: (-(r.divergence.tv if r.divergence else 0.0), r.index))
    for r in rows[:top]:
        d = r.divergence
        assert d is not None
        table.add_row(
            str(r.index),
            "-" if r.a is None else show(r.a.text),
            "-" if r.b is None else show(r.b.text),
            f"{d.tv:.4f}",
            f"{d.kl_ab:.4f}",
            f"{d.kl_ba:.4f}",
            str(d.shared),
        )
    console.print(table)
