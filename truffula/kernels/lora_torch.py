"""Batched multi-adapter LoRA in plain torch: the CPU path and the oracle of the LoRA kernels.

Semantics, as a loop::

    for each token t whose sequence uses adapter slot s = token_slots[t] >= 0:
        for each shard j of the projection (q/k/v of a fused qkv, or the whole output):
            y[t, off_j : off_j + n_j] += B_j[s] @ (A[s, j] @ x[t])

with ``A [slots, shards, R, in]`` and ``Bt_j [slots, R, n_j]`` (B transposed, scale folded in,
ranks below R zero-padded). Three strategies compute it:

- gathered (the CPU path, ``lora_gather``): each token reads only its own adapter's factors, as
  two weighted embedding-bag sums over factor rows: no per-adapter loop, no compute spent on
  other adapters, no copy of the factors. Fastest on CPU at every batch shape measured.
- dense (decode-sized steps elsewhere): one shrink over the adapters present, ``x @ A_u^T``, a
  one-hot mask that keeps each token's own adapter, one expand per shard.
- segmented (prefill-sized steps elsewhere): tokens grouped by adapter, one matmul pair each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from truffula.device import host_tensor
from truffula.forward import LoRABatch

BAG_CHUNK = 64
"""Longest run of products one embedding bag sums (see ``bag_layout``)."""
DENSE_LIMIT = 4096
"""Use the dense strategy while tokens x adapters present stays under this."""


class LoRAWeights(Protocol):
    """What a LoRA backend reads of a wrapped projection (``truffula.layers.lora.LoRALinear``)."""

    @property
    def base(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The wrapped projection: x [T, in] -> y [T, out]."""

    a: torch.Tensor
    """[slots, shards, R, in]."""
    bt: torch.Tensor
    """[slots, R, out]: every shard's B (transposed, scale folded in) side by side."""
    bts: list[torch.Tensor]
    """Per-shard views of ``bt``: [slots, R, n_j]."""
    offsets: list[int]
    """First output column of each shard."""
    loaded: list[bool]
    """Slots holding weights for this projection."""
    rows: tuple[torch.Tensor, list[torch.Tensor]] | None
    """The factors laid out as rows (gathered strategy only; see ``lora_gather``)."""


class GatheredLoRA:
    """The CPU path: each token reads only its own adapter's factors (``lora_gather``)."""

    gathered = True
    """The wrapped projection keeps its factors as rows too (``LoRAWeights.rows``)."""
    segments = False
    """Steps carry the segment table (``LoRABatch.seg_table``)."""

    def __call__(self, layer: LoRAWeights, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        assert not batch.graph, "decode graphs are captured only with the Triton kernels"
        y = layer.base(x)
        if not any(layer.loaded[s] for s in batch.slots):
            return y
        assert layer.rows is not None
        return lora_gather(y, x, *layer.rows, layer.offsets, batch)


class BatchedLoRA:
    """CUDA without Triton: the dense and segmented strategies (``lora_apply``)."""

    gathered = False
    segments = False

    def __call__(self, layer: LoRAWeights, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        assert not batch.graph, "decode graphs are captured only with the Triton kernels"
        used = tuple(s for s in batch.slots if layer.loaded[s])
        y = layer.base(x)
        if not used:
            return y
        return lora_apply(y, x, layer.a, layer.bts, layer.offsets, used, batch)


def _memo(batch: LoRABatch, key: tuple[object, ...], make: Callable[[], object]) -> Any:
    if key not in batch.memo:
        batch.memo[key] = make()
    return batch.memo[key]


def _rows(batch: LoRABatch, slot: int) -> torch.Tensor:
    """[n] indices of the tokens using ``slot``."""

    def make() -> torch.Tensor:
        idx = [i for i, s in enumerate(batch.host_slots) if s == slot]
        return host_tensor(idx, torch.long, batch.token_slots.device)

    return _memo(batch, ("rows", slot), make)


def _onehot(batch: LoRABatch, used: tuple[int, ...]) -> torch.Tensor:
    """[T, len(used)] float: 1 where the token uses that slot."""

    def make() -> torch.Tensor:
        ref = host_tensor(used, torch.long, batch.token_slots.device)
        return (batch.token_slots.unsqueeze(1) == ref.unsqueeze(0)).float()

    return _memo(batch, ("onehot", used), make)


def bag_layout(
    batch: LoRABatch, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Embedding-bag input for factor rows laid out ``[slots * width, n]``: the indices
    ``slot * width + i`` (i < width) of every adapter token, split into bags of at most
    ``BAG_CHUNK`` (``chunks`` bags per token, summed after: shorter fp32 accumulation
    chains, as accurate as a GEMM; base tokens get empty bags, hence zeros), and the
    adapter tokens' rows (None: every token)."""

    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        host = batch.host_slots
        lora_rows = [t for t, s in enumerate(host) if s >= 0]
        slots = torch.tensor([host[t] for t in lora_rows], dtype=torch.long)
        indices = (slots[:, None] * width + torch.arange(width)).reshape(-1)
        chunks = -(-width // BAG_CHUNK)
        starts = torch.arange(chunks) * BAG_CHUNK
        before = torch.tensor([0] + [int(s >= 0) for s in host[:-1]]).cumsum(0)
        lora = torch.tensor([s >= 0 for s in host])
        offsets = before[:, None] * width + torch.where(lora[:, None], starts, 0)
        dev = batch.token_slots.device
        rows = None if len(lora_rows) == batch.num_tokens else torch.tensor(lora_rows)
        return (
            indices.to(dev),
            offsets.reshape(-1).to(dev),
            None if rows is None else rows.to(dev),
            chunks,
        )

    return _memo(batch, ("bag", width), make)


def _index(batch: LoRABatch, used: tuple[int, ...]) -> torch.Tensor:
    return _memo(
        batch, ("index", used), lambda: host_tensor(used, torch.long, batch.token_slots.device)
    )


def lora_gather(
    y: torch.Tensor,
    x: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: list[torch.Tensor],
    offsets: list[int],
    batch: LoRABatch,
) -> torch.Tensor:
    """The gathered strategy: ``a_rows [slots * in, shards * R]`` holds ``A[s, j, r, d]`` at row
    ``s * in + d``, column ``j * R + r``; ``b_rows[j] [slots * R, n_j]`` holds ``Bt_j[s, r]`` at
    row ``s * R + r``. Adds the deltas to ``y`` in place; returns ``y``."""
    d_in, rank = x.shape[1], a_rows.shape[1] // len(b_rows)
    idx, bag_offsets, rows, chunks = bag_layout(batch, d_in)
    xs = x if rows is None else x.index_select(0, rows)
    shrink = F.embedding_bag(
        idx, a_rows, bag_offsets, mode="sum", per_sample_weights=xs.reshape(-1).to(a_rows.dtype)
    )  # [T * chunks, shards * R], zero rows for base tokens
    shrink = shrink.view(batch.num_tokens, chunks, -1).sum(1)
    h = (shrink if rows is None else shrink.index_select(0, rows)).view(-1, len(b_rows), rank)
    idx_r, offsets_r, _, _ = bag_layout(batch, rank)
    for j, (b, off) in enumerate(zip(b_rows, offsets, strict=True)):
        delta = F.embedding_bag(
            idx_r, b, offsets_r, mode="sum", per_sample_weights=h[:, j].reshape(-1)
        )
        y[:, off : off + b.shape[1]] += delta.to(y.dtype)
    return y


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bts: list[torch.Tensor],
    offsets: list[int],
    used: tuple[int, ...],
    batch: LoRABatch,
) -> torch.Tensor:
    """Add the LoRA deltas of slots ``used`` to ``y`` [T, out] in place; returns ``y``."""
    if batch.num_tokens * len(used) <= DENSE_LIMIT:
        return _dense(y, x, a, bts, offsets, used, batch)
    return _segmented(y, x, a, bts, offsets, used, batch)


def _dense(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bts: list[torch.Tensor],
    offsets: list[int],
    used: tuple[int, ...],
    batch: LoRABatch,
) -> torch.Tensor:
    s_all, n_sh, rank, d_in = a.shape
    u = len(used)
    idx = _index(batch, used)
    au = a if u == s_all else a.index_select(0, idx)
    shrink = (x.to(a.dtype) @ au.reshape(u * n_sh * rank, d_in).t()).view(-1, u, n_sh, rank)
    shrink = shrink * _onehot(batch, used).to(a.dtype)[:, :, None, None]
    for j, (bt, off) in enumerate(zip(bts, offsets, strict=True)):
        btu = bt if u == s_all else bt.index_select(0, idx)
        delta = shrink[:, :, j, :].reshape(-1, u * rank) @ btu.reshape(u * rank, bt.shape[2])
        y[:, off : off + bt.shape[2]] += delta.to(y.dtype)
    return y


def _segmented(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bts: list[torch.Tensor],
    offsets: list[int],
    used: tuple[int, ...],
    batch: LoRABatch,
) -> torch.Tensor:
    for slot in used:
        rows = _rows(batch, slot)
        xs = x.index_select(0, rows).to(a.dtype)
        for j, (bt, off) in enumerate(zip(bts, offsets, strict=True)):
            delta = (xs @ a[slot, j].t()) @ bt[slot]
            y[rows, off : off + bt.shape[2]] += delta.to(y.dtype)
    return y


def lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bts: list[torch.Tensor],
    offsets: list[int],
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """The loop above, literally (tests)."""
    out = y.clone()
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        for j, (bt, off) in enumerate(zip(bts, offsets, strict=True)):
            out[t, off : off + bt.shape[2]] += bt[s].t() @ (a[s, j] @ x[t])
    return out
