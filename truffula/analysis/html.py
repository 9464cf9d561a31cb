"""A self-contained HTML report: inline CSS and JS, no network, keyboard-accessible.

Every token is a focusable span shaded by its probability (red = unlikely, green = likely, on
light backgrounds with dark text for contrast); hovering or focusing it shows its alternatives as
probability bars with rank, entropy and margin. With a comparison, the two generations stand side
by side and the first divergent token is outlined.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from truffula.analysis.compare import Comparison
from truffula.analysis.metrics import Analysis, TokenStats
from truffula.analysis.types import show

CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, sans-serif; color: #111; background: #fafafa; margin: 2rem; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; } h2 { font-size: 1.1rem; margin: 1rem 0 .3rem; }
.prompt { white-space: pre-wrap; background: #eee; padding: .5rem; border-radius: 4px; }
.runs { display: grid; gap: 1.5rem; grid-template-columns: repeat(auto-fit, minmax(22rem, 1fr)); }
.tokens { white-space: pre-wrap; font: 15px/1.9 ui-monospace, monospace; background: #fff;
  border: 1px solid #ccc; border-radius: 4px; padding: .6rem; }
.tok { border-radius: 3px; padding: 1px 0; cursor: help; color: #111; }
.tok:focus, .tok:hover { outline: 2px solid #1d4ed8; outline-offset: 1px; }
.tok.special { font-style: italic; border: 1px dashed #555; }
.tok.low { text-decoration: underline dotted #7f1d1d; }
.tok.diverge { outline: 3px solid #6d28d9; outline-offset: 2px; }
.summary, .note { color: #333; font-size: .9rem; }
#tip { position: absolute; display: none; z-index: 10; background: #fff; color: #111;
  border: 1px solid #444; border-radius: 6px; padding: .5rem .7rem; min-width: 16rem;
  box-shadow: 0 4px 14px rgba(0,0,0,.2); font-size: .85rem; }
#tip .row { display: grid; grid-template-columns: 8rem 1fr 4rem; gap: .4rem; align-items: center; }
#tip .bar { background: #2563eb; height: .7rem; border-radius: 2px; }
#tip .chosen { font-weight: bold; }
#tip .head { margin-bottom: .3rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .85rem; background: #fff; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; }
code { white-space: pre; }
.legend span { padding: 0 .4rem; border-radius: 3px; color: #111; }
"""

JS = """
(function () {
  const data = JSON.parse(document.getElementById('truffula-data').textContent);
  const tip = document.getElementById('tip');
  function esc(s) { const d = document.createElement('span'); d.textContent = s; return d.innerHTML; }
  function vis(s) { return "'" + s.replace(/\\n/g, '\\\\n').replace(/\\t/g, '\\\\t') + "'"; }
  function show(el) {
    const t = data.runs[+el.dataset.run].tokens[+el.dataset.i];
    let h = '<div class="head"><b>' + esc(vis(t.text)) + '</b> #' + el.dataset.i +
      '<br>p ' + (t.p === null ? '-' : t.p.toFixed(4)) + ' · rank ' + (t.rank ?? '-') +
      ' · entropy ' + (t.entropy ?? '-') + ' · margin ' +
      (t.margin === null ? '-' : t.margin.toFixed(3)) + '</div>';
    if (!t.alts.length) h += '<div>no alternatives reported</div>';
    for (const a of t.alts) {
      const w = Math.max(1, Math.round(a[1] * 100));
      h += '<div class="row' + (a[2] ? ' chosen' : '') + '"><span>' + esc(vis(a[0])) +
        '</span><div><div class="bar" style="width:' + w + '%"></div></div><span>' +
        a[1].toFixed(4) + '</span></div>';
    }
    tip.innerHTML = h;
    const r = el.getBoundingClientRect();
    tip.style.left = (window.scrollX + r.left) + 'px';
    tip.style.top = (window.scrollY + r.bottom + 6) + 'px';
    tip.style.display = 'block';
  }
  function hide() { tip.style.display = 'none'; }
  document.querySelectorAll('.tok').forEach(function (el) {
    el.addEventListener('mouseenter', function () { show(el); });
    el.addEventListener('focus', function () { show(el); });
    el.addEventListener('mouseleave', hide);
    el.addEventListener('blur', hide);
  });
  document.addEventListener('keydown', function (e) { if (e.key === 'Escape') hide(); });
})();
"""


def shade(prob: float | None) -> str:
    """Background for a token: hue 0 (red, p=0) to 120 (green, p=1), light enough for #111 text
    (contrast ratio above 10:1 at every hue)."""
    if prob is None:
        return "#e5e5e5"
    return f"hsl({round(120 * prob)}, 75%, 84%)"


def _token_data(t: TokenStats) -> dict[str, Any]:
    pos = t.position
    return {
        "text": pos.text,
        "p": t.prob,
        "rank": t.rank,
        "entropy": None if t.entropy is None else t.entropy.describe(3),
        "margin": t.margin,
        "alts": [
            [a.text, a.prob, a.id == pos.id if pos.id is not None else a.text == pos.text]
            for a in pos.alternatives
        ],
    }


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _tokens_html(an: Analysis, run: int, highlight: int | None) -> str:
    parts = []
    for t in an.tokens:
        cls = ["tok"]
        if t.position.special:
            cls.append("special")
        if t.low_confidence:
            cls.append("low")
        if highlight is not None and t.index == highlight:
            cls.append("diverge")
        p = "-" if t.prob is None else f"{t.prob:.3f}"
        text = t.text or "·"
        parts.append(
            f'<span class="{" ".join(cls)}" tabindex="0" data-run="{run}" data-i="{t.index}" '
            f'aria-describedby="tip" style="background:{shade(t.prob)}" title="p {p}">{html.escape(text)}</span>'
        )
    return "".join(parts)


def _summary(an: Analysis) -> str:
    r = an.response
    bits = [f"{len(r.positions)} tokens", f"finish: {r.finish_reason or '?'}"]
    if an.mean_logprob is not None and an.perplexity is not None:
        bits += [f"mean logprob {an.mean_logprob:.3f}", f"perplexity {an.perplexity:.3f}"]
    bits.append(f"{sum(t.ambiguous for t in an.tokens)} ambiguous")
    bits.append(f"{len(an.spans)} low-confidence span(s)")
    notes = "".join(f'<p class="note">note: {html.escape(n)}</p>' for n in an.notes)
    return f'<p class="summary">{" · ".join(bits)}</p>{notes}'


def _ambiguity_table(an: Analysis, top: int) -> str:
    rows = []
    for t in an.most_ambiguous(top):
        alts = ", ".join(f"{show(a.text)} {a.prob:.3f}" for a in t.position.alternatives[:5])
        rows.append(
            f"<tr><td>{t.index}</td><td><code>{html.escape(show(t.text))}</code></td>"
            f"<td>{'-' if t.prob is None else f'{t.prob:.3f}'}</td>"
            f"<td>{'-' if t.rank is None else t.rank}</td>"
            f"<td>{'-' if t.entropy is None else html.escape(t.entropy.describe())}</td>"
            f"<td>{'-' if t.margin is None else f'{t.margin:+.3f}'}</td>"
            f"<td><code>{html.escape(alts)}</code></td></tr>"
        )
    if not rows:
        return ""
    head = "".join(
        f"<th>{h}</th>" for h in ("#", "token", "p", "rank", "entropy", "margin", "alternatives")
    )
    return (
        "<table><caption>Most ambiguous positions (smallest |margin|)</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _comparison_html(comp: Comparison, top: int) -> str:
    first = comp.first_divergence
    if first is None:
        lead = "<p>The two generations are identical token for token.</p>"
    else:
        row = comp.positions[first]
        a = "(ended)" if row.a is None else show(row.a.text)
        b = "(ended)" if row.b is None else show(row.b.text)
        lead = (
            f"<p><b>First divergence at token {first}</b> (outlined): "
            f"<code>{html.escape(a)}</code> vs <code>{html.escape(b)}</code></p>"
        )
    rows = [r for r in comp.positions if r.same_prefix and r.divergence is not None]
    rows.sort(key=lambda r: (-(r.divergence.tv if r.divergence else 0.0), r.index))
    body = []
    for r in rows[:top]:
        d = r.divergence
        assert d is not None
        cells = [
            str(r.index),
            "-" if r.a is None else f"<code>{html.escape(show(r.a.text))}</code>",
            "-" if r.b is None else f"<code>{html.escape(show(r.b.text))}</code>",
            f"{d.tv:.4f}",
            f"{d.kl_ab:.4f}",
            f"{d.kl_ba:.4f}",
            str(d.shared),
        ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("#", "a", "b", "TV", "KL(a‖b)", "KL(b‖a)", "shared"))
    mean = (
        "" if comp.mean_tv is None else f"<p>Mean TV over the shared prefix: {comp.mean_tv:.4f}</p>"
    )
    return (
        f"<h2>Comparison</h2>{lead}{mean}<table><caption>Largest divergences before the texts "
        "part (over the shared top-k tokens plus an 'other' bucket: lower bounds)</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _legend() -> str:
    cells = "".join(
        f'<span style="background:{shade(p)}">{p:.1f}</span>' for p in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    return f'<p class="legend">probability: {cells}</p>'


def html_report(
    analyses: list[Analysis],
    comparison: Comparison | None = None,
    prompt: str | None = None,
    title: str = "truffula inspect",
    top: int = 10,
) -> str:
    """The whole report as one HTML string (one run, or two side by side with a comparison)."""
    highlight = comparison.first_divergence if comparison is not None else None
    runs = []
    for i, an in enumerate(analyses):
        label = an.response.label or f"run {i + 1}"
        runs.append(
            f'<section class="run"><h2>{html.escape(label)}</h2>{_summary(an)}'
            f'<div class="tokens" aria-label="generated tokens of {html.escape(label)}">'
            f"{_tokens_html(an, i, highlight)}</div>{_ambiguity_table(an, top)}</section>"
        )
    data = _clean({"runs": [{"tokens": [_token_data(t) for t in an.tokens]} for an in analyses]})
    blob = json.dumps(data).replace("</", "<\\/").replace("<!--", "<\\!--")
    prompt_html = (
        "" if prompt is None else f'<h2>Prompt</h2><div class="prompt">{html.escape(prompt)}</div>'
    )
    comp_html = "" if comparison is None else _comparison_html(comparison, top)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{prompt_html}{_legend()}"
        '<p class="note">Hover or focus (Tab) a token to see its alternatives; Esc hides them. '
        "Dotted underline: low confidence.</p>"
        f'<div class="runs">{"".join(runs)}</div>{comp_html}'
        '<div id="tip" role="tooltip"></div>'
        f'<script id="truffula-data" type="application/json">{blob}</script>'
        f"<script>{JS}</script></body></html>\n"
    )
