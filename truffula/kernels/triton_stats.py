"""Token statistics of logit rows in one pass (Triton): log-sum-exp, entropy, the chosen
token's logit and its rank. Reference: ``sampling.sampler.logprob_stats`` on
``logits.log_softmax(-1)`` (the CPU path and the test oracle).

One program per row streams the row once, keeping per-lane running maxima, sums of
``exp(x - max)`` and of ``exp(x - max) * x`` (online softmax) and the count of entries larger
than the chosen one; -inf entries (filtered tokens) contribute nothing. This replaces the
log-softmax, softmax, entropy and rank passes (four reads and two [rows, vocab] writes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _row_stats_kernel(x_ptr, chosen_ptr, out_ptr, n_cols, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    target = tl.load(base + tl.load(chosen_ptr + row)).to(tl.float32)
    neg_inf = float("-inf")
    m = tl.full([BLOCK], neg_inf, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    w = tl.zeros([BLOCK], tl.float32)
    larger = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=neg_inf).to(tl.float32)
        larger += (x > target).to(tl.int32)
        m_new = tl.maximum(m, x)
        alive = m_new > neg_inf
        alpha = tl.where(alive, tl.exp(m - m_new), 0.0)
        e = tl.where(x > neg_inf, tl.exp(x - m_new), 0.0)
        s = s * alpha + e
        w = w * alpha + tl.where(x > neg_inf, e * x, 0.0)
        m = m_new
    top = tl.max(m, 0)
    scale = tl.where(m > neg_inf, tl.exp(m - top), 0.0)
    total = tl.sum(s * scale, 0)
    lse = top + tl.log(total)
    tl.store(out_ptr + 4 * row, lse)
    tl.store(out_ptr + 4 * row + 1, lse - tl.sum(w * scale, 0) / total)
    tl.store(out_ptr + 4 * row + 2, target)
    tl.store(out_ptr + 4 * row + 3, (tl.sum(larger, 0) + 1).to(tl.float32))


def row_stats(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """x [R, V] logits (fp32 or bf16, rows contiguous), chosen [R] ids -> [R, 4] fp32:
    log-sum-exp, entropy (nats), the chosen logit, the chosen token's rank (1 = most likely)."""
    rows, n_cols = x.shape
    out = torch.empty(rows, 4, dtype=torch.float32, device=x.device)
    if rows:
        _row_stats_kernel[(rows,)](x, chosen, out, n_cols, x.stride(0), BLOCK=BLOCK, num_warps=8)
    return out
