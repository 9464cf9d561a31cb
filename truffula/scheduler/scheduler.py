"""Token-budget continuous batching.

The rule, in one sentence: every request has ``num_computed`` tokens in the KV cache and
``len(token_ids)`` known tokens; each step gives each running request up to the difference,
within a shared token budget, decodes (one token) first so they never starve; a long prompt is
simply a request whose difference is larger than the budget left (chunked prefill). In a step
that decodes, prefill tokens are further held to ``max_prefill_while_decoding`` (when set), so
new prompts lengthen the running requests' steps by a bounded amount, while the running decodes
outnumber the requests waiting to start; a burst (as many waiting as running) gets the whole
budget (``_prefill_cap``).

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

from collections import deque
from collections.abc import Callable, Mapping

from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.output import PLACEHOLDER, ScheduledSeq, SchedulerOutput
from truffula.scheduler.prefix_cache import PrefixCache
from truffula.scheduler.seq import SeqState, SeqStatus

__all__ = ["AdmitHook", "ReleaseHook", "Scheduler", "SeqState", "SeqStatus"]


AdmitHook = Callable[[SeqState], int | None]
"""Asked before a waiting request runs: the device slot of its adapter (-1: the base model),
or None while it cannot run yet."""
ReleaseHook = Callable[[SeqState], None]
"""Told when a request gives its adapter slot back (finished, preempted, or not admitted after
all)."""


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        admit: AdmitHook | None = None,
        release: ReleaseHook | None = None,
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
            self._release(seq)
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
        prefill_left = self._prefill_cap(decodes_left, len(queue) - decodes_left, budget)
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
            if seq.unresolved or not self._admit(seq):
                held.append(seq)
                continue
            hit = self._take_prefix(seq)
            if self._computing_its_prefix(seq, chosen):
                self._release(seq)
                self._drop_prefix(seq)
                held.append(seq)  # its next block is being computed: a hit next step
                continue
            n = min(seq.num_pending, budget, prefill_left)
            if not self._grow(seq, n):
                self._release(seq)
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

    def _prefill_cap(self, decodes: int, prefilling: int, budget: int) -> int:
        """Prefill tokens this step may carry: the whole budget, unless the step decodes and
        the running decodes outnumber the requests waiting to start (queued ones that a running
        slot would admit, and those part-way through their prompts); then
        ``max_prefill_while_decoding``. When at least as many wait as run (a burst of
        arrivals), starting them is worth more than one slower step of the few already
        streaming, and a capped step would leave the batch small for as long as the queue
        takes to drain at the cap."""
        cap = self.max_prefill_while_decoding
        admissible = min(len(self.waiting), max(0, self.max_seqs - len(self.running)))
        if not cap or not decodes or admissible + prefilling >= decodes:
            return budget
        return cap

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

    # ---------------------------------------------------------------- what the engine reports
    def add_placeholder(self, request_id: str) -> int:
        """A launched step samples the request's next token: a ``PLACEHOLDER`` holds its place
        until it is read; returns its index in ``token_ids``."""
        seq = self._by_id[request_id]
        seq.token_ids.append(PLACEHOLDER)
        seq.unresolved += 1
        return len(seq.token_ids) - 1

    def append_token(self, request_id: str, token: int, placeholder: int | None = None) -> None:
        """A sampled token is known: appended, or written over its ``PLACEHOLDER``."""
        seq = self._by_id[request_id]
        if placeholder is None:
            seq.token_ids.append(token)
        else:
            seq.token_ids[placeholder] = token
            seq.unresolved -= 1

    def rewind(self, request_id: str, start_pos: int) -> None:
        """A step whose results are lost: its ``PLACEHOLDER`` tokens go, and the request computes
        again from ``start_pos`` (its blocks stay; the positions are written again)."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return
        while seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
            seq.token_ids.pop()
        seq.unresolved = 0
        seq.num_computed = min(seq.num_computed, start_pos, len(seq.token_ids) - 1)

    def set_drafts(self, drafts: Mapping[str, list[int]]) -> None:
        """The drafts of the coming step (``truffula.speculative``); a request not named has none."""
        for seq in self._by_id.values():
            seq.drafts = drafts.get(seq.request_id, [])

    def take_cached_records(self, request_id: str) -> dict[int, object]:
        """The prompt records its prefix hit brought (``SchedulerOutput.prefix_hits``), once."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return {}
        records, seq.cached_records = seq.cached_records, {}
        return records

    def offer_records(self, request_id: str, get: Callable[[int], object | None], k: int) -> None:
        """Keep a request's prompt records (``get(position)``, ``k`` alternatives) with the
        prefix-cache entries of its blocks."""
        seq = self._by_id.get(request_id)
        if seq is not None and self.prefix_cache is not None:
            self.prefix_cache.attach_records(seq, get, k)

    def records_delivered(self, request_id: str) -> None:
        """Its prompt records went out: a recompute after preemption needs none from a hit."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.prompt_records_k = -1

    # ---------------------------------------------------------------- helpers
    def _admit(self, seq: SeqState) -> bool:
        """Whether a waiting request may run now: the admission hook gives its adapter slot."""
        if self.admit is None or seq.adapter_slot >= 0:
            return True
        slot = self.admit(seq)
        if slot is None:
            return False
        seq.adapter_slot = slot
        return True

    def _release(self, seq: SeqState) -> None:
        if seq.adapter_slot >= 0:
            if self.release is not None:
                self.release(seq)
            seq.adapter_slot = -1

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
            sampling=seq.sampling,
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
        self._release(seq)
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
