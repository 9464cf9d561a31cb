"""Token statistics of vocabulary-parallel logits, without gathering the vocabulary.

Each rank holds the logits of its slice of the vocabulary (``[R, V / N]``, ids from
``offset``). Per row it computes its slice's maximum ``m``, ``s = sum exp(x - m)``,
``t = sum exp(x - m) * x``, the chosen token's logit (-inf where the token is another rank's),
its top k (ids made global) and its first argmax; one all-gather of these ``4 + 2k`` numbers
per row gives every rank the same candidates, merged the same way on each:

- log-sum-exp ``M + log(sum_r s_r exp(m_r - M))`` with ``M = max_r m_r``;
- entropy ``lse - E[x]``, with ``E[x] = sum_r t_r exp(m_r - M) / sum_r s_r exp(m_r - M)``;
- the top k of the ``N x k`` candidates; the argmax: the lowest id among the ranks' maxima
  equal to ``M`` (``torch.argmax`` takes the first of equal values, as here);
- rank ``1 + #{x > x_chosen}``: read off the merged top k when the chosen token is in it
  (always, for greedy rows), else one all-reduce of the ranks' counts.

Only for the logits as the model made them (greedy rows with no penalty, filter or grammar:
``exact_row``); other rows are gathered whole (``truffula.distributed.runner``). The merge runs
in float64 and is identical on every rank, so every rank reads the same sampled ids.
"""

from __future__ import annotations

import torch

from truffula.distributed.parallel import TensorParallel
from truffula.kernels.stats_torch import Top, from_logits
from truffula.sampling.params import SamplingParams


def exact_row(p: SamplingParams) -> bool:
    """A row whose token and statistics merge exactly from the ranks' slices."""
    return p.greedy and not (p.needs_penalties or p.needs_filters or p.constrained)


class ShardedTokenStats:
    """``TokenStats`` (``truffula.kernels.stats_torch``) over vocabulary-parallel logits; every
    call is a collective: each rank calls it with its own slice of the same rows."""

    reads_16bit = False
    greedy_topk = False

    def __init__(self, group: TensorParallel, vocab_size: int) -> None:
        self.group = group
        self.offset, self.shard = group.shard(vocab_size)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        idx = x.argmax(dim=-1)
        vals = x.gather(1, idx.unsqueeze(1)).squeeze(1)
        packed = torch.stack((vals.double(), (idx + self.offset).double()), dim=1)
        g = self.group.all_gather(packed)  # [N, R, 2]
        return _first_max(g[..., 0], g[..., 1])

    def topk(self, x: torch.Tensor, k: int) -> Top:
        raise NotImplementedError("the sharded sampler reads the top k through stats()")

    def stats(
        self, x: torch.Tensor, chosen: torch.Tensor, k: int, top: Top | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(ids [R, 1+k], lps [R, 1+k], ranks [R], entropy [R]) of ``softmax`` over the whole
        vocabulary, ``x`` this rank's fp32 slice, ``chosen`` [R] global ids."""
        rows, width = x.shape
        kk = min(max(k, 1), width)
        m = x.amax(dim=1, keepdim=True)
        e = (x - m).exp()
        s = e.sum(dim=1, keepdim=True)
        t = torch.where(e > 0, e * x, 0).sum(dim=1, keepdim=True)
        local = chosen - self.offset
        inside = (local >= 0) & (local < width)
        picked = x.gather(1, local.clamp(0, width - 1).unsqueeze(1))
        cx = torch.where(inside.unsqueeze(1), picked, float("-inf"))
        tv, ti = torch.topk(x, kk, dim=1)
        parts = (m, s, t, cx, tv, ti + self.offset)
        packed = torch.cat([p.double() for p in parts], dim=1)  # ids exact in float64
        g = self.group.all_gather(packed)  # [N, R, 4 + 2 kk]
        ms, ss, ts, cxs = g[..., 0], g[..., 1], g[..., 2], g[..., 3]
        big = ms.amax(dim=0)
        w = (ms - big).exp()
        total = (ss * w).sum(dim=0)
        lse = big + total.log()
        entropy = lse - (ts * w).sum(dim=0) / total
        chosen_x = cxs.amax(dim=0)
        n = g.shape[0]
        cand_v = g[..., 4 : 4 + kk].permute(1, 0, 2).reshape(rows, n * kk)
        cand_i = g[..., 4 + kk :].permute(1, 0, 2).reshape(rows, n * kk)
        top_v, pos = torch.topk(cand_v, kk, dim=1)
        top_i = cand_i.gather(1, pos).long()
        cut = chosen_x.unsqueeze(1)
        if bool((cut >= top_v[:, -1:]).all()):  # merged data: the same branch on every rank
            ranks = (top_v > cut).sum(dim=1) + 1
        else:
            count = (x > cut.to(x.dtype)).sum(dim=1)
            ranks = self.group.all_reduce(count) + 1
        return from_logits(
            chosen,
            cut.float(),
            lse.unsqueeze(1).float(),
            ranks,
            entropy.float(),
            top_v.float(),
            top_i,
            k,
        )


def _first_max(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[N, R] maxima and their ids -> [R] the lowest id holding the largest value."""
    best = vals.amax(dim=0, keepdim=True)
    return torch.where(vals == best, ids, float("inf")).amin(dim=0).long()
