"""What the engine returns per step: tokens with their probabilities, text deltas, finish state.

Records are built here from the runner's plain numbers and the token table; the HTTP layer only
renames fields for its dialect.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from truffula.engine.detokenizer import Detokenizer, TokenTable
from truffula.runner.output import TokenLogprobs


@dataclass(slots=True)
class Alternative:
    id: int
    text: str
    """The text this token would have added in place of the chosen one."""
    logprob: float
    bytes: bytes
    special: bool = False


@dataclass
class TokenInfo:
    id: int
    text: str
    bytes: bytes
    """The token's own raw bytes (may be part of a UTF-8 character)."""
    special: bool
    logprob: float | None = None
    rank: int | None = None
    entropy: float | None = None
    alternatives: Sequence[Alternative] | None = None


@dataclass
class RequestOutput:
    """One step's news about a request. ``text`` is the newly released text."""

    request_id: str
    tokens: list[TokenInfo] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    """length | eos_token | stop_sequence | abort | error (the engine failed this request)"""
    prompt_tokens: list[TokenInfo] | None = None
    """Sent once, with the first generated token, when the request asked for them."""
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    generated_text: str | None = None
    """The whole text, on the finishing output."""
    seed: int | None = None
    timings: list[float] | None = None
    """The engine's ``EngineOutput.timings`` (admission, first token[, end]), when it sent them."""


class LazyAlternatives(Sequence[Alternative]):
    """A token's alternatives, turned into records (text, bytes) only when first read: the step
    loop stores ids and logprobs; whoever serializes the token pays for the text."""

    __slots__ = ("_items", "_src")

    def __init__(
        self, table: TokenTable, detok: Detokenizer, lp: TokenLogprobs, pending: bytes
    ) -> None:
        self._src: tuple[TokenTable, Detokenizer, TokenLogprobs, bytes] | None = (
            table,
            detok,
            lp,
            pending,
        )
        self._items: list[Alternative] = []

    def _load(self) -> list[Alternative]:
        if self._src is not None:
            table, detok, lp, pending = self._src
            self._items = alternatives(table, detok, lp, pending)
            self._src = None
        return self._items

    def __len__(self) -> int:
        return len(self._src[2].top_ids) if self._src is not None else len(self._items)

    @overload
    def __getitem__(self, i: int) -> Alternative: ...

    @overload
    def __getitem__(self, i: slice) -> list[Alternative]: ...

    def __getitem__(self, i: int | slice) -> Alternative | list[Alternative]:
        return self._load()[i]

    def __iter__(self) -> Iterator[Alternative]:
        return iter(self._load())

    def __repr__(self) -> str:
        return repr(self._load())

    def as_dicts(self) -> list[dict[str, Any]]:
        """``{id, text, logprob}`` of each alternative: straight from the ids and logprobs,
        without records, while none were read and each text is a table entry (the common case;
        a streamed token event with 20 alternatives costs half as much)."""
        if self._src is None or self._src[3]:  # read already, or after a partial character
            return [{"id": a.id, "text": a.text, "logprob": a.logprob} for a in self._load()]
        table, _, lp, _ = self._src
        solo, size = table.solo_text, table.size
        return [
            {"id": t, "text": solo[t] if t < size else "", "logprob": v}
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]


def token_info(
    table: TokenTable,
    detok: Detokenizer,
    token_id: int,
    token_text: str,
    lp: TokenLogprobs | None,
    pending_before: bytes,
    k: int,
) -> TokenInfo:
    raw = table.raw[token_id] if token_id < len(table) else b""
    special = token_id < len(table) and table.special[token_id]
    info = TokenInfo(token_id, token_text, raw, special)
    if lp is not None:
        info.logprob, info.rank, info.entropy = lp.logprob, lp.rank, lp.entropy
        if k > 0:
            info.alternatives = LazyAlternatives(table, detok, lp, pending_before)
    return info


def alternatives(
    table: TokenTable, detok: Detokenizer, lp: TokenLogprobs, pending_before: bytes
) -> list[Alternative]:
    size, raws, special = table.size, table.raw, table.special
    if not pending_before:  # the common case: each text is a table entry
        solo = table.solo_text
        return [
            Alternative(t, solo[t], v, raws[t], special[t])
            if t < size
            else Alternative(t, "", v, b"", False)
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]
    out = []
    for tid, value in zip(lp.top_ids, lp.top_logprobs, strict=True):
        text, _ = detok.token_text(tid, pending_before)
        known = tid < size
        out.append(
            Alternative(tid, text, value, raws[tid] if known else b"", known and special[tid])
        )
    return out


def prompt_token_infos(
    table: TokenTable, prompt_ids: list[int], records: dict[int, TokenLogprobs], k: int
) -> list[TokenInfo]:
    """Prompt tokens with logprobs from ``records`` (position -> stats); position 0 has none."""
    detok = Detokenizer(table, (), skip_special=False)
    infos = []
    for pos, tid in enumerate(prompt_ids):
        pending = detok.pending
        step = detok.add(tid)
        infos.append(token_info(table, detok, tid, step.token_text, records.get(pos), pending, k))
    return infos
