"""RMSNorm (with the fused residual add of pre-norm blocks) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from truffula.kernels import norm_torch
from truffula.kernels.select import Kernels, RMSNormFn


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` in fp32, cast back; ``offset=1`` gives Gemma's ``(1 + w)`` scaling."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.kernel: RMSNormFn = norm_torch.add_rms_norm
        self.scale: torch.Tensor | None = None

    def use_kernels(self, kernels: Kernels) -> None:
        """Bound after the weights load: the torch kernel gets ``(w + offset)`` in float32
        made once here, not per call (the same values; on a CPU a decode step runs two norms
        a layer, each conversion a few µs)."""
        self.kernel = kernels.rms_norm
        self.scale = None
        if self.kernel is norm_torch.add_rms_norm and self.weight.device.type != "meta":
            self.scale = self.weight.detach().float() + self.offset

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: norm(x). With it: (norm(x + residual), x + residual)."""
        if self.scale is not None:
            y, res = self.kernel(x, residual, self.scale, self.eps, 0.0)
        else:
            y, res = self.kernel(x, residual, self.weight, self.eps, self.offset)
        return y if res is None else (y, res)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 with the same (x, residual) calling convention as RMSNorm."""

    def __init__(self, dim: int, eps: float, bias: bool = True) -> None:
        super().__init__(dim, eps=eps, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), bias, self.eps)
        y = y.to(x.dtype)
        return y if residual is None else (y, residual)
