"""One request's sampling state: made once, when the engine adds the request, and owned by the
engine's record of it (``truffula.engine.request.Request``). The scheduler hands it to the
runner with every step that runs the request (``ScheduledSeq.sampling``); the runner reads it to
sample the request's rows and keeps nothing of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from truffula.sampling.params import SamplingParams
from truffula.structured.compiler import Constraint, GrammarCompiler


@dataclass(eq=False)
class SamplingState:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    """Every output token the engine has read (the history penalties count); ``accept`` grows
    it, one token at a time."""
    generator: torch.Generator | None = None
    """A seeded request's RNG (None: unseeded or greedy), advanced only by its own rows."""
    constraint: Constraint | None = None
    """Structured-output matcher, advanced by each token the engine reads."""
    prompt_lp_next: int = 1
    """Next prompt position whose logprob is still to be computed: the runner moves it on as it
    launches prompt-logprob jobs, a failed step moves it back (``truffula.engine.isolation``)."""

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_ids: list[int],
        device: torch.device,
        grammars: GrammarCompiler | None = None,
    ) -> SamplingState:
        """A new request's state: its RNG seeded, its grammar's matcher made (``grammars``)."""
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        constraint = None
        if params.structured is not None:
            assert grammars is not None, "structured output needs the engine's grammars"
            constraint = grammars.constraint(params.structured)
        return cls(params, prompt_ids, generator=gen, constraint=constraint)

    def accept(self, token: int) -> None:
        """A sampled token the engine read: penalties count it, the matcher advances by it."""
        self.output_ids.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
