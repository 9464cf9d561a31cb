"""Token-budget continuous batching.

The rule, in one sentence: every request has ``num_computed`` tokens in the KV cache and
``len(token_ids)`` known tokens; each step gives each running request up to the difference,
within a shared token budget, decodes (one token) first so they never starve; a long prompt is
simply a request whose difference is larger than the budget left (chunked prefill). In a step
that decodes, prefill tokens are further held to ``max_prefill_while_decoding`` (when set), so
a burst of new prompts lengthens the running requests' steps by a bounded amount.

Step by step (``schedule``):
1. Running requests, oldest first. A decode gets 1 token. A prefill gets
   ``min(remaining, budget - decodes still to serve, prefill cap left)``. Blocks for the new tokens are allocated;
   when the pool is empty the newest running request is preempted (blocks freed, tokens kept,
   requeued at the front of the waiting queue to be recomputed later).
2. Waiting requests, in order, while budget, running-slot and block limits allow. A request
   whose admission hook (adapter slots) says "not yet", or a preempted one whose last token is
   still in flight, keeps its place and the next one is tried, so a busy adapter never blocks
   the base model. Waiting requests never preempt.
3. The result lists decodes first, then prefill chunks.

With a prefix cache (``prefix_cache.py``), a waiting request that has computed nothing first
takes the cached blocks of its longest cached prefix (shared through the pool's reference
counts) and starts from there; ``step_done`` registers every block that became full.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.output import ScheduledSeq, SchedulerOutput
from truffula.scheduler.prefix_cache import PrefixCache


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SeqState:
    """What the scheduler knows of a request. The engine appends sampled tokens to ``token_ids``."""

    request_id: str
    token_ids: list[int]
    prompt_len: int
    arrival: int = 0
    adapter: str | None = None
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    adapter_slot: int = -1
    unresolved: int = 0
    """``PLACEHOLDER`` tokens at the end of ``token_ids`` (sampled by a step in flight)."""
    cache_salt: bytes = b""
    """What besides the tokens shapes its KV: the adapter (key and load) or merge; b"": base."""
    prompt_records_k: int = -1
    """Alternatives the prompt records it still needs must carry (-1: it needs none); a prefix
    hit must bring the records of every prompt position it covers."""
    block_keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of its first full, known blocks (they depend on tokens only)."""
    block_serials: list[int] = field(default_factory=list)
    """Prefix-cache serial of the content of each of its first blocks (hit or registered)."""
    records_attached: int = 0
    """Blocks whose prompt records were offered to the prefix cache."""
    cached_records: dict[int, object] = field(default_factory=dict)
    """Prompt records a prefix hit brought, for the engine to take (position -> record)."""
    num_cached_tokens: int = 0
    """Tokens its last admission took from the prefix cache."""
    drafts: list[int] = field(default_factory=list)
    """Speculated tokens after its last known one, verified with its next decode
    (``truffula.speculative``); never part of ``token_ids`` until accepted."""

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed


AdmitHook = Callable[[SeqState], bool]


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        admit: AdmitHook | None = None,
        release: Callable[[SeqState], None] | None = None,
        max_prefill_while_decoding: int = 0,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.max_prefill_while_decoding = max_prefill_while_decoding
        self.block_size = block_size
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.admit = admit
        self.release = release
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self._by_id: dict[str, SeqState] = {}
        self._finished_since_step: list[str] = []
        self._hits_since_step: list[str] = []
        self._arrivals = 0

    # ---------------------------------------------------------------- requests in and out
    def add(self, seq: SeqState) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self._arrivals += 1
        seq.arrival = self._arrivals
        seq.status = SeqStatus.WAITING
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, request_id: str) -> None:
        """Remove a request (done or aborted) and free everything it holds."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return
        if self.prefix_cache is not None and seq.status is SeqStatus.RUNNING:
            self.prefix_cache.register(seq)  # tokens resolved since its last step
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            if self.release is not None:
                self.release(seq)
        else:
            self.waiting.remove(seq)
        self._free_blocks(seq)
        seq.status = SeqStatus.FINISHED
        self._finished_since_step.append(request_id)

    def get(self, request_id: str) -> SeqState | None:
        return self._by_id.get(request_id)

    @property
    def num_requests(self) -> int:
        return len(self._by_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        budget = self.max_tokens
        chosen: list[tuple[SeqState, int]] = []
        preempted: list[str] = []
        queue = sorted(self.running, key=lambda s: s.arrival)
        decodes_left = sum(1 for s in queue if s.num_pending == 1)
        cap = self.max_prefill_while_decoding
        prefill_left = cap if cap and decodes_left else budget
        i = 0
        while i < len(queue) and budget > 0:
            seq = queue[i]
            is_decode = seq.num_pending == 1
            if is_decode:
                decodes_left -= 1
            if is_decode:  # drafted tokens ride along while the budget has room
                n = 1 + min(len(seq.drafts), max(0, budget - 1 - decodes_left))
            else:
                n = min(seq.num_pending, budget - decodes_left, prefill_left)
            if n <= 0:
                i += 1
                continue
            while not self._grow(seq, n):
                victim = queue.pop()  # the newest running request not yet scheduled
                if victim.num_pending == 1 and victim is not seq:
                    decodes_left -= 1
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                chosen.append((seq, n))
                budget -= n
                if not is_decode:
                    prefill_left -= n
                i += 1
                continue
            break  # the request being scheduled preempted itself: nothing newer is left
        held: list[SeqState] = []  # waiting requests whose admission hook said "not yet"
        while self.waiting and min(budget, prefill_left) > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting.popleft()
            if seq.unresolved or (self.admit is not None and not self.admit(seq)):
                held.append(seq)
                continue
            hit = self._take_prefix(seq)
            if self._computing_its_prefix(seq, chosen):
                if self.release is not None:
                    self.release(seq)
                self._drop_prefix(seq)
                held.append(seq)  # its next block is being computed: a hit next step
                continue
            n = min(seq.num_pending, budget, prefill_left)
            if not self._grow(seq, n):
                if self.release is not None:
                    self.release(seq)
                self._drop_prefix(seq)
                self.waiting.appendleft(seq)
                break
            if self.prefix_cache is not None:
                self.prefix_cache.count(seq, hit)
                if seq.cached_records:
                    self._hits_since_step.append(seq.request_id)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n
            prefill_left -= n
        self.waiting.extendleft(reversed(held))
        seqs = [self._scheduled(seq, n) for seq, n in chosen]
        # single-token sequences first, grouped by adapter so LoRA kernels share weight reads
        seqs.sort(key=lambda s: (s.num_tokens != 1, s.num_tokens == 1 and s.adapter_slot))
        out = SchedulerOutput(seqs, preempted, self._finished_since_step, self._hits_since_step)
        self._finished_since_step = []
        self._hits_since_step = []
        return out

    def step_done(self, out: SchedulerOutput) -> None:
        """Mark the scheduled tokens as computed (their KV entries are now in the cache)."""
        for s in out.seqs:
            seq = self._by_id.get(s.request_id)
            if seq is not None and seq.status is SeqStatus.RUNNING:
                # drafted tokens count once accepted (``accept_drafts``)
                seq.num_computed = s.start_pos + s.num_tokens - s.num_drafts
                if self.prefix_cache is not None:
                    self.prefix_cache.register(seq)

    def accept_drafts(self, request_id: str, n: int) -> None:
        """``n`` drafted tokens of the last step were accepted (the engine appended them to
        ``token_ids``): their KV entries, written by that step, are now the sequence's."""
        seq = self._by_id.get(request_id)
        if seq is not None and seq.status is SeqStatus.RUNNING:
            seq.num_computed += n
            seq.drafts = []

    # ---------------------------------------------------------------- helpers
    def _scheduled(self, seq: SeqState, n: int) -> ScheduledSeq:
        start = seq.num_computed
        known = min(n, len(seq.token_ids) - start)
        drafts = seq.drafts[: n - known]
        return ScheduledSeq(
            request_id=seq.request_id,
            token_ids=seq.token_ids[start : start + known] + drafts,
            start_pos=start,
            block_ids=list(seq.block_ids),
            sample=start + known == len(seq.token_ids),
            adapter_slot=seq.adapter_slot,
            num_drafts=len(drafts),
        )

    def _take_prefix(self, seq: SeqState) -> int:
        """Start a sequence that holds no blocks from its longest usable cached prefix; returns
        the tokens it takes."""
        if self.prefix_cache is None or seq.block_ids or seq.num_computed:
            return 0
        hit = self.prefix_cache.lookup(seq)
        ids = [b.block_id for b in hit.blocks]
        self.pool.share(ids)
        seq.block_ids = ids
        seq.block_serials = [b.serial for b in hit.blocks]
        seq.num_computed = seq.num_cached_tokens = len(ids) * self.block_size
        seq.cached_records = hit.records
        return seq.num_computed

    def _computing_its_prefix(self, seq: SeqState, chosen: list[tuple[SeqState, int]]) -> bool:
        """Whether a request chosen this step computes the block this sequence would compute
        first (requests sharing a new prompt, /score continuations): then it waits a step and
        takes that block from the cache instead of computing it again."""
        if self.prefix_cache is None:
            return False
        bs = self.block_size
        first = seq.num_computed // bs
        key = self.prefix_cache.key_at(seq, first)
        if key is None:
            return False
        for other, n in chosen:
            if other.cache_salt == seq.cache_salt and other.num_pending > 1:
                lo, hi = other.num_computed // bs, -(-(other.num_computed + n) // bs)
                if lo <= first < hi and self.prefix_cache.key_at(other, first) == key:
                    return True
        return False

    def _drop_prefix(self, seq: SeqState) -> None:
        """Undo ``_take_prefix`` for a sequence that could not be admitted."""
        if self.prefix_cache is not None:  # a waiting sequence holds only its hit's blocks
            self._free_blocks(seq)
            seq.num_computed = seq.num_cached_tokens = 0
            seq.block_serials = []
            seq.cached_records = {}

    def _grow(self, seq: SeqState, n: int) -> bool:
        """Allocate blocks so that ``num_computed + n`` tokens fit; False if the pool is short."""
        need = -(-(seq.num_computed + n) // self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: SeqState) -> None:
        self.running.remove(seq)
        if self.release is not None:
            self.release(seq)
        self._free_blocks(seq)
        seq.num_computed = 0
        seq.block_serials = []
        seq.records_attached = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        # Preempted requests go back in front of the queue, oldest first.
        position = 0
        while position < len(self.waiting) and self.waiting[position].arrival < seq.arrival:
            if self.waiting[position].num_preemptions == 0:
                break
            position += 1
        self.waiting.insert(position, seq)

    def _free_blocks(self, seq: SeqState) -> None:
        if seq.block_ids:
            self.pool.free(reversed(seq.block_ids))  # the tail is evicted before the prefix
            seq.block_ids = []
