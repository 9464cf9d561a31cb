"""The model runner of one tensor-parallel rank.

Rank 0 runs in the engine process: its ``launch`` and ``sample`` first send the step to the
other ranks (``truffula.distributed.workers``: the plain ``SchedulerOutput``, each sequence's
sampling state cut to its parameters and the prompt it still owes logprobs of), then run it;
the other ranks run the same calls in the same order, so their collectives meet. Only rank 0's
results reach the engine; every rank ends a step with the same sampled ids on its device
(placeholders of the next step are read from them on each rank).

Sampling over vocabulary-parallel logits (each rank holds ``[R, V / N]``):

- exact rows (greedy, no penalty, filter or grammar: ``stats.exact_row``): the argmax and the
  token statistics are merged from the ranks' slices (``ShardedTokenStats``), never gathering
  the vocabulary;
- every other row (temperature, top-k/p, min-p, typical-p, penalties, grammar masks, seeded
  RNG): its logits are all-gathered whole, rank 0 runs the engine's sampler on them with the
  requests' own states (generators, matchers), and broadcasts the sampled ids. A failure there
  (a request's bad parameters) is broadcast too, so the ranks stay in step and the engine can
  isolate the request as usual.

Prompt logprobs are merged like exact rows.

CUDA graphs hold the model's NCCL all-reduces: every rank captures the same graphs in the same
order (rank 0 after the engine is built, the others once they report ready), and every rank
replays the same graph at each step, since every rank builds the same step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol
from weakref import WeakKeyDictionary

import torch

from truffula.config import EngineConfig
from truffula.device import host_tensor
from truffula.distributed.parallel import TensorParallel
from truffula.distributed.stats import ShardedTokenStats, exact_row
from truffula.errors import TensorParallelError
from truffula.models.registry import LoadedModel
from truffula.runner.launched import Launched
from truffula.runner.runner import ModelRunner
from truffula.sampling.metadata import SamplingBatch
from truffula.sampling.sampler import LogprobsTensors, Sampler, SamplerOutput
from truffula.sampling.state import SamplingState
from truffula.scheduler.output import SchedulerOutput

log = logging.getLogger("truffula.distributed")


class StepAborted(RuntimeError):
    """Rank 0 could not sample a step's gathered rows (its error is raised there)."""


class StepSender(Protocol):
    """Rank 0's line to the other ranks (``truffula.distributed.workers.Workers``)."""

    def launch(
        self, step: int, sched: SchedulerOutput, prev: int | None, defer: bool, records_k: int
    ) -> None: ...

    def sample(self, step: int) -> None: ...


class TensorParallelRunner(ModelRunner):
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        group: TensorParallel,
    ) -> None:
        self.group = group
        self.send: StepSender | None = None
        """Rank 0: the workers (set once every rank is built); None on the other ranks."""
        self.broken: BaseException | None = None
        """Rank 0: the error that left the ranks out of step; every later step raises it."""
        self._safe: BaseException | None = None
        self.token_stats = ShardedTokenStats(group, int(loaded.hf_config.vocab_size))
        super().__init__(loaded, config, device, dtype, prompt_stats=self.token_stats)
        self.exact_sampler = Sampler(self.token_stats)
        self._step_ids: WeakKeyDictionary[Launched, int] = WeakKeyDictionary()
        self._next_step = 0
        # every rank holds the KV cache the least of them could
        agreed = group.min_int(self.sizing.num_blocks)
        if agreed != self.sizing.num_blocks:
            tokens = agreed * self.block_size
            self.sizing = replace(
                self.sizing,
                num_blocks=agreed,
                kv_capacity_tokens=tokens,
                kv_cache_bytes=(agreed + 1) * self.block_size * self.sizing.kv_bytes_per_token,
            )
            self.num_blocks = agreed + 1
            self.kv_cache.allocate(self.num_blocks)

    # ---------------------------------------------------------------- steps, mirrored
    @torch.inference_mode()
    def launch(
        self, sched: SchedulerOutput, prev: Launched | None = None, defer_sampling: bool = False
    ) -> Launched:
        step = self._next_step
        with self._in_step():
            if self.send is not None and not sched.is_empty:
                prev_id = None if prev is None else self._step_ids.get(prev)
                records_k = self.prompt_records_k
                self.send.launch(step, mirror(sched), prev_id, defer_sampling, records_k)
            self._next_step += 1
            launched = super().launch(sched, prev, defer_sampling=True)
            self._step_ids[launched] = step
            if not defer_sampling:
                super().sample(launched)
        return launched

    @torch.inference_mode()
    def sample(self, launched: Launched, batch: SamplingBatch | None = None) -> None:
        if launched.pending is None:
            return
        with self._in_step():
            if self.send is not None:
                self.send.sample(self._step_ids[launched])
            super().sample(launched)

    @contextlib.contextmanager
    def _in_step(self) -> Iterator[None]:
        """Rank 0: an error that leaves the ranks out of step is fatal (``TensorParallelError``,
        raised again by every later step); a request's own error that every rank learnt of in
        step (``_sample_gathered``) is raised as it is, for the engine to isolate."""
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel group is broken: {self.broken}")
        try:
            yield
        except Exception as exc:
            if exc is self._safe or self.send is None:
                raise
            self.broken = exc
            if isinstance(exc, TensorParallelError):
                raise
            raise TensorParallelError(f"tensor-parallel step failed: {exc}") from exc
        finally:
            self._safe = None

    def step_id(self, launched: Launched) -> int:
        return self._step_ids[launched]

    # ---------------------------------------------------------------- sampling
    def _sample_logits(
        self,
        logits: torch.Tensor,
        states: list[SamplingState],
        drafted: list[list[int]],
        batch: SamplingBatch | None,
    ) -> SamplerOutput:
        """Exact rows merged over the vocabulary's slices, the others gathered (``batch``,
        built for the whole vocabulary, is not used)."""
        return self._sample_rows(logits, states, drafted)

    def _sample_rows(
        self, logits: torch.Tensor, states: list[SamplingState], drafted: list[list[int]]
    ) -> SamplerOutput:
        exact = [i for i, st in enumerate(states) if exact_row(st.params)]
        other = [i for i, st in enumerate(states) if not exact_row(st.params)]
        done: list[tuple[list[int], SamplerOutput]] = []
        if exact:
            sub = self._rows(logits, exact)
            batch = self._batch([states[i] for i in exact], [[] for _ in exact])
            done.append((exact, self.exact_sampler(sub, batch)))
        if other:
            done.append((other, self._sample_gathered(self._rows(logits, other), states, other)))
        if len(done) == 1 and len(done[0][0]) == len(states):
            return done[0][1]
        return _merge(done, len(states), logits.device)

    def _rows(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if len(rows) == x.shape[0]:
            return x
        return x[host_tensor(rows, torch.long, x.device)]

    def _sample_gathered(
        self, shard: torch.Tensor, states: list[SamplingState], rows: list[int]
    ) -> SamplerOutput:
        """Rows sampled from their whole logits, on rank 0; the ids broadcast with a flag
        saying whether rank 0 failed."""
        g = self.group.all_gather(shard)  # [N, P, V / N]
        full = g.permute(1, 0, 2).reshape(shard.shape[0], -1)
        status = torch.zeros(len(rows) + 1, dtype=torch.long, device=shard.device)
        out, error = None, None
        if self.group.rank == 0:
            try:
                batch = self._batch([states[i] for i in rows], [[] for _ in rows])
                out = self.sampler(full, batch)
                status[:-1] = out.sampled
            except Exception as exc:  # raised below, once the other ranks know
                error = exc
                status[-1] = 1
        self.group.broadcast(status)
        if error is not None:
            self._safe = error
            raise error
        if int(status[-1]):
            raise StepAborted("rank 0 could not sample this step")
        if out is None:
            out = SamplerOutput(status[:-1], None)
        return out


def _merge(
    done: list[tuple[list[int], SamplerOutput]], n: int, device: torch.device
) -> SamplerOutput:
    """The sampler outputs of row subsets as one, over the step's ``n`` rows."""
    sampled = torch.zeros(n, dtype=torch.long, device=device)
    lps = []
    for rows, out in done:
        index = host_tensor(rows, torch.long, device)
        sampled[index] = out.sampled
        if out.logprobs is not None:
            lps.append((index, out.logprobs))
    if not lps:
        return SamplerOutput(sampled, None)
    width = max(lp.token_ids.shape[1] for _, lp in lps)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        extra = width - t.shape[1]
        return t if not extra else torch.nn.functional.pad(t, (0, extra), value=value)

    return SamplerOutput(
        sampled,
        LogprobsTensors(
            rows=torch.cat([index[lp.rows] for index, lp in lps]),
            token_ids=torch.cat([pad(lp.token_ids, 0) for _, lp in lps]),
            logprobs=torch.cat([pad(lp.logprobs, float("-inf")) for _, lp in lps]),
            ranks=torch.cat([lp.ranks for _, lp in lps]),
            entropy=torch.cat([lp.entropy for _, lp in lps]),
        ),
    )


def mirror(sched: SchedulerOutput) -> SchedulerOutput:
    """What the other ranks need of a step: its sequences, each with a copy of its sampling
    state holding the parameters and the prompt only while prompt logprobs are owed (no RNG,
    no grammar matcher, no output history: rank 0 samples the rows that read them)."""
    seqs = []
    for s in sched.seqs:
        st = s.sampling
        if st is not None:
            owed = st.params.wants_prompt_logprobs and st.prompt_lp_next < len(st.prompt_ids)
            st = SamplingState(
                st.params, st.prompt_ids if owed else [], prompt_lp_next=st.prompt_lp_next
            )
        seqs.append(replace(s, sampling=st))
    return SchedulerOutput(seqs)
