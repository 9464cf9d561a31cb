"""The engine's side of the prefix cache (``truffula.scheduler.prefix_cache``): what besides
its tokens shapes a request's KV (its cache salt), the prompt records a hit brings, and the
records a request computes, kept with its blocks for later hits.

Prompt records are computed with the largest k a request may ask (``max_k_alternatives``), cold
or not, so that a record any request computed serves any later request; each request's records
are cut to its own k when sent (``cut``). A hit therefore returns the numbers of a cold prefill.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

from truffula.runner.output import TokenLogprobs
from truffula.scheduler.block_pool import BlockPool
from truffula.scheduler.prefix_cache import PrefixCache
from truffula.scheduler.seq import SeqState

if TYPE_CHECKING:
    from truffula.adapters.store import AdapterStore
    from truffula.engine.request import Request
    from truffula.sampling.params import SamplingParams
    from truffula.sampling.state import SamplingState
    from truffula.scheduler.output import SchedulerOutput
    from truffula.scheduler.scheduler import Scheduler

log = logging.getLogger("truffula.engine")


class PromptCache:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        model_id: str,
        adapters: AdapterStore,
        records_k: int,
        enabled: bool,
    ) -> None:
        self.adapters = adapters
        self.cache = PrefixCache(pool, block_size, model_id) if enabled else None
        self.records_k = records_k if enabled else 0
        """The k of the prompt records computed (0: each request's own; no cache)."""
        self._loads: dict[int, tuple[weakref.ref[object], int]] = {}
        """id of an adapter's host weights -> (a reference to them, their load serial)."""
        self._serials = itertools.count(1)
        if enabled:
            log.info(
                "prefix caching: on (full %d-token blocks keyed by 128-bit BLAKE2b hashes and "
                "checked against their tokens; prompt records kept with %d alternatives)",
                block_size,
                records_k,
            )
        else:
            log.info("prefix caching: off")

    def new_seq(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sampling: SamplingState,
    ) -> SeqState:
        """The scheduler's record of a new request, with what the prefix cache needs of it: its
        salt, and the k of the prompt records a hit must bring (-1: none asked)."""
        return SeqState(
            request_id,
            list(prompt_ids),
            len(prompt_ids),
            adapter=params.adapter_id,
            cache_salt=self.salt(params.adapter_id),
            prompt_records_k=params.prompt_k_alternatives if params.wants_prompt_logprobs else -1,
            sampling=sampling,
        )

    def salt(self, adapter_key: str | None) -> bytes:
        """The request's cache salt: its adapter's key (a merge's key is its specification) and
        which load of it (an adapter read again from disk may hold other weights); b"": base."""
        if adapter_key is None or self.cache is None:
            return b""
        weights = self.adapters.host.get(adapter_key)
        if weights is None:
            load = next(self._serials)  # unknown: shared with no one
        else:
            known = self._loads.get(id(weights))
            if known is None or known[0]() is not weights:
                if len(self._loads) > 4096:  # forget loads long gone
                    self._loads = {i: v for i, v in self._loads.items() if v[0]() is not None}
                known = self._loads[id(weights)] = (weakref.ref(weights), next(self._serials))
            load = known[1]
        return f"{adapter_key}#{load}".encode()

    def take_records(
        self, sched: SchedulerOutput, requests: Mapping[str, Request], scheduler: Scheduler
    ) -> None:
        """Give the requests this step admitted with a prefix hit the prompt records it
        brought (the runner computes only the positions after it)."""
        for rid in sched.prefix_hits:
            req = requests.get(rid)
            if req is None:
                continue
            for pos, rec in scheduler.take_cached_records(rid).items():
                assert isinstance(rec, TokenLogprobs)
                req.prompt_records.setdefault(pos, rec)

    def keep_records(self, scheduler: Scheduler, req: Request) -> None:
        """Offer a request's prompt records to the cache entries of its blocks."""
        if self.cache is not None:
            scheduler.offer_records(req.request_id, req.prompt_records.get, self.records_k)


def cut(rec: TokenLogprobs | None, k: int) -> TokenLogprobs | None:
    """A prompt record with at most ``k`` alternatives (they are computed at the widest k)."""
    if rec is None or len(rec.top_ids) <= k:
        return rec
    return TokenLogprobs(
        rec.token_id, rec.logprob, rec.rank, rec.entropy, rec.top_ids[:k], rec.top_logprobs[:k]
    )
