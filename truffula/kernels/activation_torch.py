"""Activations of MLPs in plain torch: the CPU path and the oracle of ``activation_triton``.

A gated MLP's fused [gate | up] projection goes through ``act(x[..., :d]) * x[..., d:]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]

_GATES: dict[str, Activation] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Activation:
    """The activation a HF config names (``hidden_act``)."""
    if name not in _GATES:
        raise ValueError(f"activation {name!r} is not supported ({', '.join(_GATES)})")
    return _GATES[name]


def act_and_mul(x: torch.Tensor, act_name: str) -> torch.Tensor:
    """act(x[..., :d]) * x[..., d:] for a fused [gate | up] projection (the reference)."""
    d = x.shape[-1] // 2
    return activation(act_name)(x[..., :d]) * x[..., d:]


def gated(act_name: str) -> Activation:
    """``act_and_mul`` with the activation looked up once."""
    act = activation(act_name)

    def act_mul(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return act(x[..., :d]) * x[..., d:]

    return act_mul
