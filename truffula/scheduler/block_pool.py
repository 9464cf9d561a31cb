"""Fixed-size KV-cache blocks: a free list, reference counts and the evictable cached blocks.

Block 0 is the null block: never handed out, it absorbs writes of padding tokens (CUDA graphs).

A block the prefix cache holds (``mark_cached``) does not return to the free list when its last
reference goes: it waits in an LRU list, still findable, until an allocation finds the free list
empty and evicts the least recently released one (``on_evict`` tells the prefix cache). Both
lists count as free: a cached block costs nothing the pool needs.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks no one holds, least recently released first."""
        self._cached = [False] * num_blocks
        self._refs = [0] * num_blocks
        self.on_evict: Callable[[int], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (free ones and evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def capacity(self) -> int:
        """Blocks a single sequence could ever hold."""
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._cached[b] = False
                if self.on_evict is not None:
                    self.on_evict(b)
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Another owner holds these blocks too (forks, shared prefixes); a cached block no one
        held leaves the evictable list."""
        for b in blocks:
            if self._refs[b] <= 0:
                if not self._cached[b] or b not in self._evictable:
                    raise ValueError(f"block {b} is not allocated")
                del self._evictable[b]
            self._refs[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list, or to
        the end of the evictable list when cached (give a sequence's blocks last first, so its
        tail is evicted before the prefix other requests may share)."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._cached[b]:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def mark_cached(self, block: int) -> None:
        """The prefix cache holds this (allocated) block: keep it findable once released."""
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self._cached[block] = True

    def uncache(self, block: int) -> None:
        """The prefix cache let this block go: once released it is simply free."""
        self._cached[block] = False
        if block in self._evictable:
            del self._evictable[block]
            self._free.append(block)

    def is_cached(self, block: int) -> bool:
        return self._cached[block]

    def ref_count(self, block: int) -> int:
        return self._refs[block]
