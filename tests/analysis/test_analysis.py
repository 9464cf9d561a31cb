"""The analysis toolkit's math against values derived by hand, and its format parsers.

Probabilities are chosen as powers of two or simple decimals so every expected value can be
written down from the formulas in docs/analysis.md (natural logs throughout).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pytest

from truffula.analysis import (
    FormatError,
    analyze,
    compare,
    detect,
    divergence,
    entropy_bounds,
    exact_entropy,
    html_report,
    margin,
    parse,
    parse_all,
    position_entropy,
    rank,
    rerank,
)
from truffula.analysis.export import analysis_dict, comparison_dict
from truffula.analysis.types import Alternative, Position, Response

LN2 = math.log(2)


def tok(i: int, text: str, p: float | None, alts: list[tuple[int, str, float]], **kw: Any) -> dict:
    """A truffula token dict with probabilities given as p (converted to logprobs)."""
    d = {"id": i, "text": text, "logprob": None if p is None else math.log(p), "special": False}
    d["alternative_tokens"] = [{"id": a, "text": t, "logprob": math.log(q)} for a, t, q in alts]
    d.update(kw)
    return d


def native(tokens: list[dict], text: str | None = None) -> dict:
    return {
        "generated_text": "".join(t["text"] for t in tokens) if text is None else text,
        "details": {
            "finish_reason": "length",
            "prompt_tokens": 3,
            "generated_tokens": len(tokens),
            "skipped_tokens": 0,
            "seed": None,
            "prefill": [],
            "tokens": tokens,
        },
    }


def pos(p: float | None, alts: list[tuple[int, float]], chosen: int = 1, **kw: Any) -> Position:
    return Position(
        0,
        chosen,
        f"t{chosen}",
        None if p is None else math.log(p),
        alternatives=[Alternative(i, f"t{i}", math.log(q)) for i, q in alts],
        **kw,
    )


# ------------------------------------------------------------------------------- entropy bounds
def test_entropy_bound_cap_fills_tail_exactly() -> None:
    # top-3 = 1/2, 1/4, 1/8; tail r = 1/8, cap c = 1/8 -> m = 1 token of 1/8, s = 0.
    # H_known = 1/2 ln2 + 1/4 ln4 + 1/8 ln8 = 1.375 ln2; lower = H_known + 1/8 ln8 = 1.75 ln2.
    # V = 10: n = 7 unknown tokens, upper = H_known + r ln(n / r) = 1.375 ln2 + 1/8 ln 56
    #                                      = 1.75 ln2 + 1/8 ln7.
    lps = [math.log(0.5), math.log(0.25), math.log(0.125)]
    e = entropy_bounds(lps, cap_logprob=lps[-1], vocab_size=10)
    assert e.source == "bound" and not e.exact
    assert e.lower == pytest.approx(1.75 * LN2)
    assert e.upper == pytest.approx(1.75 * LN2 + math.log(7) / 8)
    assert e.value is None and e.describe() == f"{1.75 * LN2:.2f}–{e.upper:.2f}"
    unknown_v = entropy_bounds(lps, cap_logprob=lps[-1])
    assert unknown_v.lower == pytest.approx(1.75 * LN2) and unknown_v.upper is None
    assert unknown_v.describe().startswith("≥")


def test_entropy_bound_with_partial_cap_block() -> None:
    # top-2 = 0.6, 0.15; r = 0.25, c = 0.15 -> m = 1, s = 0.10:
    # lower = H(0.6, 0.15, 0.15, 0.10). V = 5 -> n = 3, upper = H(0.6, 0.15, r/3, r/3, r/3).
    e = entropy_bounds([math.log(0.6), math.log(0.15)], math.log(0.15), vocab_size=5)
    lower = -(0.6 * math.log(0.6) + 2 * 0.15 * math.log(0.15) + 0.1 * math.log(0.1))
    upper = -(0.6 * math.log(0.6) + 0.15 * math.log(0.15) + 0.25 * math.log(0.25 / 3))
    assert e.lower == pytest.approx(lower) and e.upper == pytest.approx(upper)


def test_entropy_bound_tail_smaller_than_cap_and_no_cap() -> None:
    # 0.4, 0.3, 0.2; r = 0.1 < c = 0.2 -> m = 0, s = 0.1: lower = H(0.4, 0.3, 0.2, 0.1).
    lps = [math.log(0.4), math.log(0.3), math.log(0.2)]
    h4 = -sum(p * math.log(p) for p in (0.4, 0.3, 0.2, 0.1))
    assert entropy_bounds(lps, lps[-1]).lower == pytest.approx(h4)
    # only the chosen token known (p = 0.7), no cap: the rest may be one token -> H(0.7, 0.3).
    only = entropy_bounds([math.log(0.7)])
    assert only.lower == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)))


def test_entropy_bound_is_exact_when_the_top_k_covers_everything() -> None:
    # 0.5, 0.25, 0.25: r = 0 -> both bounds equal H = 1.5 ln2.
    e = entropy_bounds([math.log(0.5), math.log(0.25), math.log(0.25)], vocab_size=None)
    assert e.lower == pytest.approx(1.5 * LN2) and e.upper == pytest.approx(1.5 * LN2)
    assert e.value == pytest.approx(1.5 * LN2)


def test_entropy_bounds_hold_on_random_distributions() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        v, k = 40, 1 + trial % 6
        p = rng.dirichlet(np.full(v, 0.3 if trial % 2 else 2.0))
        order = np.argsort(-p)
        top = order[:k]
        known = list(np.log(p[top]))
        chosen = int(rng.choice(v, p=p))
        if chosen not in top:  # sampled outside the top-k: its probability is known too
            known.append(float(np.log(p[chosen])))
        e = entropy_bounds(known, float(np.log(p[top[-1]])), vocab_size=v)
        h = exact_entropy(list(np.log(p)))
        assert e.lower <= h + 1e-9 and e.upper is not None and h <= e.upper + 1e-9


def test_position_entropy_prefers_the_servers_exact_value() -> None:
    exact = position_entropy(pos(0.5, [(1, 0.5), (2, 0.25)], entropy=1.234))
    assert exact is not None and exact.exact and exact.value == 1.234
    # chosen (p = 0.05) outside the top-2 (0.5, 0.3): known = {0.5, 0.3, 0.05}, r = 0.15,
    # cap 0.3 -> m = 0, s = 0.15: lower = H(0.5, 0.3, 0.05, 0.15).
    outside = position_entropy(pos(0.05, [(2, 0.5), (3, 0.3)]))
    h = -sum(q * math.log(q) for q in (0.5, 0.3, 0.05, 0.15))
    assert outside is not None and outside.lower == pytest.approx(h) and outside.upper is None
    assert position_entropy(pos(None, [])) is None


# ---------------------------------------------------------------------- margin, rank, flags
def test_margin_and_derived_rank() -> None:
    top = pos(0.5, [(1, 0.5), (2, 0.25), (3, 0.125)])
    assert margin(top) == pytest.approx(LN2)  # ln(0.5 / 0.25)
    assert rank(top) == 1
    sampled = pos(0.25, [(1, 0.5), (2, 0.25)], chosen=2)
    assert margin(sampled) == pytest.approx(-LN2)  # ln(0.25 / 0.5)
    assert rank(sampled) == 2
    assert margin(pos(0.9, [(1, 0.9)])) is None  # no rival reported
    assert margin(pos(0.9, [])) is None
    assert rank(pos(0.01, [(2, 0.5), (3, 0.3)])) is None  # outside the top-k: unknown
    assert rank(pos(0.5, [(1, 0.5)], rank=7)) == 7  # the server's rank wins


def test_analyze_flags_perplexity_and_spans() -> None:
    probs = [0.9, 0.2, 0.3, 0.9, 0.1, 0.95]
    rival = [0.05, 0.15, 0.25, 0.05, 0.1, 0.01]
    toks = [
        tok(i, f"w{i}", p, [(i, f"w{i}", p), (100 + i, "x", q)])
        for i, (p, q) in enumerate(zip(probs, rival, strict=True))
    ]
    an = analyze(parse(native(toks)), ambiguity_margin=0.5, low_prob=0.5)
    # margins: ln(0.2/0.15) = 0.288, ln(0.3/0.25) = 0.182, ln(0.1/0.1) = 0 -> ambiguous 1, 2, 4
    assert [t.ambiguous for t in an.tokens] == [False, True, True, False, True, False]
    assert [t.index for t in an.most_ambiguous(3)] == [4, 2, 1]
    # runs of p < 0.5: [1, 3) and [4, 5)
    assert [(s.start, s.end) for s in an.spans] == [(1, 3), (4, 5)]
    assert an.spans[0].text == "w1w2" and an.spans[0].min_prob == pytest.approx(0.2)
    assert an.spans[0].mean_logprob == pytest.approx((math.log(0.2) + math.log(0.3)) / 2)
    merged = analyze(parse(native(toks)), low_prob=0.5, max_gap=1)
    assert [(s.start, s.end) for s in merged.spans] == [(1, 5)]
    assert merged.spans[0].min_prob == pytest.approx(0.1)
    mean = sum(math.log(p) for p in probs) / 6
    assert an.mean_logprob == pytest.approx(mean)
    assert an.perplexity == pytest.approx(math.exp(-mean))
    assert an.tokens[1].prob == pytest.approx(0.2)


def test_perplexity_of_powers_of_two_and_missing_logprobs() -> None:
    # logprobs ln(1/2), ln(1/4), ln(1/8): mean = -2 ln2 -> perplexity 4; a null logprob is skipped.
    toks = [tok(i, "a", 0.5**i, []) for i in (1, 2, 3)] + [tok(9, "b", None, [])]
    an = analyze(parse(native(toks)))
    assert an.mean_logprob == pytest.approx(-2 * LN2) and an.perplexity == pytest.approx(4.0)
    assert an.scored_tokens == 3 and any("without a logprob" in n for n in an.notes)
    assert analyze(parse(native([]))).perplexity is None


# ----------------------------------------------------------------------------------- rerank
def _seq(lps: list[float]) -> dict:
    return native(
        [{"id": i, "text": "x", "logprob": v, "special": False} for i, v in enumerate(lps)]
    )


def test_rerank_by_mean_sum_and_gnmt_penalty() -> None:
    a, b, c = _seq([-1.0, -1.0]), _seq([-0.5] * 4), _seq([-0.1])
    # mean: a -1, b -0.5, c -0.1 -> c, b, a
    assert [r.index for r in rerank([a, b, c])] == [2, 1, 0]
    # alpha = 0: plain sum: c -0.1, a -2, b -2 (tie keeps input order) -> c, a, b
    assert [r.index for r in rerank([a, b, c], alpha=0.0)] == [2, 0, 1]
    # GNMT alpha = 1: lp(2) = 7/6, lp(4) = 9/6 -> a = -12/7 = -1.714, b = -4/3 = -1.333
    ranked = rerank([a, b, c], alpha=1.0)
    assert [r.index for r in ranked] == [2, 1, 0]
    assert ranked[2].score == pytest.approx(-12 / 7) and ranked[1].score == pytest.approx(-4 / 3)
    assert rerank([_seq([]), c])[1].score == -math.inf


# ---------------------------------------------------------------------------------- compare
def test_divergence_over_shared_tokens_and_other_bucket() -> None:
    # a: {1: .5, 2: .3, 3: .1}; b: {2: .6, 1: .2, 4: .1}; shared {1, 2}:
    # P_a = (.5, .3 | other .2), P_b = (.2, .6 | other .2)
    # TV = (.3 + .3 + 0) / 2 = .3; KL(a|b) = .5 ln 2.5 + .3 ln .5; KL(b|a) = .2 ln .4 + .6 ln 2
    pa = pos(0.5, [(1, 0.5), (2, 0.3), (3, 0.1)], chosen=1)
    pb = pos(0.6, [(2, 0.6), (1, 0.2), (4, 0.1)], chosen=2)
    d = divergence(pa, pb)
    assert d.shared == 2 and d.tv == pytest.approx(0.3)
    assert d.kl_ab == pytest.approx(0.5 * math.log(2.5) - 0.3 * LN2)
    assert d.kl_ba == pytest.approx(0.2 * math.log(0.4) + 0.6 * LN2)
    # b's shared tokens hold all its mass, a leaves .2 outside: KL(a|b) = inf, TV = .2,
    # KL(b|a) = .5 ln(.5/.5) + .5 ln(.5/.3)
    full = divergence(pos(0.5, [(1, 0.5), (2, 0.3)]), pos(0.5, [(1, 0.5), (2, 0.5)]))
    assert full.tv == pytest.approx(0.2) and full.kl_ab == math.inf
    assert full.kl_ba == pytest.approx(0.5 * math.log(0.5 / 0.3))
    same = divergence(pa, pa)
    assert same.tv == 0 and same.kl_ab == 0 and same.kl_ba == 0


def test_compare_aligns_and_finds_first_divergence() -> None:
    a = native(
        [
            tok(1, "A", 0.9, [(1, "A", 0.9), (2, "B", 0.05)]),
            tok(3, " x", 0.5, [(3, " x", 0.5), (4, " y", 0.4)]),
            tok(5, "!", 0.7, [(5, "!", 0.7)]),
        ]
    )
    b = native(
        [
            tok(1, "A", 0.8, [(1, "A", 0.8), (2, "B", 0.1)]),
            tok(4, " y", 0.6, [(4, " y", 0.6), (3, " x", 0.2)]),
            tok(6, "?", 0.5, [(6, "?", 0.5)]),
            tok(7, ".", 0.5, [(7, ".", 0.5)]),
        ]
    )
    c = compare(parse(a), parse(b))
    assert c.first_divergence == 1
    assert [p.same_prefix for p in c.positions] == [True, True, False, False]
    assert [p.same_token for p in c.positions] == [True, False, False, False]
    # position 0: shared {1, 2}: P_a = (.9, .05 | .05), P_b = (.8, .1 | .1): TV = .1
    assert c.positions[0].divergence.tv == pytest.approx(0.1)  # type: ignore[union-attr]
    # position 1: P_a = (.5, .4 | .1), P_b = (.2, .6 | .2): TV = (.3 + .2 + .1) / 2 = .3
    assert c.positions[1].divergence.tv == pytest.approx(0.3)  # type: ignore[union-attr]
    assert c.mean_tv == pytest.approx(0.2) and c.max_tv_index == 1
    assert c.positions[1].a_token_in_b == pytest.approx(math.log(0.2))
    assert c.positions[1].b_token_in_a == pytest.approx(math.log(0.4))
    assert c.positions[3].a is None and c.positions[3].divergence is None
    d = comparison_dict(c)
    assert d["first_divergence"] == 1 and d["positions"][3]["a"] is None
    json.dumps(d, allow_nan=False)
    assert compare(parse(a), parse(a)).first_divergence is None
    # a strict prefix parts where the shorter one ends
    assert compare(parse(a), parse(native(a["details"]["tokens"][:2]))).first_divergence == 2


# ---------------------------------------------------------------------------------- formats
LP = {"Hi": math.log(0.6), "Hello": math.log(0.3), "Hey": math.log(0.05)}


def _check_hi(r: Response, ids: bool) -> None:
    (p,) = r.positions
    assert p.text == "Hi" and p.logprob == pytest.approx(LP["Hi"])
    assert [a.text for a in p.alternatives] == ["Hi", "Hello", "Hey"]  # sorted, most likely first
    assert [a.logprob for a in p.alternatives] == pytest.approx([LP[t] for t in LP])
    assert (p.id == 10) is ids and all((a.id is not None) is ids for a in p.alternatives)
    assert margin(p) == pytest.approx(math.log(2))


def test_parse_truffula_native_with_rank_entropy_and_null_alternative() -> None:
    t = {"id": 10, "text": "Hi", "logprob": LP["Hi"], "special": False, "skipped": False}
    t |= {"rank": 1, "entropy": 0.9}
    t["alternative_tokens"] = [
        {"id": i, "text": s, "logprob": LP[s]} for i, s in [(10, "Hi"), (11, "Hello"), (12, "Hey")]
    ]
    data = native([t])
    assert detect(data) == "truffula" and detect([data]) == "truffula"
    r = parse(data)
    _check_hi(r, ids=True)
    assert r.positions[0].rank == 1 and r.positions[0].entropy == 0.9 and r.prompt_tokens == 3
    assert parse([data]).text == "Hi"  # the `/` route's one-element list
    t["alternative_tokens"].append({"id": 13, "text": "Yo", "logprob": None})  # masked token
    assert parse(data).positions[0].alternatives[-1].prob == 0.0


def test_parse_tgi_top_tokens_unsorted_and_best_of() -> None:
    top = [
        {"id": i, "text": s, "logprob": LP[s], "special": False}
        for i, s in [(12, "Hey"), (10, "Hi"), (11, "Hello")]
    ]
    data = native([{"id": 10, "text": "Hi", "logprob": LP["Hi"], "special": False}])
    data["details"]["top_tokens"] = [top]
    data["details"]["best_of_sequences"] = [
        {"generated_text": "Yo", "finish_reason": "length", "generated_tokens": 1, "prefill": [],
         "tokens": [{"id": 13, "text": "Yo", "logprob": -2.0, "special": False}], "top_tokens": [[]]}
    ]  # fmt: skip
    assert detect(data) == "tgi"
    _check_hi(parse(data), ids=True)
    assert [r.text for r in parse_all(data)] == ["Hi", "Yo"]
    assert parse(data).positions[0].entropy is None  # TGI sends no entropy: bounds are used
    e = analyze(parse(data)).tokens[0].entropy
    assert e is not None and e.source == "bound"


def test_parse_stream_events() -> None:
    alts = [
        {"id": i, "text": s, "logprob": LP[s]} for i, s in [(10, "Hi"), (11, "Hello"), (12, "Hey")]
    ]
    events = [
        {"token": {"id": 10, "text": "Hi", "logprob": LP["Hi"], "special": False,
                   "alternative_tokens": alts}, "generated_text": "Hi",
         "details": {"finish_reason": "length", "prompt_tokens": 2, "generated_tokens": 1}}
    ]  # fmt: skip
    r = parse(events)
    _check_hi(r, ids=True)
    assert r.finish_reason == "length" and r.text == "Hi"


def test_parse_openai_chat() -> None:
    top = [
        {"token": s, "logprob": LP[s], "bytes": list(s.encode())} for s in ("Hello", "Hi", "Hey")
    ]
    data = {
        "model": "my-adapter",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
             "logprobs": {"content": [{"token": "Hi", "logprob": LP["Hi"], "bytes": [72, 105],
                                       "top_logprobs": top}]}}
        ],
    }  # fmt: skip
    assert detect(data) == "openai-chat"
    r = parse(data)
    _check_hi(r, ids=False)
    assert r.label == "my-adapter" and r.finish_reason == "stop" and rank(r.positions[0]) == 1


def test_parse_openai_completions() -> None:
    data = {
        "choices": [
            {"text": "Hi", "index": 0, "finish_reason": "length",
             "logprobs": {"tokens": ["Hi"], "token_logprobs": [LP["Hi"]],
                          "top_logprobs": [{"Hey": LP["Hey"], "Hi": LP["Hi"], "Hello": LP["Hello"]}],
                          "text_offset": [0]}}
        ]
    }  # fmt: skip
    assert detect(data) == "openai-completions"
    _check_hi(parse(data), ids=False)


def test_parse_errors() -> None:
    with pytest.raises(FormatError):
        detect({"foo": 1})
    with pytest.raises(FormatError, match="details"):
        parse({"generated_text": "x"})
    with pytest.raises(FormatError):
        parse([])


# -------------------------------------------------------------------------------- renderers
def test_export_html_and_terminal_renderers() -> None:
    toks = [
        tok(1, "<b>", 0.4, [(1, "<b>", 0.4), (2, "&", 0.35)], rank=1, entropy=1.5),
        tok(2, "\n", 0.95, [(2, "\n", 0.95), (3, "y", 0.01)], rank=1, entropy=0.1),
    ]
    an = analyze(parse(native(toks)))
    d = analysis_dict(an)
    json.dumps(d, allow_nan=False)
    assert d["tokens"][0]["entropy"] == {
        "value": 1.5,
        "lower": 1.5,
        "upper": 1.5,
        "source": "server",
    }
    assert d["most_ambiguous"] == [0, 1] and d["low_confidence_spans"][0]["text"] == "<b>"
    page = html_report([an], compare(an.response, an.response), prompt="say <b>")
    assert "http://" not in page and "https://" not in page
    assert "&lt;b&gt;" in page and "<b>" not in page.split("<script")[0]
    assert page.count('tabindex="0"') == 2 and "identical" in page

    from rich.console import Console

    from truffula.analysis.terminal import render

    buf = io.StringIO()
    render(an, Console(file=buf, width=120, color_system=None))
    out = buf.getvalue()
    assert "<b>\n" in out and "Most ambiguous" in out and "'&' 0.350" in out


def test_html_token_shading_keeps_readable_contrast() -> None:
    import colorsys
    import re

    from truffula.analysis.html import shade

    def luminance(rgb: tuple[float, float, float]) -> float:
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    text = luminance((0x11 / 255,) * 3)  # token text is #111
    for p in np.linspace(0, 1, 21):
        h, s, lt = (float(x) for x in re.findall(r"[\d.]+", shade(float(p))))
        bg = luminance(colorsys.hls_to_rgb(h / 360, lt / 100, s / 100))
        assert (bg + 0.05) / (text + 0.05) >= 7.0  # WCAG AAA for normal text


def test_comparison_renderers_mark_the_first_divergence() -> None:
    from rich.console import Console

    from truffula.analysis.terminal import render_comparison

    a = parse(
        native(
            [tok(1, "A", 0.9, [(1, "A", 0.9)]), tok(3, " x", 0.5, [(3, " x", 0.5), (4, " y", 0.4)])]
        )
    )
    b = parse(
        native(
            [tok(1, "A", 0.8, [(1, "A", 0.8)]), tok(4, " y", 0.6, [(4, " y", 0.6), (3, " x", 0.2)])]
        )
    )
    a.label, b.label = "lora", "base model"
    c = compare(a, b)
    buf = io.StringIO()
    render_comparison(analyze(a), analyze(b), c, Console(file=buf, width=120, color_system=None))
    out = buf.getvalue()
    assert "first divergence at token 1: ' x' vs ' y'" in out
    assert "base model gave lora's token ' x' p 0.200" in out
    page = html_report([analyze(a), analyze(b)], c)
    assert page.count('class="tok diverge"') == 2 and "First divergence at token 1" in page
