"""RMSNorm with the fused residual add of pre-norm blocks, in plain torch: the CPU path and the
oracle of ``norm_triton``.

Semantics::

    if residual is given: x = x + residual (in x's dtype), returned as the new residual
    y = x / sqrt(mean(x^2) + eps) * (w + offset), computed in fp32, cast back to x's dtype
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual), or (norm(x), None) without a residual."""
    if residual is not None:
        x = x + residual
        residual = x
    scale = (weight.float() + offset) if offset else weight.float()
    y = F.rms_norm(x.float(), (x.shape[-1],), scale, eps).to(x.dtype)
    return y, residual
