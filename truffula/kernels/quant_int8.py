"""Weight-only int8 linears: symmetric per-output-channel scales, ``y = (x @ q.T) * scale + b``.

CPU: ``torch.ops.aten._weight_int8pack_mm`` (gpt-fast's CPU int8 path) with the activations in
bfloat16 (its float32 variant is a scalar loop, 15-20x slower; measured in docs/models.md) and the
result cast back. Elsewhere (CUDA, or a CPU without the op): dequantize-then-matmul in the
activation dtype, which is exact in the sense that it computes with the dequantized weight.
The reference is ``dequantize(q, scale)`` through ``F.linear`` in float32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], float32 scale [out]); absmax per row / 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def linear_dequant(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The device-independent path: the weight dequantized to x's dtype per call (int8 or
    fp8 alike: ``kernels.quant_fp8`` uses it too)."""
    y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


def linear_cpu(
    x: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., in] -> [..., out] through ``_weight_int8pack_mm`` (bfloat16 activations)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, q, scale_bf16).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], -1)


@functools.cache
def cpu_int8pack_available() -> bool:
    """True when ``_weight_int8pack_mm`` runs here and agrees with the dequantized reference."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=gen)
        x = torch.randn(3, 64, generator=gen)
        q, scale = quantize(w)
        got = linear_cpu(x, q, scale.to(torch.bfloat16), None)
        want = F.linear(x, dequantize(q, scale))
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, want, atol=0.1, rtol=0.05))
