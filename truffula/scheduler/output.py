"""Plain data the scheduler hands to the runner each step (no tensors, no model objects; each
sequence carries a reference to its request's sampling state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from truffula.sampling.state import SamplingState

PLACEHOLDER = -1
"""A token id not known on the host yet: sampled by a step still in flight, whose device result
the runner feeds to the next step directly (asynchronous scheduling)."""


@dataclass(frozen=True)
class ScheduledSeq:
    request_id: str
    token_ids: list[int]
    """Tokens computed this step (one for a decode, a chunk for a prefill); a decode's token may
    be ``PLACEHOLDER``, the one the previous step sampled."""
    start_pos: int
    """Position of ``token_ids[0]``: tokens already in the KV cache."""
    block_ids: list[int]
    """The whole block table of the sequence after this step's allocation."""
    sample: bool
    """The chunk reaches the last known token: sample the next one."""
    adapter_slot: int = -1
    """Device LoRA slot of the request's adapter, -1 for the base model."""
    num_drafts: int = 0
    """Speculated tokens at the end of ``token_ids``: every position from the last known token
    on is sampled, and the drafts the samples confirm are accepted."""
    sampling: SamplingState | None = None
    """What the runner samples the request's rows with (parameters, RNG, matcher, the token
    history penalties count) and the prompt logprobs it still owes; the engine owns it."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.sample and len(self.token_ids) == 1 and self.start_pos > 0


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    """Decodes first, then prefill chunks."""
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    """Requests that left since the last step."""
    prefix_hits: list[str] = field(default_factory=list)
    """Requests admitted this step with prompt records from the prefix cache
    (``SeqState.cached_records``) for the engine to take."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs
