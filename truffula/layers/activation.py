"""Activations of gated MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from truffula.kernels import triton_kernels

_GATES = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str):  # type: ignore[no-untyped-def]
    if name not in _GATES:
        raise ValueError(f"activation {name!r} is not supported ({', '.join(_GATES)})")
    return _GATES[name]


def act_and_mul(x: torch.Tensor, act_name: str) -> torch.Tensor:
    """act(x[..., :d]) * x[..., d:] for a fused [gate | up] projection."""
    if triton_kernels.use(x) and act_name in ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return triton_kernels.act_and_mul(x, gelu=act_name != "silu")
    d = x.shape[-1] // 2
    return activation(act_name)(x[..., :d]) * x[..., d:]
