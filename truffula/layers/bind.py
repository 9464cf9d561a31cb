"""Binding the kernels chosen at start-up into a model's layers."""

from __future__ import annotations

from torch import nn

from truffula.kernels.select import Kernels


def bind_kernels(model: nn.Module, kernels: Kernels) -> None:
    """Call ``use_kernels(kernels)`` on every module that has it (norms, linears, rotary,
    attention, gated MLPs): each resolves its implementation once, so a forward pass makes no
    device or dtype checks."""
    for module in model.modules():
        use = getattr(module, "use_kernels", None)
        if use is not None:
            use(kernels)
