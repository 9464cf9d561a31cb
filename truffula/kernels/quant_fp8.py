"""fp8 (e4m3) linears: weights with symmetric per-output-channel scales, ``w ≈ q * s``.

On CUDA (compute capability 8.9+, ``kernels.quant_fp8_triton``): a one-row step reads the fp8
weight in the Triton GEMV with 16-bit activations (weight-only); larger steps quantize each
activation row to fp8 with its own scale (dynamic, per token) and run ``torch._scaled_mm``
(W8A8, both scales applied in the GEMM's epilogue). Elsewhere (CPU): weight-only,
dequantize-then-matmul in the activation dtype. The references below, in float32, are the test
oracles of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# weight-only, dequantize-then-matmul: ``q.to(x.dtype)`` reads int8 and e4m3 alike
from truffula.kernels.quant_int8 import linear_dequant as linear_dequant

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite e4m3fn value."""
MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with fp8 tensor cores (Ada, Hopper and newer)."""


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (fp8 [out, in], float32 scale [out]); absmax per row / 448."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (fp8 [M, K], float32 scale [M, 1]): each row by its own absmax / 448 (the
    reference of the Triton kernel that quantizes activations)."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def reference(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    activations: bool,
) -> torch.Tensor:
    """float32 ``x @ dequantize(q, scale)^T (+ bias)``; ``activations``: with each row of x
    first quantized to fp8 and back (what the W8A8 path computes)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if activations:
        xq, xs = quantize_rows(x2)
        x2 = xq.float() * xs
    y = F.linear(x2, dequantize(q, scale), None if bias is None else bias.float())
    return y.reshape(*x.shape[:-1], -1)


def check_device(device: torch.device) -> None:
    """ValueError naming the flag when ``device`` is a GPU without fp8 tensor cores."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"--quantization fp8 needs a GPU of compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper); {name} is "
            f"{cap[0]}.{cap[1]} (use --quantization int8)"
        )
