"""LoRA as a transform: ``apply_lora`` wraps every Linear of the decoder layers in a
``LoRALinear`` holding a fixed number of adapter slots; model files stay unaware of LoRA.

Per step the runner puts a ``LoRABatch`` (the slot of each token) in the forward context; a
LoRALinear adds the deltas of the slots present that have weights for it, through the backend
of its device and dtype (``truffula.kernels.select``; ``truffula.kernels.lora_torch`` is the
reference and the CPU path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from truffula.forward import get_forward_context
from truffula.kernels.select import GatedRowFn, LoRABackend, select_kernels
from truffula.layers.linear import Linear

Factors = dict[str | None, tuple[torch.Tensor, torch.Tensor]]
"""shard -> (A [r, in], B [out, r]) of one projection (``truffula.adapters.peft``)."""


class LoRALinear(nn.Module):
    def __init__(
        self, base: Linear, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.base = base
        offsets = getattr(base, "shard_offsets", None) or {None: (0, base.out_features)}
        self.shard_names: list[str | None] = list(offsets)
        self.offsets = [offsets[n][0] for n in self.shard_names]
        self.sizes = [offsets[n][1] for n in self.shard_names]
        self.max_rank = max_rank
        n = len(self.shard_names)
        self.a = torch.zeros(num_slots, n, max_rank, base.in_features, dtype=dtype, device=device)
        # every shard's B side by side ([slots, R, out]); ``bts`` are per-shard views of it
        self.bt = torch.zeros(num_slots, max_rank, base.out_features, dtype=dtype, device=device)
        self.bts = [
            self.bt[:, :, off : off + size]
            for off, size in zip(self.offsets, self.sizes, strict=True)
        ]
        self.loaded = [False] * num_slots
        self.shard_factors: Callable[[Factors], Factors] | None = getattr(base, "shard_lora", None)
        """A tensor-parallel base's cut of an adapter's factors (``layers.parallel_linear``)."""
        self.on_set_slot: Callable[[int, Factors | None], None] | None = None
        """Called with every slot write (tensor parallelism: rank 0 forwards it to the others)."""
        self.kernel: LoRABackend = select_kernels(device, dtype).lora
        # the gathered strategy (CPU) reads the factors laid out as rows too (kept in step with
        # ``a`` and ``bt`` by ``set_slot``)
        self.rows: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        if self.kernel.gathered:
            self.rows = (
                torch.zeros(num_slots * base.in_features, n * max_rank, dtype=dtype),
                [torch.zeros(num_slots * max_rank, size, dtype=dtype) for size in self.sizes],
            )

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_slot(self, slot: int, weights: Factors | None) -> None:
        """Write one adapter's factors into ``slot`` (None clears it). A factor pair given for the
        whole output of a fused projection is split into its shards (same A, B's row ranges)."""
        if self.on_set_slot is not None:
            self.on_set_slot(slot, weights)
        if weights and self.shard_factors is not None:
            weights = self.shard_factors(weights)
        self.a[slot].zero_()
        self.bt[slot].zero_()
        self.loaded[slot] = bool(weights)
        for shard, (a, b) in (weights or {}).items():
            r = a.shape[0]
            if shard is None and len(self.shard_names) > 1:
                parts = [
                    (j, b[off : off + size])
                    for j, (off, size) in enumerate(zip(self.offsets, self.sizes, strict=True))
                ]
            else:
                parts = [(self.shard_names.index(shard), b)]
            for j, bj in parts:
                self.a[slot, j, :r] = a.to(self.a.dtype)
                self.bts[j][slot, :r] = bj.t().to(self.a.dtype)
        if self.rows is not None:
            a_rows, b_rows = self.rows
            d_in, rank = self.in_features, self.max_rank
            a_rows[slot * d_in : (slot + 1) * d_in] = (
                self.a[slot].permute(2, 0, 1).reshape(d_in, -1)
            )
            for b, bt in zip(b_rows, self.bts, strict=True):
                b[slot * rank : (slot + 1) * rank] = bt[slot]

    def gated_row(self, x: torch.Tensor, fn: GatedRowFn) -> torch.Tensor | None:
        """The base layer's ``gated_row`` when the step applies no adapter; else None."""
        return None if get_forward_context().lora is not None else self.base.gated_row(x, fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = get_forward_context().lora
        if lora is None:
            return self.base(x)
        return self.kernel(self, x, lora)


def apply_lora(
    model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
) -> dict[str, LoRALinear]:
    """Wrap each Linear of the model but the LM head; returns name -> LoRALinear."""
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or name.split(".")[-1] in ("lm_head", "embed_out"):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(module, num_slots, max_rank, dtype, device)
        setattr(parent, attr, lora)
        wrapped[name] = lora
    return wrapped
