"""The LoRA part of a step's forward context: which adapter slot each token uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from truffula.device import host_tensor


@dataclass
class LoRABatch:
    """Which adapter slot each token of the step uses (built once per step by the runner)."""

    token_slots: torch.Tensor
    """[T] long, -1 for base-model tokens."""
    slots: list[int]
    """Distinct slots present, ascending (empty in a captured CUDA graph: slots are data there)."""
    num_tokens: int
    host_slots: list[int] = field(default_factory=list)
    graph: bool = False
    """Captured in a CUDA graph: kernels must read device data only (``seg_table``)."""
    seg_table: torch.Tensor | None = None
    """[segments * 3] (start, length, slot) runs of equal slot, for the Triton kernels."""
    memo: dict[tuple[object, ...], object] = field(default_factory=dict)
    """Index tensors the torch LoRA kernels derive from the fields above, made on first use and
    shared by every layer of the step."""

    @classmethod
    def build(
        cls, slots_per_token: list[int], device: torch.device, with_segments: bool = False
    ) -> LoRABatch | None:
        """The batch of a step (None when no token uses an adapter); ``with_segments`` adds the
        segment table the Triton kernels read."""
        present = sorted({s for s in slots_per_token if s >= 0})
        if not present:
            return None
        token_slots = host_tensor(slots_per_token, torch.long, device)
        seg = None
        if with_segments:
            # long segments (prefill) let each program reuse its factor tiles over 64 tokens;
            # short ones spread a decode-sized step's tokens over more programs
            max_len = 16 if len(slots_per_token) <= 128 else 64
            seg = host_tensor(segments(slots_per_token, max_len=max_len), torch.long, device)
        return cls(token_slots, present, len(slots_per_token), list(slots_per_token), seg_table=seg)


def segments(slots_per_token: list[int], size: int | None = None, max_len: int = 16) -> list[int]:
    """Runs of equal non-negative slot, at most ``max_len`` tokens each (so one adapter's
    tokens spread over several programs), as a flat [start, length, slot] * n table; padded
    with empty segments to ``size`` entries when given (fixed shapes for CUDA graphs)."""
    table: list[int] = []
    t, n = 0, len(slots_per_token)
    while t < n:
        end = t
        while end < n and end - t < max_len and slots_per_token[end] == slots_per_token[t]:
            end += 1
        if slots_per_token[t] >= 0:
            table += [t, end - t, slots_per_token[t]]
        t = end
    if size is not None:
        table += [0, 0, 0] * (size - len(table) // 3)
    return table
