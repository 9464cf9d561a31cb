"""Which drafted tokens a verification step accepts (see the package docstring)."""

from __future__ import annotations


def accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many of ``drafts`` are kept: the longest prefix equal to the samples of the positions
    before them. ``sampled`` has one token per verified position (``len(drafts) + 1``); the
    step emits ``sampled[: accepted + 1]``."""
    if len(sampled) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} samples, not {len(sampled)}")
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return n
