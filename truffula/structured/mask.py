"""A step's token bitmask: filled on the host for the constrained rows, applied on the device.

The bitmask is int32 words, ``ceil(vocab / 32)`` per row: bit ``t % 32`` of word ``t // 32``
allows token ``t``. Only constrained rows have one; the others are never touched.
"""

from __future__ import annotations

import torch

from truffula.structured.compiler import Constraint


def fill_bitmask(constraints: list[Constraint], vocab_size: int) -> torch.Tensor:
    """[len(constraints), ceil(vocab / 32)] int32 on the host."""
    bitmask = torch.zeros((len(constraints), (vocab_size + 31) // 32), dtype=torch.int32)
    for row, c in enumerate(constraints):
        c.fill(bitmask, row)
    return bitmask


def apply_bitmask(x: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``x`` with the tokens each constrained row's bitmask forbids set to -inf (out of place:
    ``x`` may be the raw logits that raw logprobs are read from)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(bitmask.shape[0], -1)
    vocab = x.shape[1]
    if allowed.shape[1] >= vocab:
        allowed = allowed[:, :vocab]
    else:  # logits wider than the tokenizer's vocabulary: the padding is never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    out = x.clone()
    out[rows] = x[rows].masked_fill(~allowed, float("-inf"))
    return out
