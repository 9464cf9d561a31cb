"""What the scheduler knows of one request (``SeqState``): its tokens, blocks and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from truffula.sampling.state import SamplingState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SeqState:
    """What the scheduler knows of a request. Only the scheduler writes it: the engine reports
    sampled tokens, placeholders, drafts and lost steps through ``Scheduler``'s methods."""

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
    sampling: SamplingState | None = None
    """The request's sampling state (owned by the engine's record of the request), handed to
    the runner with each step that runs it; None for a request that never samples (tests)."""

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed
