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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from truffula.device import host_tensor

BAG_CHUNK = 64
"""Longest run of products one embedding bag sums (see ``LoRABatch.bag``)."""
DENSE_LIMIT = 4096
"""Use the dense strategy while tokens x adapters present stays under this."""


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
    """[segments * 3] (start, length, slot) runs of equal slot, for the CUDA kernels."""
    cache: dict[object, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, slots_per_token: list[int], device: torch.device) -> LoRABatch | None:
        present = sorted({s for s in slots_per_token if s >= 0})
        if not present:
            return None
        token_slots = host_tensor(slots_per_token, torch.long, device)
        seg = None
        if device.type == "cuda":
            # long segments (prefill) let each program reuse its factor tiles over 64 tokens;
            # short ones spread a decode-sized step's tokens over more programs
            max_len = 16 if len(slots_per_token) <= 128 else 64
            seg = host_tensor(segments(slots_per_token, max_len=max_len), torch.long, device)
        return cls(token_slots, present, len(slots_per_token), list(slots_per_token), seg_table=seg)

    def rows(self, slot: int) -> torch.Tensor:
        """[n] indices of the tokens using ``slot``."""
        key = ("rows", slot)
        if key not in self.cache:
            idx = [i for i, s in enumerate(self.host_slots) if s == slot]
            self.cache[key] = host_tensor(idx, torch.long, self.token_slots.device)
        return self.cache[key]

    def onehot(self, used: tuple[int, ...]) -> torch.Tensor:
        """[T, len(used)] float: 1 where the token uses that slot."""
        key = ("onehot", used)
        if key not in self.cache:
            ref = host_tensor(used, torch.long, self.token_slots.device)
            self.cache[key] = (self.token_slots.unsqueeze(1) == ref.unsqueeze(0)).float()
        return self.cache[key]

    def bag(self, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Embedding-bag input for factor rows laid out ``[slots * width, n]``: the indices
        ``slot * width + i`` (i < width) of every adapter token, split into bags of at most
        ``BAG_CHUNK`` (``chunks`` bags per token, summed after: shorter fp32 accumulation
        chains, as accurate as a GEMM; base tokens get empty bags, hence zeros), and the
        adapter tokens' rows (None: every token)."""
        key = ("bag", width)
        if key not in self.cache:
            lora_rows = [t for t, s in enumerate(self.host_slots) if s >= 0]
            slots = torch.tensor([self.host_slots[t] for t in lora_rows], dtype=torch.long)
            indices = (slots[:, None] * width + torch.arange(width)).reshape(-1)
            chunks = -(-width // BAG_CHUNK)
            starts = torch.arange(chunks) * BAG_CHUNK
            before = torch.tensor([0] + [int(s >= 0) for s in self.host_slots[:-1]]).cumsum(0)
            lora = torch.tensor([s >= 0 for s in self.host_slots])
            offsets = before[:, None] * width + torch.where(lora[:, None], starts, 0)
            dev = self.token_slots.device
            rows = None if len(lora_rows) == self.num_tokens else torch.tensor(lora_rows)
            self.cache[key] = (
                indices.to(dev),
                offsets.reshape(-1).to(dev),
                None if rows is None else rows.to(dev),
                chunks,
            )
        return self.cache[key]  # type: ignore[return-value]

    def index(self, used: tuple[int, ...]) -> torch.Tensor:
        key = ("index", used)
        if key not in self.cache:
            self.cache[key] = host_tensor(used, torch.long, self.token_slots.device)
        return self.cache[key]


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
    idx, bag_offsets, rows, chunks = batch.bag(d_in)
    xs = x if rows is None else x.index_select(0, rows)
    shrink = F.embedding_bag(
        idx, a_rows, bag_offsets, mode="sum", per_sample_weights=xs.reshape(-1).to(a_rows.dtype)
    )  # [T * chunks, shards * R], zero rows for base tokens
    shrink = shrink.view(batch.num_tokens, chunks, -1).sum(1)
    h = (shrink if rows is None else shrink.index_select(0, rows)).view(-1, len(b_rows), rank)
    idx_r, offsets_r, _, _ = batch.bag(rank)
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


def _dense(y, x, a, bts, offsets, used, batch):  # type: ignore[no-untyped-def]
    s_all, n_sh, rank, d_in = a.shape
    u = len(used)
    idx = batch.index(used)
    au = a if u == s_all else a.index_select(0, idx)
    shrink = (x.to(a.dtype) @ au.reshape(u * n_sh * rank, d_in).t()).view(-1, u, n_sh, rank)
    shrink = shrink * batch.onehot(used).to(a.dtype)[:, :, None, None]
    for j, (bt, off) in enumerate(zip(bts, offsets, strict=True)):
        btu = bt if u == s_all else bt.index_select(0, idx)
        delta = shrink[:, :, j, :].reshape(-1, u * rank) @ btu.reshape(u * rank, bt.shape[2])
        y[:, off : off + bt.shape[2]] += delta.to(y.dtype)
    return y


def _segmented(y, x, a, bts, offsets, used, batch):  # type: ignore[no-untyped-def]
    for slot in used:
        rows = batch.rows(slot)
        xs = x.index_select(0, rows).to(a.dtype)
        for j, (bt, off) in enumerate(zip(bts, offsets, strict=True)):
            delta = (xs @ a[slot, j].t()) @ bt[slot]
            y[rows, off : off + bt.shape[2]] += delta.to(y.dtype)
    return y


def lora_reference(y, x, a, bts, offsets, token_slots):  # type: ignore[no-untyped-def]
    """The loop above, literally (tests)."""
    out = y.clone()
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        for j, (bt, off) in enumerate(zip(bts, offsets, strict=True)):
            out[t, off : off + bt.shape[2]] += bt[s].t() @ (a[s, j] @ x[t])
    return out
