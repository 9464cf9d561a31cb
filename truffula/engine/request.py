"""The engine's record of one request, and of a launched step whose results are not read yet."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from truffula.engine.messages import EngineRequest
from truffula.runner.launched import Launched
from truffula.runner.output import TokenLogprobs
from truffula.sampling.params import SamplingParams
from truffula.sampling.state import SamplingState
from truffula.scheduler.seq import SeqState


class MetricsSink(Protocol):
    def request_finished(self, req: Request, reason: str) -> None: ...
    def first_token(self, req: Request) -> None: ...


@dataclass(eq=False)
class Request:
    """The engine's state of one request, its one owner: made by ``EngineCore.add``, dropped by
    ``EngineCore._finish``. The scheduler owns ``seq`` (the engine reads it and reports through
    the scheduler's methods); ``sampling`` rides to the runner with every step that runs it."""

    spec: EngineRequest
    seq: SeqState
    sampling: SamplingState
    prompt_records: dict[int, TokenLogprobs] = field(default_factory=dict)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    in_flight: int = 0
    """Tokens sampled by launched steps whose results are not read yet."""

    @property
    def output_ids(self) -> list[int]:
        """The output tokens read so far (the same list penalties count)."""
        return self.sampling.output_ids

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def prompt_ids(self) -> list[int]:
        return self.spec.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.spec.params

    @property
    def max_new_tokens(self) -> int:
        return self.spec.max_new_tokens

    @property
    def speculative(self) -> bool:
        """Drafts may be verified for it (not for constrained output)."""
        return self.spec.params.speculative and self.spec.params.structured is None

    @property
    def arrival(self) -> float:
        return self.spec.arrival


@dataclass(eq=False)
class InFlight:
    launched: Launched
    placeholders: dict[str, int | None]
    """Request -> index of its ``PLACEHOLDER`` in ``seq.token_ids`` (None: its last token)."""
