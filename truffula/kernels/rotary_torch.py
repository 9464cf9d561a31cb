"""Rotary position embedding (half-rotation layout, as HF transformers) in plain torch: the CPU
path and the oracle of ``rotary_triton``.

Semantics, for each token t with cos/sin looked up at its position (the first ``rot_dim``
dimensions of each head rotate, the rest pass through)::

    x[:rot] * cos + rotate_half(x[:rot]) * sin,  rotate_half(u) = [-u[half:], u[:half]]
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int
) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by cos/sin [T, 1, rot_dim] (x's dtype)."""
    if rot_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
