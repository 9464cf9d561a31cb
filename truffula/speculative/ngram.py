"""Prompt lookup (n-gram) drafts: continue the history the way it continued before.

The last n tokens of the history (n from ``max_n`` down to ``min_n``) are searched for earlier
in the history, most recent occurrence first; the tokens that followed that occurrence are the
draft. No model runs: the draft costs a scan of the history on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class History:
    """A request's known tokens as an int64 array, grown by the tokens appended since the last
    ``sync`` (the list is not converted again each step)."""

    def __init__(self) -> None:
        self._buf = np.empty(256, dtype=np.int64)
        self.size = 0

    def sync(self, tokens: Sequence[int]) -> np.ndarray:
        """The array of ``tokens``, which must extend the tokens of the last call."""
        n = len(tokens)
        if n > len(self._buf):
            grown = np.empty(max(n, 2 * len(self._buf)), dtype=np.int64)
            grown[: self.size] = self._buf[: self.size]
            self._buf = grown
        if n > self.size:
            self._buf[self.size : n] = tokens[self.size : n]
        self.size = n
        return self._buf[:n]


def propose(history: Sequence[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` drafted tokens after ``history`` (empty when no n-gram recurs)."""
    size = len(history)
    if k <= 0 or size < min_n + 1:
        return []
    arr = np.asarray(history, dtype=np.int64)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = arr[size - n :]
        # windows starting at 0 .. size - n - 1 (the tail itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(arr[: size - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []
