"""A step that raises fails only the request that made it fail, never the batch.

The core marks where its step is (``StepTrace``): the step being launched, the step being read,
the step launched by the call before (asynchronous scheduling: read by this call). When anything
in a launch or a read raises, ``StepIsolation.recover``:

1. puts the lost steps back (``rewind``): a step whose launch raised was never marked computed,
   so it only un-reports its prompt-logprob positions; a step whose results could not be read
   loses its ``PLACEHOLDER`` tokens and its requests go back to the first position it computed
   (their KV blocks stay; the positions are written again). A step launched before a failed
   launch is still good: it is read, and its tokens delivered.
2. makes the requests of the failed step suspects. One suspect is the culprit at once;
   more are split in two groups. While groups are left, each step runs the scheduled members of
   the first group that has any (everything else the scheduler chose waits, holding its blocks
   and adapter slot), synchronously; a group that passes is cleared, one that fails is split
   again, down to the one request that fails alone. If no suspect could be scheduled, the step
   runs the others, and fails like any step. A request that fails alone is finished with an
   error output (status 422 for a ``RequestValidationError``, 500 otherwise: the API answers 424,
   or an error event on a stream); the others finish with the tokens they would have had.

A device error that poisons the CUDA context (``device_lost``) cannot be recovered: ``recover``
raises it, the engine process exits, and the API answers 503 (docs/operations.md). An error
outside a launch or a read (the scheduler's own) is raised too; the engine loop then fails the
requests in flight.

Testing: ``TRUFFULA_FAULT_INJECT=<seed>:<after>`` in the engine's environment (or
``core.faults = FaultInjector(seed, after)``) makes a request whose ``seed`` is ``<seed>`` fail
its steps once it has ``<after>`` tokens: its ``top_k`` becomes 2^63, which overflows when the
runner builds the step's sampling tensors. Only whoever starts the engine can set it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from truffula.engine.messages import EngineOutput
from truffula.envs import TRUFFULA_FAULT_INJECT
from truffula.errors import RequestValidationError
from truffula.scheduler.output import SchedulerOutput

if TYPE_CHECKING:
    from truffula.engine.core import EngineCore
    from truffula.engine.request import InFlight
    from truffula.runner.output import RunnerOutput
    from truffula.runner.runner import Launched, ModelRunner

log = logging.getLogger("truffula.engine")

FAULT_ENV = TRUFFULA_FAULT_INJECT


@dataclass(eq=False)
class StepTrace:
    """Where the core's step is (``EngineCore._step_outputs``)."""

    prev: InFlight | None = None
    """Launched by the call before, read by this one (None once read)."""
    launching: SchedulerOutput | None = None
    """The step being launched."""
    current: Launched | None = None
    """Launched by this call."""
    reading: InFlight | None = None
    """The step whose results are being read."""
    sampling: Launched | None = None
    """The step whose deferred sampler is running (its forward pass issued, ``prev`` read)."""
    outputs: list[EngineOutput] = field(default_factory=list)
    """What this call produced so far (delivered even if the step fails)."""


def device_lost(exc: BaseException) -> bool:
    """An error after which the device cannot be used: a CUDA fault poisons the context."""
    if getattr(exc, "fatal", False):  # a tensor-parallel group out of step
        return True
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, getattr(torch, "AcceleratorError", ())):
        return True
    text = str(exc)
    return any(
        s in text for s in ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS")
    )


@dataclass
class FaultInjector:
    """Test hook: requests with ``seed`` fail their steps once they have ``after`` tokens."""

    seed: int
    after: int = 0

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        seed, _, after = spec.partition(":")
        log.warning("%s=%s: requests with seed %s will fail (a test hook)", FAULT_ENV, spec, seed)
        return cls(int(seed), int(after or 0))

    def poison(self, core: EngineCore, sched: SchedulerOutput) -> None:
        for s in sched.seqs:
            req = core.requests.get(s.request_id)
            if req is None or req.params.seed != self.seed:
                continue
            if len(req.output_ids) >= self.after:  # what the runner samples with, not the spec
                req.sampling.params = req.sampling.params.with_updates(top_k=2**63)


@dataclass(eq=False)
class StepIsolation:
    faults: FaultInjector | None = None
    """Test hook; None unless the engine's environment sets it."""
    groups: deque[list[str]] = field(default_factory=deque)
    """Suspects still to clear, one group per step."""
    ran: list[str] = field(default_factory=list)
    """The suspects the step being run holds (empty: not isolating)."""
    trace: StepTrace = field(default_factory=StepTrace)

    @property
    def active(self) -> bool:
        return bool(self.groups)

    # ---------------------------------------------------------------- the core's step
    def start(self, prev: InFlight | None) -> StepTrace:
        self.trace = StepTrace(prev)
        return self.trace

    def scheduled(self, core: EngineCore, sched: SchedulerOutput) -> None:
        """While suspects are left, run only the scheduled members of the first group that has
        any (or, if none has, the requests that are not suspects)."""
        if self.faults is not None:
            self.faults.poison(core, sched)
        self.ran = []
        if not self.groups:
            return
        self.groups = _keep(self.groups, lambda r: r in core.requests)
        scheduled = {s.request_id for s in sched.seqs}
        for group in self.groups:
            if chosen := [r for r in group if r in scheduled]:
                self.ran = chosen
                break
        else:
            suspects = {r for g in self.groups for r in g}
            sched.seqs = [s for s in sched.seqs if s.request_id not in suspects]
            return
        keep = set(self.ran)
        sched.seqs = [s for s in sched.seqs if s.request_id in keep]

    def launch(
        self,
        runner: ModelRunner,
        sched: SchedulerOutput,
        source: Launched | None,
        defer_sampling: bool = False,
    ) -> Launched:
        self.trace.launching = sched
        launched = runner.launch(sched, source, defer_sampling)
        self.trace.launching = None
        self.trace.current = launched
        return launched

    def sample(self, runner: ModelRunner, launched: Launched) -> None:
        self.trace.sampling = launched
        runner.sample(launched)
        self.trace.sampling = None

    def collect(self, runner: ModelRunner, step: InFlight) -> RunnerOutput:
        self.trace.reading = step
        result = runner.collect(step.launched)
        trace = self.trace
        trace.reading = None
        if step is trace.prev:
            trace.prev = None
        elif step.launched is trace.current:
            trace.current = None
        return result

    def done(self) -> None:
        """The step went through (read synchronously while isolating): its suspects are clear."""
        self.trace = StepTrace()
        if self.ran:
            cleared = set(self.ran)
            self.groups = _keep(self.groups, lambda r: r not in cleared)
            self.ran = []

    # ---------------------------------------------------------------- after a failed step
    def recover(self, core: EngineCore, exc: Exception) -> list[EngineOutput]:
        """Put the engine back as it was before the failed step, deliver what the step before
        it produced, and fail the culprit (or queue the suspects); see the module's text."""
        if device_lost(exc):
            log.critical("device error: the engine cannot go on")
            raise exc
        trace, self.trace = self.trace, StepTrace()
        outputs = trace.outputs
        if trace.launching is not None:
            suspects = [s.request_id for s in trace.launching.seqs]
            for s in trace.launching.seqs:
                if s.sampling is not None:  # the launch may have counted them reported
                    s.sampling.prompt_lp_next = min(s.sampling.prompt_lp_next, s.start_pos + 1)
            if trace.prev is not None:
                try:
                    outputs += core._process(trace.prev)
                except Exception:
                    log.exception("reading the step before the failed one failed too")
                    suspects += self.rewind(core, trace.prev.launched)
        elif trace.sampling is not None:  # the step before it is read and delivered
            suspects = self.rewind(core, trace.sampling)
        elif trace.reading is not None:
            suspects = self.rewind(core, trace.reading.launched)
            if trace.current is not None and trace.current is not trace.reading.launched:
                self.rewind(core, trace.current)  # launched after the lost one, from its samples
        else:
            raise exc
        core.inflight = None
        suspects = [r for r in dict.fromkeys(suspects) if r in core.requests]
        log.error(
            "engine step failed (%s: %s) with %d requests; isolating the culprit",
            type(exc).__name__,
            exc,
            len(suspects),
            exc_info=exc,
        )
        taken = set(suspects)
        self.groups = _keep(self.groups, lambda r: r not in taken)
        self.ran = []
        if len(suspects) == 1:
            outputs.append(self.fail(core, suspects[0], exc))
        elif suspects:
            half = len(suspects) // 2
            self.groups.extendleft([suspects[half:], suspects[:half]])
        return outputs

    def rewind(self, core: EngineCore, step: Launched) -> list[str]:
        """Forget a step whose results are lost: its requests compute it again."""
        ids = []
        for s in step.sched.seqs:
            req = core.requests.get(s.request_id)
            if req is None:
                continue
            ids.append(s.request_id)
            core.scheduler.rewind(s.request_id, s.start_pos)
            req.in_flight = 0
            st = req.sampling  # its token history holds only the tokens the engine read
            st.prompt_lp_next = min(st.prompt_lp_next, s.start_pos + 1)
        return ids

    def fail(self, core: EngineCore, request_id: str, exc: Exception) -> EngineOutput:
        """Finish one request with an error output; the others go on."""
        req = core.requests.get(request_id)
        status = 422 if isinstance(exc, RequestValidationError) else 500
        log.error("request %s failed its step alone: %s: %s", request_id, type(exc).__name__, exc)
        if req is not None:
            core._finish(req, "error")  # the frontend forgets it when it reads the error
        what = "invalid parameter" if status == 422 else "internal engine error"
        return EngineOutput(
            request_id,
            error=f"{what} while generating this request ({type(exc).__name__}: {exc}); "
            "the other requests were not affected",
            status=status,
            num_prompt_tokens=len(req.prompt_ids) if req is not None else 0,
        )


def _keep(groups: deque[list[str]], pred: Callable[[str], bool]) -> deque[list[str]]:
    """The groups with only the requests ``pred`` keeps; empty groups dropped."""
    return deque(g for g in ([r for r in group if pred(r)] for group in groups) if g)
