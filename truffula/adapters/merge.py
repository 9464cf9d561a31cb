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
import math
from dataclasses import dataclass

import torch

from truffula.adapters.peft import LoRAWeights
from truffula.errors import RequestValidationError

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_MERGED_ADAPTERS = 16
"""Default bound on ``merged_adapters.ids`` (``LoRAConfig.max_merged_adapters``)."""
MAX_MERGE_WEIGHT = 100.0
"""Bound on ``|weight|``: A and B are both weighted, so a weight w scales the update by w**2."""
MAX_ADAPTER_ID_LENGTH = 256
"""Longest adapter id (a path under the adapter root or a hub id), in characters."""
MIN_DENSITY = 1e-6
"""Smallest density of the pruning strategies (DARE rescales the kept entries by 1 / density)."""
KEY_PREFIX = "merge:"


def check_adapter_id(adapter_id: object, field: str = "adapter_id") -> str:
    """A non-empty string of at most ``MAX_ADAPTER_ID_LENGTH`` printable characters."""
    if not isinstance(adapter_id, str) or not adapter_id:
        raise RequestValidationError(field, f"`{field}` must be a non-empty string")
    if len(adapter_id) > MAX_ADAPTER_ID_LENGTH:
        raise RequestValidationError(
            field,
            f"`{field}` must be at most {MAX_ADAPTER_ID_LENGTH} characters. "
            f"Given: {len(adapter_id)}",
        )
    try:
        adapter_id.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestValidationError(
            field, f"`{field}` must be valid Unicode (no lone surrogates)"
        ) from None
    if not adapter_id.isprintable():
        raise RequestValidationError(field, f"`{field}` must not contain control characters")
    return adapter_id


def _real(field: str, value: object, label: str | None = None) -> float:
    label = label or field
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestValidationError(
            field, f"`{label}` must be a number. Given: a {type(value).__name__}"
        )
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise RequestValidationError(field, f"`{label}` must be finite. Given: {out}")
    return out


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
        max_ids: int = MAX_MERGED_ADAPTERS,
    ) -> MergeSpec:
        """Validate with LoRAX's messages (and reject what LoRAX would crash on): at most
        ``max_ids`` ids of at most ``MAX_ADAPTER_ID_LENGTH`` characters, finite weights within
        ``MAX_MERGE_WEIGHT``, a density in [0, 1] (in [``MIN_DENSITY``, 1] but for ``linear``,
        which ignores it)."""
        if ids is not None and not isinstance(ids, list | tuple):
            raise RequestValidationError(
                "merged_adapters", "`merged_adapters.ids` must be a list of adapter ids"
            )
        if not ids:
            raise RequestValidationError(
                "merged_adapters",
                "at least one adapter ID must be provided when setting `adapters`",
            )
        if len(ids) > max_ids:
            raise RequestValidationError(
                "merged_adapters",
                f"`merged_adapters.ids` may name at most {max_ids} adapters. Given: {len(ids)}",
            )
        for adapter_id in ids:
            check_adapter_id(adapter_id, "merged_adapters")
            if adapter_id.startswith(KEY_PREFIX):
                raise RequestValidationError(
                    "merged_adapters", "`merged_adapters.ids` cannot name a merged adapter"
                )
        if weights is not None and not isinstance(weights, list | tuple):
            raise RequestValidationError(
                "merged_adapters", "`merged_adapters.weights` must be a list of numbers"
            )
        if weights and len(weights) != len(ids):
            raise RequestValidationError(
                "merged_adapters", "number of adapter IDs must match number of adapter weights"
            )
        values = (
            [_real("merged_adapters", w, "merged_adapters.weights") for w in weights]
            if weights
            else [1.0] * len(ids)
        )
        if any(abs(w) > MAX_MERGE_WEIGHT for w in values):
            raise RequestValidationError(
                "merged_adapters",
                f"`merged_adapters.weights` must be in [-{MAX_MERGE_WEIGHT:g}, "
                f"{MAX_MERGE_WEIGHT:g}]. Given: {max(values, key=abs):g}",
            )
        strategy = strategy or "linear"
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise RequestValidationError(
                "merge_strategy",
                f"`merge_strategy` must be one of {list(STRATEGIES)}. Given: {strategy!r:.60}",
            )
        sign = sign or "total"
        if not isinstance(sign, str) or sign not in SIGN_METHODS:
            raise RequestValidationError(
                "majority_sign_method",
                f"`majority_sign_method` must be one of {list(SIGN_METHODS)}. Given: {sign!r:.60}",
            )
        density = 0.0 if density is None else _real("density", density)
        if not 0.0 <= density <= 1.0:
            raise RequestValidationError(
                "density", f"`density` must be >= 0.0 and <= 1.0. Given: {density}"
            )
        if strategy != "linear" and density < MIN_DENSITY:
            raise RequestValidationError(
                "density",
                f"`density` must be > 0 (at least {MIN_DENSITY:g}) for the {strategy} merge "
                f"strategy. Given: {density:g}",
            )
        if strategy == "linear":
            density = 0.0  # unused: one key for every density
        return cls(tuple(ids), tuple(values), strategy, density, sign)

    @classmethod
    def from_key(cls, key: str, max_ids: int = MAX_MERGED_ADAPTERS) -> MergeSpec:
        """The specification a ``key`` was made from (validated again)."""
        try:
            ids, weights, strategy, density, sign = json.loads(key.removeprefix(KEY_PREFIX))
        except (ValueError, TypeError) as exc:
            raise RequestValidationError(
                "adapter_id", f"{key[:60]!r} is not a merged adapter key"
            ) from exc
        return cls.parse(ids, weights, strategy, density, sign, max_ids)

    @property
    def key(self) -> str:
        body = json.dumps(
            [self.ids, self.weights, self.strategy, self.density, self.majority_sign_method]
        )
        return KEY_PREFIX + body

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
        if not (bool(merged_a.isfinite().all()) and bool(merged_b.isfinite().all())):
            raise RequestValidationError(
                "merged_adapters",
                f"merging these adapters with these weights gives non-finite values in {module}",
            )
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
