"""Per-request merged adapters (LoRAX ``merged_adapters``), with LoRAX's semantics.

Each LoRA factor (every A and every B, per module and shard) is merged across the adapters that
have it, with the adapters' weights (default 1 each):

- ``linear``: sum_i w_i T_i
- ``ties``: keep the ``density`` fraction of largest-magnitude entries of each T_i, elect a sign
  per entry (``total``: sign of sum_i T_i; ``frequency``: sign of sum_i sign(T_i)), then average
  the weighted entries that agree with it
- ``dare_linear``: drop entries at random with probability 1 - density, rescale the kept ones by
  1 / density, then the weighted sum
- ``dare_ties``: the DARE drop and rescale, then the TIES sign election and disjoint mean.

All merged adapters must have the same rank. Scales are folded into B before merging (LoRAX
merges unscaled factors and keeps the first adapter's alpha; folding first differs only when the
adapters' alphas differ). DARE's random masks are seeded from the merge specification, so the
same specification always gives the same merged adapter (it is cached under that key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from truffula.adapters.peft import LoRAWeights
from truffula.errors import RequestValidationError

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeSpec:
    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 0.0
    majority_sign_method: str = "total"

    @classmethod
    def parse(
        cls,
        ids: list[str] | None,
        weights: list[float] | None,
        strategy: str | None,
        density: float | None,
        sign: str | None,
    ) -> MergeSpec:
        """Validate with LoRAX's messages (and reject what LoRAX would crash on)."""
        if not ids:
            raise RequestValidationError(
                "merged_adapters",
                "at least one adapter ID must be provided when setting `adapters`",
            )
        if weights and len(weights) != len(ids):
            raise RequestValidationError(
                "merged_adapters", "number of adapter IDs must match number of adapter weights"
            )
        strategy = strategy or "linear"
        if strategy not in STRATEGIES:
            raise RequestValidationError(
                "merge_strategy",
                f"`merge_strategy` must be one of {list(STRATEGIES)}. Given: {strategy!r}",
            )
        sign = sign or "total"
        if sign not in SIGN_METHODS:
            raise RequestValidationError(
                "majority_sign_method",
                f"`majority_sign_method` must be one of {list(SIGN_METHODS)}. Given: {sign!r}",
            )
        density = 0.0 if density is None else float(density)
        if not 0.0 <= density <= 1.0:
            raise RequestValidationError(
                "density", f"`density` must be >= 0.0 and <= 1.0. Given: {density}"
            )
        if strategy != "linear" and density == 0.0:
            raise RequestValidationError(
                "density", f"`density` must be > 0 for the {strategy} merge strategy"
            )
        return cls(
            tuple(ids),
            tuple(float(w) for w in (weights or [1.0] * len(ids))),
            strategy,
            density,
            sign,
        )

    @property
    def key(self) -> str:
        body = json.dumps(
            [self.ids, self.weights, self.strategy, self.density, self.majority_sign_method]
        )
        return "merge:" + body

    def seed(self) -> int:
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "little")


def merge(spec: MergeSpec, adapters: list[LoRAWeights]) -> LoRAWeights:
    ranks = {a.rank for a in adapters}
    if len(ranks) > 1:
        raise RequestValidationError(
            "merged_adapters",
            f"unable to merge adapters, lora configs have different ranks: {sorted(ranks)}",
        )
    gen = torch.Generator().manual_seed(spec.seed())
    out = LoRAWeights(spec.key, adapters[0].rank, config={"merged": list(spec.ids)})
    modules = sorted(
        {(m, s) for a in adapters for m, shards in a.modules.items() for s in shards}, key=str
    )
    for module, shard in modules:
        have = [
            (w, a.modules[module][shard])
            for w, a in zip(spec.weights, adapters, strict=True)
            if shard in a.modules.get(module, {})
        ]
        weights = torch.tensor([w for w, _ in have])
        merged_a = merge_tensors([ab[0] for _, ab in have], weights, spec, gen)
        merged_b = merge_tensors([ab[1] for _, ab in have], weights, spec, gen)
        out.modules.setdefault(module, {})[shard] = (merged_a, merged_b)
    return out


def merge_tensors(
    tensors: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec, gen: torch.Generator
) -> torch.Tensor:
    t = torch.stack(tensors)
    w = weights.view(-1, *([1] * (t.dim() - 1)))
    if spec.strategy == "linear":
        return (t * w).sum(0)
    if spec.strategy in ("ties", "dare_ties"):
        t = (
            _magnitude_prune(t, spec.density)
            if spec.strategy == "ties"
            else _random_prune(t, spec.density, gen)
        )
        sign = t.sign()
        score = (sign * t.abs()).sum(0) if spec.majority_sign_method == "total" else sign.sum(0)
        majority = torch.where(score >= 0, 1.0, -1.0)
        agree = (sign == majority).to(t.dtype)
        return (t * w * agree).sum(0) / agree.sum(0).clamp(min=1.0)
    return (_random_prune(t, spec.density, gen) * w).sum(0)  # dare_linear


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    flat = t.reshape(t.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    if k > 0:
        mask.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
    return (flat * mask).view_as(t)


def _random_prune(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    keep = torch.rand(t.shape, generator=gen) < density
    return t * keep / density
