"""The engine's side of speculation: drafts for the running requests before each step (handed
to the scheduler, ``Scheduler.set_drafts``), and the count of what was drafted and accepted.
Drafts come from prompt lookup (``ngram``) or a draft model (``draft_model``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from truffula.models.registry import LoadedModel
from truffula.scheduler.seq import SeqState, SeqStatus
from truffula.speculative import ngram
from truffula.speculative.config import SpeculativeConfig
from truffula.speculative.draft_model import DraftModel, Target, preload

MAX_WAIT = {"ngram": 16, "draft_model": 64}
"""Longest pause after misses, by method: a rejected prompt-lookup round costs a verify step
(1.2 plain steps at batch 1 on an H200), a draft model's also its own forwards (about 1.7 more
for a 1B draft of an 8B target), so at 16 a draft model that never agrees still cost 11%
(0.89x); at 64, about 4%."""


class Drafted(Protocol):
    """What the drafter reads of a request (``engine.core.Request``)."""

    @property
    def seq(self) -> SeqState: ...
    @property
    def output_ids(self) -> list[int]: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def speculative(self) -> bool: ...


class Drafter:
    def __init__(
        self,
        config: SpeculativeConfig,
        max_len: int,
        target: Target | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        """``target``: the target model's runner, which a draft model is loaded beside;
        ``loaded``: the draft model's weights if already loaded (``preload``)."""
        self.model: DraftModel | None = None
        if config.method == "draft_model":
            if config.model is None or target is None:
                raise ValueError("--speculative-config: draft_model needs a model and a target")
            self.model = DraftModel.load(config.model, target, loaded=loaded)
        elif config.method != "ngram":
            raise ValueError(f"--speculative-config: method {config.method!r} is not served")
        self.config = config
        self.max_wait = MAX_WAIT[config.method]
        self.max_len = max_len
        self.drafted = 0
        """Tokens proposed since start-up."""
        self.accepted = 0
        """Proposed tokens the target model confirmed."""
        self._history: dict[str, ngram.History] = {}
        self._backoff: dict[str, tuple[int, int]] = {}
        """Request -> (steps to skip drafting, the next wait after another miss)."""

    @staticmethod
    def preload(
        config: SpeculativeConfig | None,
        device: torch.device,
        dtype: torch.dtype,
        max_len: int | None,
    ) -> LoadedModel | None:
        """A draft model's weights, loaded before the target's KV cache is sized."""
        if config is None or config.method != "draft_model" or config.model is None:
            return None
        return preload(config.model, device, dtype, max_len)

    def draft(self, requests: Iterable[Drafted]) -> dict[str, list[int]]:
        """The drafts of the coming step, by request (those without drafts left out): up to
        ``num_speculative_tokens``, never past its length limits; none for a request that
        opted out, is prefilling, has tokens in flight or is pausing after a miss."""
        cfg = self.config
        live, running = set(), set()
        drafts: dict[str, list[int]] = {}
        wanted: list[tuple[str, list[int], int]] = []  # the draft model's, batched
        for req in requests:
            seq = req.seq
            live.add(seq.request_id)
            if seq.status is SeqStatus.RUNNING:
                running.add(seq.request_id)
            skip, wait = self._backoff.get(seq.request_id, (0, 1))
            if skip:
                self._backoff[seq.request_id] = (skip - 1, wait)
                continue
            if (
                not req.speculative
                or seq.status is not SeqStatus.RUNNING
                or seq.num_pending != 1
                or seq.unresolved
            ):
                continue
            room = min(
                cfg.num_speculative_tokens,
                req.max_new_tokens - len(req.output_ids) - 1,
                self.max_len - len(seq.token_ids) - 1,
            )
            if room > 0 and self.model is not None:
                wanted.append((seq.request_id, seq.token_ids, room))
            elif room > 0:
                history = self._history.setdefault(seq.request_id, ngram.History())
                tokens = history.sync(seq.token_ids)  # no placeholders: none are unresolved
                proposed = ngram.propose(tokens, room, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
                if proposed:
                    drafts[seq.request_id] = proposed
                    self.drafted += len(proposed)
        for table in (self._backoff, self._history):
            for rid in [r for r in table if r not in live]:
                del table[rid]
        if self.model is not None:
            self.model.retain(running)  # preempted requests recompute: their drafts start over
            drafts = self.model.propose(wanted)
            self.drafted += sum(len(d) for d in drafts.values())
        return drafts

    def release(self, request_id: str) -> None:
        """A request left the engine (finished, aborted or failed): forget it."""
        self._history.pop(request_id, None)
        self._backoff.pop(request_id, None)
        if self.model is not None:
            self.model.release(request_id)

    @property
    def num_states(self) -> int:
        """Requests the drafter holds state of (histories, waits, draft-model caches)."""
        held = set(self._history) | set(self._backoff)
        if self.model is not None:
            held |= set(self.model.seqs)
        return len(held)

    def verified(self, request_id: str, drafted: int, accepted: int) -> None:
        """A step verified ``drafted`` tokens of the request and kept ``accepted``. A miss (none
        kept) pauses its drafts for 1, 2, 4, ... up to ``MAX_WAIT`` steps, so text that does
        not repeat itself, or that the draft model does not foresee, pays for few rejected
        drafts; a hit resumes drafting every step."""
        self.accepted += accepted
        if accepted:
            self._backoff.pop(request_id, None)
        elif drafted:
            _, wait = self._backoff.get(request_id, (0, 1))
            self._backoff[request_id] = (wait, min(2 * wait, self.max_wait))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
