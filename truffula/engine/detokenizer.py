"""Token ids -> bytes -> text, incrementally, for outputs and for alternatives.

``TokenTable`` maps every id to its raw bytes once (byte-level BPE alphabets, SentencePiece
``<0xNN>`` byte fallback and the ``▁`` space marker), so text for a token or an alternative is a
table lookup plus UTF-8 assembly, never a tokenizer call inside the step.

``Detokenizer`` keeps the bytes of an unfinished UTF-8 character between tokens (so valid text
never shows U+FFFD mid-stream), decodes an alternative *in place of* the chosen token (same
pending prefix), and holds back text that could be the start of a stop sequence so that a stop
sequence spanning tokens is never emitted.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class TokenTable:
    """Raw bytes and special flag of every token id of a HF tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        backend = tokenizer.backend_tokenizer
        vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        size = max(max(vocab.values()) + 1, len(tokenizer))
        decoder_kind = _decoder_kind(backend)
        self.special = [False] * size
        self.raw: list[bytes] = [b""] * size
        self.strings: list[str] = [""] * size
        added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
        for piece, idx in vocab.items():
            self.strings[idx] = piece
            token = added.get(piece)
            if token is not None:
                self.special[idx] = bool(token.special)
                self.raw[idx] = piece.encode("utf-8")
            else:
                self.raw[idx] = _piece_bytes(piece, decoder_kind)
        # complete-UTF-8 text of each token (None when its bytes are a partial character)
        self.text: list[str | None] = [_complete(b) for b in self.raw]
        # what each token adds after complete text: its string if special, else the complete
        # characters of its bytes (an unfinished character at the end adds nothing yet)
        self.solo_text = [
            s if sp else t if t is not None else decode_partial(b"", r)[0]
            for s, sp, t, r in zip(self.strings, self.special, self.text, self.raw, strict=True)
        ]
        self.size = len(self.raw)

    def __len__(self) -> int:
        return self.size


def _decoder_kind(backend: Any) -> str:
    desc = repr(backend.decoder) if backend.decoder is not None else ""
    if "ByteLevel" in desc:
        return "byte_level"
    if "ByteFallback" in desc or "Metaspace" in desc or "Replace" in desc:
        return "sentencepiece"
    return "plain"


def _piece_bytes(piece: str, kind: str) -> bytes:
    if kind == "byte_level":
        table = _byte_level_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8")
    if kind == "sentencepiece":
        match = _BYTE_TOKEN.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


def _complete(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def decode_partial(pending: bytes, data: bytes) -> tuple[str, bytes]:
    """Decode ``pending + data``: the complete characters, and the bytes of an unfinished one."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = dec.decode(pending + data, final=False)
    return text, dec.getstate()[0]


@dataclass
class StepText:
    token_text: str
    """What this token adds to the text (empty while a character is unfinished)."""
    released: str
    """Text safe to send now (stop-sequence prefixes held back)."""
    stopped: bool
    """A stop sequence appeared; the text was cut before it."""


class Detokenizer:
    def __init__(self, table: TokenTable, stop: tuple[str, ...], skip_special: bool) -> None:
        self.table = table
        self.stop = stop
        self.skip_special = skip_special
        self.pending = b""
        self.text = ""
        self.released = 0
        self._max_stop = max((len(s) for s in stop), default=0)

    def token_text(self, token_id: int, pending: bytes | None = None) -> tuple[str, bytes]:
        """Text of ``token_id`` following ``pending`` bytes (default: the current state)."""
        pending = self.pending if pending is None else pending
        if token_id >= self.table.size:
            return "", pending
        if self.table.special[token_id]:
            return self.table.strings[token_id], pending
        cached = self.table.text[token_id]
        if not pending and cached is not None:
            return cached, b""
        return decode_partial(pending, self.table.raw[token_id])

    def add(self, token_id: int) -> StepText:
        text, self.pending = self.token_text(token_id)
        special = token_id < len(self.table) and self.table.special[token_id]
        if not (special and self.skip_special):
            before = len(self.text)
            self.text += text
            if self.stop:
                cut = self._find_stop(before)
                if cut is not None:
                    self.text = self.text[:cut]
                    return StepText(text, self._release(len(self.text)), True)
        return StepText(text, self._release(len(self.text) - self._held()), False)

    def flush(self) -> str:
        """Release everything held (the request ended for another reason than a stop sequence)."""
        return self._release(len(self.text))

    def _find_stop(self, before: int) -> int | None:
        start = max(0, before - self._max_stop + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Length of the longest suffix of the text that starts some stop sequence."""
        for n in range(min(self._max_stop - 1, len(self.text) - self.released), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out = self.text[self.released : upto]
        self.released = upto
        return out
