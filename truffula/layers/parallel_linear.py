"""Tensor-parallel layers: each rank holds its part of a weight, cut from the checkpoint tensor
by the layer's ``weight_loader`` (``truffula.models.loader`` hands every rank the whole tensor).

- ``ColumnParallelLinear`` / ``ColumnParallelMergedLinear``: output rows sharded (the LM head's
  vocabulary; q/k/v by head, gate/up): each rank computes its slice of the output.
- ``RowParallelLinear``: input columns sharded (o_proj, down_proj): each rank computes a
  partial sum of the whole output; the block that owns it sums the partials over the ranks
  (``truffula.models.sharding``), after the LoRA delta joins them. The bias is loaded on rank 0
  only (zeros elsewhere), so the sum holds it once.
- ``VocabParallelEmbedding``: vocabulary rows sharded; a token outside a rank's rows reads
  zeros there, and the sum over the ranks is the embedding.

A layer's ``checkpoint_part`` names the part of a checkpoint tensor it needs, so the loader reads
only that from a safetensors file; its ``weight_loader`` takes that part, or the whole tensor.

The layers keep the usual ``in_features`` / ``out_features`` / ``shard_offsets`` of what the
rank holds; ``logical_shape`` gives the unsharded shape an adapter is checked against, and
``shard_lora`` cuts an adapter's factors as S-LoRA does: B by output rows for column-parallel
layers (A whole), A by input columns for row-parallel ones (B whole). The collectives come from
the group object the caller passes (``truffula.distributed.parallel.TensorParallel``).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from truffula.layers.linear import Linear, MergedLinear

Part = tuple[int, int, int] | None
"""(dim, start, length) of a checkpoint tensor a rank needs (``checkpoint_part``); None: all."""
LoRAFactors = dict[str | None, tuple[torch.Tensor, torch.Tensor]]
"""shard -> (A [r, in], B [out, r]), as ``truffula.adapters.peft`` reads them."""


class Group(Protocol):
    """What the layers use of a tensor-parallel group."""

    rank: int
    world: int

    def shard(self, size: int) -> tuple[int, int]: ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...


class ColumnParallelLinear(Linear):
    """Rows ``[start, start + out / world)`` of a ``[out, in]`` weight (and bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: Group) -> None:
        self.row_start, rows = group.shard(out_features)
        super().__init__(in_features, rows, bias)
        self.full_out = out_features

    def checkpoint_part(self, leaf: str, shard: str | None) -> Part:
        return 0, self.row_start, self.out_features

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None
    ) -> None:
        part = _part(loaded, 0, self.row_start, self.out_features, self.full_out)
        super().weight_loader(param, part, shard)

    def logical_shape(self, shard: str | None) -> tuple[int, int]:
        return self.full_out, self.in_features

    def shard_lora(self, weights: LoRAFactors) -> LoRAFactors:
        return {
            s: (a, _rows(b, self.row_start, self.out_features)) for s, (a, b) in weights.items()
        }


class ColumnParallelMergedLinear(MergedLinear):
    """Projections stacked along the output (q/k/v, gate/up), each sharded by rows: this rank
    holds rows ``[start, start + n)`` of every projection (``ranges``; default: its equal part),
    side by side. Ranges may overlap between ranks (KV heads replicated when the ranks outnumber
    them)."""

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str, int],
        bias: bool,
        group: Group,
        ranges: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        if ranges is None:
            for name, size in shard_sizes.items():
                if size % group.world:
                    raise ValueError(f"{name}: {size} rows do not split over {group.world} ranks")
            ranges = {n: group.shard(size) for n, size in shard_sizes.items()}
        super().__init__(in_features, {n: ranges[n][1] for n in shard_sizes}, bias)
        self.full_sizes = dict(shard_sizes)
        self.ranges = ranges

    def _local(self, shard: str, t: torch.Tensor) -> torch.Tensor:
        return _part(t, 0, *self.ranges[shard], self.full_sizes[shard])

    def checkpoint_part(self, leaf: str, shard: str | None) -> Part:
        return None if shard is None else (0, *self.ranges[shard])

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None
    ) -> None:
        if shard is None:  # the checkpoint stores the fused matrix (Phi-3): cut each part
            start = 0
            for name, size in self.full_sizes.items():
                part = loaded[start : start + size]
                super().weight_loader(param, self._local(name, part), name)
                start += size
            if start != loaded.shape[0]:
                raise ValueError(f"shape {tuple(loaded.shape)} is not {start} fused rows")
            return
        super().weight_loader(param, self._local(str(shard), loaded), shard)

    def logical_shape(self, shard: str | None) -> tuple[int, int]:
        out = sum(self.full_sizes.values()) if shard is None else self.full_sizes[shard]
        return out, self.in_features

    def shard_lora(self, weights: LoRAFactors) -> LoRAFactors:
        named: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for shard, (a, b) in weights.items():
            if shard is None:  # B of the whole fused output: cut into the projections first
                start = 0
                for name, size in self.full_sizes.items():
                    named[name] = (a, b[start : start + size])
                    start += size
            else:
                named[shard] = (a, b)
        return {s: (a, self._local(s, b)) for s, (a, b) in named.items()}


class RowParallelLinear(Linear):
    """Columns ``[start, start + in / world)`` of a ``[out, in]`` weight: a partial sum of the
    output (the caller sums over the ranks); the bias on rank 0 only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: Group) -> None:
        self.col_start, cols = group.shard(in_features)
        super().__init__(cols, out_features, bias)
        self.full_in = in_features
        self.rank = group.rank

    def checkpoint_part(self, leaf: str, shard: str | None) -> Part:
        return (1, self.col_start, self.in_features) if leaf == "weight" else None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None
    ) -> None:
        if loaded.dim() == 2:
            loaded = _part(loaded, 1, self.col_start, self.in_features, self.full_in)
        elif self.rank != 0:  # the bias: added once, by rank 0's partial sum
            loaded = torch.zeros_like(loaded)
        super().weight_loader(param, loaded, shard)

    def logical_shape(self, shard: str | None) -> tuple[int, int]:
        return self.out_features, self.full_in

    def shard_lora(self, weights: LoRAFactors) -> LoRAFactors:
        return {
            s: (a.narrow(1, self.col_start, self.in_features), b) for s, (a, b) in weights.items()
        }


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[start, start + vocab / world)`` of the embedding; ``forward`` sums the ranks'
    lookups (each token found on exactly one rank)."""

    def __init__(self, vocab: int, hidden: int, group: Group) -> None:
        self.vocab_start, rows = group.shard(vocab)
        super().__init__(rows, hidden)
        self.weight.requires_grad_(False)
        self.group = group
        self.full_vocab = vocab

    def checkpoint_part(self, leaf: str, shard: str | None) -> Part:
        return 0, self.vocab_start, self.num_embeddings

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None
    ) -> None:
        part = _part(loaded, 0, self.vocab_start, self.num_embeddings, self.full_vocab)
        if part.shape != param.shape:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(torch.where(inside, local, 0), self.weight)
        x = x.masked_fill(~inside.unsqueeze(-1), 0)
        return self.group.all_reduce(x)


def _rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    if t.shape[0] < start + n:
        raise ValueError(f"shape {tuple(t.shape)} has no rows {start}..{start + n}")
    return t.narrow(0, start, n)


def _part(t: torch.Tensor, dim: int, start: int, n: int, full: int) -> torch.Tensor:
    """This rank's ``[start, start + n)`` along ``dim`` of a whole checkpoint tensor (``full``
    long there), or ``t`` as it is when the loader read only that part (``checkpoint_part``)."""
    if t.shape[dim] == n and n != full:
        return t
    if t.shape[dim] != full:
        raise ValueError(f"shape {tuple(t.shape)} is neither {full} nor {n} long in dim {dim}")
    return t.narrow(dim, start, n)
