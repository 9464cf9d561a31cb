"""What a launched step carries from its launch to its collection: the prompt-logprob jobs, the
placeholder tokens read from the step before it, and which sampled rows it emits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from truffula.device import host_tensor
from truffula.scheduler.output import PLACEHOLDER, ScheduledSeq, SchedulerOutput
from truffula.speculative.verify import accepted


@dataclass
class PromptJob:
    seq_index: int
    rows: list[int]
    """Hidden-state rows (in the step's flattened tokens) predicting the targets."""
    targets: list[int]
    first_pos: int
    k: int
    tensors: tuple[torch.Tensor, torch.Tensor] | None = None
    """rows and targets on the device, copied before the forward pass (no sync after it)."""


Fill = tuple[torch.Tensor, torch.Tensor]
"""(token rows of this step, their ids on the device) for ``PLACEHOLDER`` tokens."""


@dataclass(eq=False)
class Launched:
    """A step whose device work and result copy are issued; ``host()`` waits for the copy."""

    sched: SchedulerOutput
    sample_idx: list[int]
    jobs: list[PromptJob]
    has_lp: bool
    host: Callable[[], list[np.ndarray]]
    sampled: torch.Tensor | None = None
    """[len(sample_idx)] sampled ids on the device (the next step's placeholder tokens)."""
    ks: list[int] = field(default_factory=list)
    """Alternatives each sampled row reports, fixed when the step was launched."""
    pending: tuple[Any, ...] | None = None
    """What the sampler still has to run on (a step launched with ``defer_sampling``):
    (logits, sampling states, drafts, prompt-logprob parts); None once sampled."""


def placeholder_fill(
    seqs: list[ScheduledSeq], starts: list[int], prev: Launched | None, device: torch.device
) -> Fill | None:
    dst, src = [], []
    rows = None
    for i, s in enumerate(seqs):
        for j, tok in enumerate(s.token_ids):
            if tok != PLACEHOLDER:
                continue
            if rows is None:
                assert prev is not None and prev.sampled is not None, "placeholder without a step"
                rows = {prev.sched.seqs[k].request_id: r for r, k in enumerate(prev.sample_idx)}
            dst.append(starts[i] + j)
            src.append(rows[s.request_id])
    if not dst:
        return None
    assert prev is not None and prev.sampled is not None
    index = host_tensor([dst, src], torch.long, device)
    return index[0], prev.sampled.index_select(0, index[1])


def kept_rows(seqs: list[ScheduledSeq], sample_idx: list[int], sampled: list[int]) -> list[bool]:
    """Which sampled rows the step emits: all of a sequence without drafts; of one with
    drafts, the samples up to the first that differs from its draft, inclusive."""
    kept = [True] * len(sampled)
    r = 0
    while r < len(sample_idx):
        s = seqs[sample_idx[r]]
        if s.num_drafts:
            drafts = s.token_ids[len(s.token_ids) - s.num_drafts :]
            n = accepted(drafts, sampled[r : r + s.num_drafts + 1])
            for j in range(n + 1, s.num_drafts + 1):
                kept[r + j] = False
        r += s.num_drafts + 1 if s.sample else 1
    return kept
