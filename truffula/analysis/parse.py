"""Parse generation responses into ``Response`` objects.

Formats understood (``fmt="auto"`` detects them):

- ``truffula``: truffula's native LoRAX-dialect JSON, ``{"generated_text", "details": {"tokens":
  [{id, text, logprob, special, rank?, entropy?, alternative_tokens?}]}}``; also the ``/`` route's
  one-element list and a list of ``/generate_stream`` events (``{"token": {...}}`` each).
- ``tgi``: the same shape with ``details.top_tokens`` (one list of ``{id, text, logprob,
  special}`` per generated token) instead of ``alternative_tokens``; stream events carry
  ``top_tokens`` per event.
- ``openai-chat``: ``choices[i].logprobs.content = [{token, logprob, bytes, top_logprobs}]``.
- ``openai-completions``: ``choices[i].logprobs = {tokens, token_logprobs, top_logprobs:
  [{token: logprob}], text_offset}``.

A null alternative logprob (a token the server masked) becomes ``-inf``; a null logprob of the
chosen token stays None. Alternatives are sorted by logprob, most likely first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from truffula.analysis.types import Alternative, Position, Response

FORMATS = ("truffula", "tgi", "openai-chat", "openai-completions")


class FormatError(ValueError):
    """The data is not a response in any format this module reads."""


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"expected a number, got {value!r}") from exc
    return None if math.isnan(out) else out


def _alt_logprob(value: Any) -> float:
    out = _num(value)
    return -math.inf if out is None else out


def _sorted(alts: Iterable[Alternative]) -> list[Alternative]:
    return sorted(alts, key=lambda a: -a.logprob)


def detect(data: Any) -> str:
    """Name the format of ``data`` (one of ``FORMATS``); raise FormatError if none fits."""
    if isinstance(data, Sequence) and not isinstance(data, str):
        if not data:
            raise FormatError("empty list: no response to read")
        first = data[0]
        if isinstance(first, Mapping) and "token" in first:
            return "tgi" if any("top_tokens" in ev for ev in data) else "truffula"
        return detect(first)
    if not isinstance(data, Mapping):
        raise FormatError(f"expected a JSON object or list, got {type(data).__name__}")
    if "choices" in data:
        choices = data["choices"] or [{}]
        lp = choices[0].get("logprobs")
        if isinstance(lp, Mapping) and "content" in lp:
            return "openai-chat"
        if isinstance(lp, Mapping) and "tokens" in lp:
            return "openai-completions"
        return "openai-chat" if "message" in choices[0] else "openai-completions"
    if "generated_text" in data or "details" in data:
        details = data.get("details") or {}
        return "tgi" if "top_tokens" in details else "truffula"
    raise FormatError(
        "not a generation response: expected 'generated_text'/'details' (truffula, TGI) "
        "or 'choices' (OpenAI)"
    )


def _native_position(
    index: int, tok: Mapping[str, Any], top: Sequence[Mapping[str, Any]] | None
) -> Position:
    raw_alts = tok.get("alternative_tokens") if top is None else top
    alts = [
        Alternative(
            a.get("id"), a.get("text", ""), _alt_logprob(a.get("logprob")), bool(a.get("special"))
        )
        for a in raw_alts or []
    ]
    rank = tok.get("rank")
    return Position(
        index=index,
        id=tok.get("id"),
        text=tok.get("text", ""),
        logprob=_num(tok.get("logprob")),
        special=bool(tok.get("special", False)),
        rank=int(rank) if rank is not None else None,
        entropy=_num(tok.get("entropy")),
        alternatives=_sorted(alts),
    )


def _native_sequence(
    text: str, seq: Mapping[str, Any], fmt: str, prompt_tokens: int | None
) -> Response:
    tokens = seq.get("tokens") or []
    tops = seq.get("top_tokens") if fmt == "tgi" else None
    positions = [
        _native_position(i, t, tops[i] if tops is not None and i < len(tops) else None)
        for i, t in enumerate(tokens)
    ]
    return Response(
        text=text,
        positions=positions,
        format=fmt,
        finish_reason=seq.get("finish_reason"),
        prompt_tokens=prompt_tokens,
    )


def _parse_native(data: Mapping[str, Any], fmt: str) -> list[Response]:
    details = data.get("details")
    if details is None:
        raise FormatError("the response has no 'details': ask with details=true")
    prompt_tokens = details.get("prompt_tokens")
    out = [_native_sequence(data.get("generated_text", ""), details, fmt, prompt_tokens)]
    for seq in details.get("best_of_sequences") or []:
        out.append(_native_sequence(seq.get("generated_text", ""), seq, fmt, prompt_tokens))
    return out


def _parse_stream(events: Sequence[Mapping[str, Any]], fmt: str) -> list[Response]:
    tokens, tops, text = [], [], ""
    details: dict[str, Any] = {}
    for ev in events:
        if "error" in ev:
            raise FormatError(f"the stream reported an error: {ev['error']}")
        tokens.append(ev["token"])
        tops.append(ev.get("top_tokens"))
        text = ev.get("generated_text") or text
        details = ev.get("details") or details
    seq = {"tokens": tokens, "finish_reason": details.get("finish_reason")}
    if fmt == "tgi":
        seq["top_tokens"] = [t or [] for t in tops]
    if not text:
        text = "".join(t.get("text", "") for t in tokens if not t.get("special"))
    return [_native_sequence(text, seq, fmt, details.get("prompt_tokens"))]


def _openai_chat(choice: Mapping[str, Any]) -> Response:
    lp = choice.get("logprobs") or {}
    positions = []
    for i, item in enumerate(lp.get("content") or []):
        alts = [
            Alternative(None, a.get("token", ""), _alt_logprob(a.get("logprob")))
            for a in item.get("top_logprobs") or []
        ]
        positions.append(
            Position(
                i,
                None,
                item.get("token", ""),
                _num(item.get("logprob")),
                alternatives=_sorted(alts),
            )
        )
    message = choice.get("message") or {}
    return Response(
        message.get("content") or "", positions, "openai-chat", choice.get("finish_reason")
    )


def _openai_completions(choice: Mapping[str, Any]) -> Response:
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    logprobs = lp.get("token_logprobs") or [None] * len(tokens)
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    positions = []
    for i, (tok, value, top) in enumerate(zip(tokens, logprobs, tops, strict=False)):
        alts = [Alternative(None, t, _alt_logprob(v)) for t, v in (top or {}).items()]
        positions.append(Position(i, None, tok, _num(value), alternatives=_sorted(alts)))
    return Response(
        choice.get("text") or "", positions, "openai-completions", choice.get("finish_reason")
    )


def parse_all(data: Any, fmt: str = "auto") -> list[Response]:
    """Every sequence in ``data``: OpenAI ``choices`` in order, or the LoRAX/TGI sequence followed
    by its ``best_of_sequences``."""
    fmt = detect(data) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(data, Sequence) and not isinstance(data, str):
        if data and isinstance(data[0], Mapping) and "token" in data[0]:
            return _parse_stream(data, fmt)
        return [r for item in data for r in parse_all(item, fmt)]
    if fmt in ("truffula", "tgi"):
        return _parse_native(data, fmt)
    reader = _openai_chat if fmt == "openai-chat" else _openai_completions
    out = [reader(c) for c in data.get("choices") or []]
    for r in out:
        r.label = data.get("model")
    return out


def parse(data: Any, fmt: str = "auto", choice: int = 0) -> Response:
    """The ``choice``-th sequence of a response (see ``parse_all``)."""
    seqs = parse_all(data, fmt)
    if not seqs:
        raise FormatError("the response holds no sequence")
    return seqs[choice]
