"""The draft model's own paged KV cache: blocks handed to requests from a free list, per-request
block tables, and a cache that grows (doubling, contents kept) up to a fixed number of blocks.

The target's cache is sized once at start-up for the whole memory budget; the draft model is
small and holds at most what the target holds (the running requests' tokens and a few drafts),
so its cache starts small and grows with use instead of claiming memory up front.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from truffula.layers.attention import Attention

log = logging.getLogger("truffula.speculative")

FIRST_BLOCKS = 64
"""Blocks allocated at start-up (grown by doubling as requests need more)."""


@dataclass(eq=False)
class DraftSeq:
    """What the draft model holds of one request."""

    tokens: list[int] = field(default_factory=list)
    """The tokens whose keys and values are in the cache, position by position (known tokens,
    then the drafts fed to propose the next draft)."""
    blocks: list[int] = field(default_factory=list)
    confirmed: int = 0
    """Leading ``tokens`` known to equal the request's tokens (checked at the last proposal)."""


class DraftCache:
    """One [slots, kv_heads, head_dim] key and value tensor per attention layer of the draft
    model, in blocks of ``block_size`` slots; block 0 is the null block no request owns."""

    def __init__(
        self,
        attn_layers: list[Attention],
        block_size: int,
        max_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.attn_layers = attn_layers
        self.block_size = block_size
        self.max_blocks = max(2, max_blocks)
        self.device = device
        self.dtype = dtype
        self.num_blocks = 0
        self.free: list[int] = []
        self._grow(min(FIRST_BLOCKS, self.max_blocks))

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def _grow(self, num_blocks: int) -> None:
        """Reallocate to ``num_blocks`` blocks, keeping the contents of the old ones."""
        slots, old = num_blocks * self.block_size, self.num_blocks * self.block_size
        new = [  # all allocated before any is bound: out of memory leaves the cache as it was
            torch.zeros(
                (2, slots, a.num_kv_heads, a.head_dim), dtype=self.dtype, device=self.device
            )
            for a in self.attn_layers
        ]
        for a, kv in zip(self.attn_layers, new, strict=True):
            if old:
                kv[0, :old], kv[1, :old] = a.k_cache, a.v_cache
            a.bind_cache(kv[0], kv[1])
        self.free += range(max(1, self.num_blocks), num_blocks)
        self.num_blocks = num_blocks

    def reserve(self, seq: DraftSeq, length: int) -> bool:
        """Give ``seq`` blocks for ``length`` tokens; False (nothing taken) when the cache is
        at its limit."""
        need = -(-length // self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > len(self.free):
            if self.used_blocks + need + 1 > self.max_blocks:
                return False
            target = self.num_blocks
            while target - 1 - self.used_blocks < need:
                target *= 2
            try:
                self._grow(min(target, self.max_blocks))
            except torch.OutOfMemoryError:
                # the device is full (the target's cache took its share): grow no more; the
                # requests that do not fit are served without drafts
                log.warning(
                    "the draft model's KV cache cannot grow past %d blocks: out of memory",
                    self.num_blocks,
                )
                self.max_blocks = self.num_blocks
                return False
        seq.blocks += [self.free.pop() for _ in range(need)]
        return True

    def truncate(self, seq: DraftSeq, length: int) -> None:
        """Keep the first ``length`` tokens of ``seq`` (the blocks past them are freed)."""
        del seq.tokens[length:]
        keep = -(-length // self.block_size)
        self.free += seq.blocks[keep:]
        del seq.blocks[keep:]
        seq.confirmed = min(seq.confirmed, length)

    def release(self, seq: DraftSeq) -> None:
        self.truncate(seq, 0)
