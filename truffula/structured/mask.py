"""A step's token bitmask: filled on the host for the constrained rows, applied on the device.

The bitmask is int32 words, ``ceil(vocab / 32)`` per row: bit ``t % 32`` of word ``t // 32``
allows token ``t``. Only constrained rows have one; the others are never touched.
"""

from __future__ import annotations

import numpy as np
import torch

from truffula.structured.compiler import Constraint


def fill_bitmask(constraints: list[Constraint], vocab_size: int) -> torch.Tensor:
    """[len(constraints), ceil(vocab / 32)] int32 on the host. A row left with nothing allowed
    (its matcher failed) allows EOS: never a row of -inf only."""
    bitmask = torch.zeros((len(constraints), (vocab_size + 31) // 32), dtype=torch.int32)
    for row, c in enumerate(constraints):
        c.fill(bitmask, row)
    empty = np.flatnonzero(~bitmask.numpy().any(axis=1))  # one check, not a torch op a row
    for row in empty.tolist():
        eos = constraints[row].eos_id
        bitmask[row, eos // 32] = 1 << (eos % 32)
    return bitmask


def apply_bitmask(x: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``x`` with the tokens each constrained row's bitmask forbids set to -inf (out of place:
    ``x`` may be the raw logits that raw logprobs are read from).

    Each byte of the bitmask picks its 8 entries of 0 / -inf from a 256-row table, which is
    added to the logits: no per-element branch (``masked_fill`` with an irregular mask is 25x
    slower on CPU, where branch mispredictions dominate). The words are read as little-endian
    bytes, as on every device torch runs on."""
    n, vocab = rows.shape[0], x.shape[1]
    bias = _byte_table(x).index_select(0, bitmask.view(torch.uint8).reshape(-1).long())
    bias = bias.reshape(n, -1)
    if bias.shape[1] >= vocab:
        bias = bias[:, :vocab]
    else:  # logits wider than the tokenizer's vocabulary: the padding is never allowed
        bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[1]), value=float("-inf"))
    if n == x.shape[0]:  # every row constrained (rows are sorted and distinct)
        return x + bias
    out = x.clone()
    out[rows] = x[rows] + bias
    return out


_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(x: torch.Tensor) -> torch.Tensor:
    """[256, 8]: row b holds 0 where bit j of b is set, else -inf."""
    key = (x.device, x.dtype)
    table = _TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = torch.zeros(256, 8).masked_fill(bits == 0, float("-inf"))
        table = _TABLES[key] = table.to(device=x.device, dtype=x.dtype)
    return table
