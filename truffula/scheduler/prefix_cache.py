"""Automatic prefix caching: full KV blocks found again by what precedes and fills them.

A full block of a sequence is keyed by a chained 128-bit BLAKE2b hash (``block_key``) over its
parent block's key, the model's identity, the request's cache salt (adapter key and load
generation, or merge specification; empty for the base model) and the block's token ids. A hit
is also checked exactly: the entry's token ids and salt must equal the request's and its
parent's serial must be the serial of the entry hit just before it (serials are never reused),
so a hash collision or an evicted-and-reused parent can cost a hit, never serve wrong KV.

Lifecycle of a block: a sequence computes it; once every token in it is known (no
``PLACEHOLDER``) and computed, ``register`` puts it in the table and marks it cached in the
pool. Requests that hit it share it through the pool's reference counts; when no one holds it,
it waits in the pool's LRU list until an allocation evicts it (``_evicted`` drops the entry).

Prompt records. Each entry may also keep the prompt-logprob records (opaque here: the engine's
``TokenLogprobs``, with ``records_k`` alternatives) of the targets at its positions: entry ``j``
covers targets ``j*B .. j*B+B-1`` (position 0 has none), which depend only on tokens up to the
block's end, so on the chain. The target just past the block (the first of the next block) is
predicted by the block's last position but depends on the next token: it is kept as ``next``,
with that token, and serves a hit that stops there only when the token matches. A request that
wants prompt records takes the longest hit whose records (and boundary record) are all present
with enough alternatives; the rest it computes, and its records fill the entries for later.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.output import PLACEHOLDER

if TYPE_CHECKING:
    from truffula.scheduler.seq import SeqState

HashFn = Callable[[bytes, bytes, bytes, Sequence[int]], bytes]


def block_key(parent: bytes, model: bytes, salt: bytes, tokens: Sequence[int]) -> bytes:
    """128-bit BLAKE2b of (parent key, model identity, cache salt, token ids)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (parent, model, salt):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass(eq=False)
class CachedBlock:
    block_id: int
    key: bytes
    tokens: tuple[int, ...]
    salt: bytes
    parent_serial: int
    """Serial of the entry before it in the chain (0: the sequence's first block)."""
    serial: int
    records: list[object] | None = None
    """Prompt records of targets ``j*B .. j*B+B-1`` (None at position 0)."""
    records_k: int = -1
    next_token: int = -1
    next_record: object | None = None


@dataclass
class PrefixHit:
    blocks: list[CachedBlock]
    records: dict[int, object]
    """Prompt position -> record, for the request's prompt positions the hit covers."""


class PrefixCache:
    def __init__(
        self, pool: BlockPool, block_size: int, model_id: str, hash_fn: HashFn = block_key
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.model = model_id.encode()
        self.hash_fn = hash_fn
        self.table: dict[bytes, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._serials = 0
        self.queries = 0
        """Tokens of admitted requests looked up (prompt and, after preemption, output)."""
        self.hits = 0
        """Of those, tokens served from cached blocks."""
        pool.on_evict = self._evicted

    # ---------------------------------------------------------------- keys
    def _keys(self, seq: SeqState, n: int) -> list[bytes]:
        """Keys of the sequence's first ``n`` full blocks (memoized on the sequence)."""
        keys, bs = seq.block_keys, self.block_size
        while len(keys) < n:
            j = len(keys)
            parent = keys[-1] if keys else b""
            keys.append(
                self.hash_fn(
                    parent, self.model, seq.cache_salt, seq.token_ids[j * bs : (j + 1) * bs]
                )
            )
        return keys

    def _entry(
        self, key: bytes, tokens: Sequence[int], salt: bytes, parent: int
    ) -> CachedBlock | None:
        """The table's entry for ``key`` if it holds exactly this content."""
        e = self.table.get(key)
        if (
            e is None
            or e.parent_serial != parent
            or e.salt != salt
            or list(e.tokens) != list(tokens)
        ):
            return None
        return e

    # ---------------------------------------------------------------- lookup
    def lookup(self, seq: SeqState) -> PrefixHit:
        """The cached blocks a waiting sequence can start from (possibly none). At least one of
        its tokens is left to compute, so that it samples; blocks with unknown tokens end it."""
        bs = self.block_size
        tokens = seq.token_ids
        limit = (len(tokens) - 1) // bs
        hits: list[CachedBlock] = []
        parent = 0
        for j, key in enumerate(self._keys_known(seq, limit)):
            e = self._entry(key, tokens[j * bs : (j + 1) * bs], seq.cache_salt, parent)
            if e is None:
                break
            hits.append(e)
            parent = e.serial
        records: dict[int, object] = {}
        k = seq.prompt_records_k
        if k >= 0 and hits:
            m = self._records_cover(hits, seq, k)
            hits = hits[:m]
            for j, e in enumerate(hits):
                if j * bs >= seq.prompt_len:
                    break
                assert e.records is not None
                for i, rec in enumerate(e.records):
                    if rec is not None and j * bs + i < seq.prompt_len:
                        records[j * bs + i] = rec
            end = len(hits) * bs
            if hits and end < seq.prompt_len:
                records[end] = hits[-1].next_record
        return PrefixHit(hits, records)

    def _keys_known(self, seq: SeqState, limit: int) -> list[bytes]:
        bs = self.block_size
        tokens = seq.token_ids
        n = min(len(seq.block_keys), limit)
        while n < limit and PLACEHOLDER not in tokens[n * bs : (n + 1) * bs]:
            n += 1
        return self._keys(seq, n)[:n]

    def key_at(self, seq: SeqState, j: int) -> bytes | None:
        """Key of the sequence's block ``j``, if that block is full and its tokens known."""
        keys = self._keys_known(seq, min(j + 1, len(seq.token_ids) // self.block_size))
        return keys[j] if j < len(keys) else None

    def _records_cover(self, hits: list[CachedBlock], seq: SeqState, k: int) -> int:
        """Longest prefix of ``hits`` whose prompt records, and the record of the target right
        after it, are all kept with at least ``k`` alternatives."""
        bs, plen = self.block_size, seq.prompt_len
        m = 0
        while m < len(hits) and (m * bs >= plen or _has_records(hits[m], k)):
            m += 1
        while m > 0:
            end = m * bs
            last = hits[m - 1]
            if end >= plen or (
                last.next_record is not None
                and last.records_k >= k
                and last.next_token == seq.token_ids[end]
            ):
                return m
            m -= 1
        return 0

    def count(self, seq: SeqState, hit_tokens: int) -> None:
        """Count an admitted sequence's lookup (metrics)."""
        self.queries += len(seq.token_ids)
        self.hits += hit_tokens

    # ---------------------------------------------------------------- register
    def register(self, seq: SeqState) -> None:
        """Enter the sequence's full, computed blocks whose tokens are all known."""
        bs = self.block_size
        serials = seq.block_serials
        full = min(seq.num_computed // bs, len(seq.block_ids))
        done = len(serials)
        if done >= full:
            return
        for j, key in enumerate(self._keys_known(seq, full)[done:], start=done):
            tokens = seq.token_ids[j * bs : (j + 1) * bs]
            parent = serials[-1] if serials else 0
            e = self._entry(key, tokens, seq.cache_salt, parent)
            if e is None:
                self._serials += 1
                if key in self.table:  # a true collision: the block stays out of the table
                    serials.append(self._serials)
                    continue
                block = seq.block_ids[j]  # freshly computed: never an entry already
                e = CachedBlock(block, key, tuple(tokens), seq.cache_salt, parent, self._serials)
                self.table[key] = e
                self._by_block[block] = e
                self.pool.mark_cached(block)
            serials.append(e.serial)

    def attach_records(self, seq: SeqState, get: Callable[[int], object | None], k: int) -> None:
        """Keep the sequence's prompt records (``get(position)``, ``k`` alternatives each) with
        its registered blocks that lack them (or hold fewer alternatives)."""
        bs, plen = self.block_size, seq.prompt_len
        j = seq.records_attached
        while j < len(seq.block_serials) and (j + 1) * bs <= plen:
            e = self._entry_of(seq, j)
            if e is not None and e.records_k < k:
                recs = [get(p) for p in range(j * bs, (j + 1) * bs)]
                if any(r is None for r in recs[1 if j == 0 else 0 :]):
                    return
                e.records, e.records_k = recs, k
                e.next_record, e.next_token = None, -1
            if e is not None and e.records_k == k and e.next_record is None and (j + 1) * bs < plen:
                nxt = get((j + 1) * bs)
                if nxt is None:
                    return
                e.next_record, e.next_token = nxt, seq.token_ids[(j + 1) * bs]
            j += 1
            seq.records_attached = j

    def _entry_of(self, seq: SeqState, j: int) -> CachedBlock | None:
        e = self.table.get(seq.block_keys[j])
        return e if e is not None and e.serial == seq.block_serials[j] else None

    # ---------------------------------------------------------------- eviction
    def _evicted(self, block: int) -> None:
        e = self._by_block.pop(block, None)
        if e is not None and self.table.get(e.key) is e:
            del self.table[e.key]

    def reset(self) -> None:
        """Forget every cached block (those in use stay with their requests)."""
        for block in self._by_block:
            self.pool.uncache(block)
        self.table.clear()
        self._by_block.clear()

    @property
    def num_cached_blocks(self) -> int:
        return len(self.table)


def _has_records(e: CachedBlock, k: int) -> bool:
    return e.records is not None and e.records_k >= k
