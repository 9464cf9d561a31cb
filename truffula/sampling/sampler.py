"""The sampler: logits -> sampled ids and, for rows that asked, token-probability tensors.

Stages, each a pure function of its inputs:
1. penalties (repetition over prompt + output, frequency / presence over output), then the
   structured-output mask of constrained rows (-inf on the tokens their grammar forbids);
2. temperature (greedy rows keep 1.0);
3. filters top-k, top-p, min-p, typical-p (HF transformers' order and semantics), -inf outside;
4. sampling: argmax for greedy rows, the exponential race ``argmax(p / q), q ~ Exp(1)`` for the
   others, each seeded row drawing ``q`` from its own generator (so a seed gives the same output
   whatever else is in the batch);
5. logprob statistics on the reported distribution (the processed logits, or the raw ones):
   chosen logprob, rank (1 + entries strictly larger), entropy (nats) and ``topk`` with k = the
   largest k asked in the step (the ``TokenStats`` of the device, ``truffula.kernels``: one
   softmax pass on CPU, one Triton pass on CUDA).

A batch of plain greedy rows (no penalty, filter or logprob) is one argmax on the logits as the
model made them. Nothing here sorts the whole vocabulary for logprobs, copies [batch, vocab] to
the host, or touches the tokenizer. Rows that asked for nothing pay nothing in stage 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from truffula.kernels.stats_torch import TokenStats, Top, TorchTokenStats
from truffula.sampling.metadata import SamplingBatch
from truffula.structured.mask import apply_bitmask


@dataclass
class LogprobsTensors:
    """Token-probability results of R rows; column 0 holds the chosen token, top-k after it."""

    rows: torch.Tensor
    """[R] long: batch rows these results belong to."""
    token_ids: torch.Tensor
    """[R, 1 + k] long."""
    logprobs: torch.Tensor
    """[R, 1 + k] float32 (-inf where a processed distribution has fewer than k tokens)."""
    ranks: torch.Tensor
    """[R] long: rank of the chosen token, 1 = most likely."""
    entropy: torch.Tensor
    """[R] float32, nats."""


@dataclass
class SamplerOutput:
    sampled: torch.Tensor
    """[B] long."""
    logprobs: LogprobsTensors | None


class Sampler:
    def __init__(self, stats: TokenStats | None = None) -> None:
        """``stats``: the argmax, top-k and statistics of the engine's device (CPU's if None)."""
        self.stats = stats if stats is not None else TorchTokenStats(torch.device("cpu"))

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if _plain_greedy(batch):  # argmax of the model's own dtype: no fp32 copy of the logits
            return SamplerOutput(self.stats.argmax(logits), None)
        if not (self.stats.reads_16bit and _unprocessed(batch)):
            # the Triton statistics and top-k read bf16 logits as they are (a bf16 -> fp32
            # conversion is exact and keeps the order); everything else computes in fp32
            logits = logits.float()
        x = apply_penalties(logits, batch) if batch.penalty_rows is not None else logits
        if batch.grammar_rows is not None and batch.grammar_mask is not None:
            x = apply_bitmask(x, batch.grammar_rows, batch.grammar_mask)
        if not batch.all_greedy:
            assert batch.temperature is not None  # set unless all rows are greedy
            x = x / batch.temperature.unsqueeze(1)
        x = apply_filters(x, batch)
        top = None
        if self.stats.greedy_topk and batch.all_greedy and batch.max_k > 0:
            # one top-k serves the sampling and the statistics: it already holds the argmax
            top = self.stats.topk(x, min(max(batch.max_k, 2), x.shape[1]))
            sampled = top[1][:, 0]
            tie = top[0][:, 0] == top[0][:, 1]
            if bool(tie.any()):  # argmax takes the first of equal values; topk may not
                sampled = torch.where(tie, x.argmax(dim=-1), sampled)
        else:
            sampled = self._sample(x, batch)
        return SamplerOutput(sampled, self._logprobs(logits, x, sampled, batch, top))

    def _sample(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy_ids = self.stats.argmax(x)
        if batch.all_greedy:
            return greedy_ids
        probs = x.softmax(dim=-1)
        q = torch.empty_like(probs).exponential_()
        for row, gen in batch.generators.items():
            q[row].exponential_(generator=gen)
        random_ids = (probs / q).argmax(dim=-1)
        assert batch.greedy is not None  # set unless all rows are greedy
        return torch.where(batch.greedy, greedy_ids, random_ids)

    def _logprobs(
        self,
        logits: torch.Tensor,
        x: torch.Tensor,
        sampled: torch.Tensor,
        batch: SamplingBatch,
        top: Top | None = None,
    ) -> LogprobsTensors | None:
        """Statistics of the processed distribution (``x``) and the raw one (``logits``)."""
        groups = []
        n = x.shape[0]
        if batch.processed_rows is not None:
            groups.append((batch.processed_rows, x))
        if batch.raw_rows is not None:
            groups.append((batch.raw_rows, logits))
        if not groups:
            return None
        parts = []
        for rows, source in groups:
            every = rows.numel() == n  # every row: no gather copies
            chosen = sampled if every else sampled[rows]
            sub = source if every else source[rows]
            reuse = None
            if top is not None and source is x:
                reuse = (top[0], top[1]) if every else (top[0][rows], top[1][rows])
            parts.append((rows, *self.stats.stats(sub, chosen, batch.max_k, reuse)))
        cat = [torch.cat(t) for t in zip(*parts, strict=True)]
        return LogprobsTensors(
            rows=cat[0], token_ids=cat[1], logprobs=cat[2], ranks=cat[3], entropy=cat[4]
        )


def _unprocessed(b: SamplingBatch) -> bool:
    """Every row greedy, with no penalty, filter or constraint: the processed logits are the
    logits."""
    return (
        b.all_greedy
        and b.penalty_rows is None
        and b.grammar_rows is None
        and b.top_k is None
        and b.top_p is None
        and b.min_p is None
        and b.typical_p is None
    )


def _plain_greedy(b: SamplingBatch) -> bool:
    """Unprocessed, and no logprob to compute."""
    return _unprocessed(b) and b.processed_rows is None and b.raw_rows is None


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """HF repetition penalty over prompt + output tokens; OpenAI frequency / presence over output."""
    assert (
        b.penalty_rows is not None and b.prompt_tokens is not None and b.output_tokens is not None
    )
    assert b.repetition is not None and b.frequency is not None and b.presence is not None
    rows = logits[b.penalty_rows]
    p, vocab = rows.shape
    # Token lists are padded with ``vocab``: an extra column that is dropped.
    counts = torch.zeros(p, vocab + 1, dtype=rows.dtype, device=rows.device)
    counts.scatter_add_(1, b.output_tokens, torch.ones_like(b.output_tokens, dtype=rows.dtype))
    seen = torch.zeros(p, vocab + 1, dtype=torch.bool, device=rows.device)
    seen.scatter_(1, b.prompt_tokens, True)
    counts, seen = counts[:, :vocab], seen[:, :vocab] | (counts[:, :vocab] > 0)
    rep = b.repetition.unsqueeze(1)
    rows = torch.where(seen, torch.where(rows < 0, rows * rep, rows / rep), rows)
    rows = (
        rows
        - b.frequency.unsqueeze(1) * counts
        - b.presence.unsqueeze(1) * (counts > 0).to(rows.dtype)
    )
    out = logits.clone()
    out[b.penalty_rows] = rows
    return out


def apply_filters(x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """top-k, top-p, min-p, typical-p in HF transformers' order; removed entries become -inf."""
    neg_inf = x.new_full((), float("-inf"))  # made on the device: no host copy, no sync
    if b.top_k is not None:
        k_max = min(b.top_k_max, x.shape[1])
        kth_vals = torch.topk(x, k_max, dim=1).values
        k = b.top_k.clamp(min=1, max=k_max) - 1
        threshold = kth_vals.gather(1, k.unsqueeze(1))
        threshold = torch.where((b.top_k > 0).unsqueeze(1), threshold, neg_inf)
        x = torch.where(x < threshold, neg_inf, x)
    if b.top_p is not None:
        x = _top_p(x, b.top_p)
    if b.min_p is not None:
        probs = x.softmax(dim=-1)
        limit = b.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        x = torch.where(probs < limit, neg_inf, x)
    if b.typical_p is not None:
        x = _typical(x, b.typical_p)
    return x


def _top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    rows = (top_p < 1).nonzero().squeeze(1)
    sub = x[rows]
    sorted_logits, order = torch.sort(sub, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p[rows]).unsqueeze(1)
    remove[:, -1] = False
    mask = remove.scatter(1, order, remove)
    out = x.clone()
    out[rows] = sub.masked_fill(mask, float("-inf"))
    return out


def _typical(x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    rows = (mass < 1).nonzero().squeeze(1)
    sub = x[rows]
    lp = sub.log_softmax(dim=-1)
    p = lp.exp()
    ent = -torch.where(torch.isfinite(lp), lp * p, torch.zeros_like(p)).sum(-1, keepdim=True)
    shifted = (-lp - ent).abs()
    sorted_scores, order = torch.sort(shifted, descending=False)
    cum = sub.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass[rows].unsqueeze(1)).sum(dim=1).clamp(max=sub.shape[1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last.view(-1, 1))
    remove[:, 0] = False
    mask = remove.scatter(1, order, remove)
    out = x.clone()
    out[rows] = sub.masked_fill(mask, float("-inf"))
    return out
