"""Per-step batch metadata, carried to attention, rotary and LoRA layers through one scoped context.

The model signature stays ``forward(input_ids, positions)``; layers that need to know the batch
layout call ``get_forward_context()`` inside ``with forward_context(ctx):``. The runner builds
one ``ForwardContext`` per step (``truffula.runner.context``); layers only read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from truffula.forward.lora import LoRABatch


@dataclass
class AttentionMetadata:
    """Layout of one step's flattened tokens over the paged KV cache.

    Sequences are ordered decodes first (one query token each), then prefill chunks.
    Token ``t`` of the step belongs to sequence ``s`` when
    ``query_start_loc[s] <= t < query_start_loc[s + 1]``.
    """

    slot_mapping: torch.Tensor
    """[num_tokens] int64: cache slot (block * block_size + offset) each new token is written to."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int32: the KV blocks of each sequence, padded with 0."""
    seq_lens: torch.Tensor
    """[num_seqs] int32: tokens in the cache for each sequence after this step."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32: prefix sums of the query lengths."""
    num_decodes: int
    """Sequences (and tokens) at the front with exactly one query token."""
    max_query_len: int
    max_seq_len: int
    block_size: int
    seq_lens_cpu: list[int] = field(default_factory=list)
    query_start_loc_cpu: list[int] = field(default_factory=list)
    tiles: torch.Tensor | None = None
    """[4, N] int32 (sequence, first query token, piece, pieces) of each query tile or piece of
    one (``runner.graphs.tile_map``), sequence -1 past the last: set in
    a CUDA graph of a step with prefill chunks, where the CPU lists above are not the step's and
    the attention kernel reads the layout from device memory alone
    (``kernels.attention_varlen_triton``)."""
    request_ids: list[str] = field(default_factory=list)
    """Request of each sequence (read by the transformers fallback, which caches per request)."""
    memo: dict[tuple[object, ...], object] = field(default_factory=dict)
    """What the torch attention kernel derives from the fields above (gather slots, masks, a
    single stream's slot range), made on first use and shared by every layer of the step; a
    pure function of the fields."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionFn(Protocol):
    """Paged attention: writes the step's keys and values to their cache slots, then attends.

    q [T, H, d], k/v [T, Hkv, d], caches [num_slots, Hkv, d] -> [T, H, d]."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class ForwardContext:
    """Everything a layer may read about the step besides its inputs."""

    attn: AttentionMetadata
    lora: LoRABatch | None = None
    """The adapter slot of each token, or None for a base-only step."""
    cos: torch.Tensor | None = None
    """[T, 1, rot_dim] rotary cosines of each token's position, in the model's dtype; None when
    the model has no rotary embedding or its kernel looks them up by position itself."""
    sin: torch.Tensor | None = None
    """[T, 1, rot_dim] rotary sines, as ``cos``."""


_CONTEXT: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("model layers were called outside forward_context()")
    return _CONTEXT
