"""4-bit weights: asymmetric groups of ``GROUP`` input columns, ``w ≈ q * scale + low``.

Layout (``Int4Weight``): ``packed`` uint8 [out, in / 2], element ``2j`` in the low nibble and
``2j + 1`` in the high one; ``scale`` and ``low`` float32 [out, in / GROUP]. ``quantize`` rounds
to nearest (RTN) between each group's minimum and maximum; GPTQ and AWQ checkpoints map onto the
same layout exactly (``low = -zero * scale``).

CPU: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` where it runs and agrees with the reference
(torch's convention: ``w = (q - 8) * scale + zero``, so ``zero = low + 8 * scale``), with bfloat16
activations; else dequantize-then-matmul. CUDA: ``kernels.quant_int4_triton``. The reference,
in float32, is ``F.linear(x, dequantize(...))``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP = 128
"""Input columns sharing one scale and minimum (AWQ's and GPTQ's usual group size)."""


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    group: int = GROUP

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2


GROUPS = (128, 64, 32)
"""Group sizes tried, largest first, for a weight's input width (SmolLM2's 576 takes 64)."""


def group_for(in_features: int) -> int | None:
    """The largest of ``GROUPS`` that divides ``in_features``; None: none does."""
    return next((g for g in GROUPS if in_features % g == 0), None)


def pack(q: torch.Tensor) -> torch.Tensor:
    """[out, in] integers in 0..15 -> uint8 [out, in / 2] (even columns in the low nibble)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> uint8 [out, in] in 0..15."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def quantize(weight: torch.Tensor, group: int = GROUP) -> Int4Weight:
    """[out, in] float -> ``Int4Weight`` by round-to-nearest between each group's min and max."""
    out, n_in = weight.shape
    w = weight.detach().float().reshape(out, n_in // group, group)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return Int4Weight(pack(q.reshape(out, n_in)), scale.contiguous(), lo.contiguous(), group)


def from_integers(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
) -> Int4Weight:
    """The layout of a checkpoint's unpacked integers ``q`` [out, in] (0..15), ``scale`` and
    integer ``zero`` [out, in / group] (GPTQ, AWQ: ``w = (q - zero) * scale``)."""
    s = scale.float()
    return Int4Weight(pack(q), s.contiguous(), (-zero.float() * s).contiguous(), group)


def quantize_best(weight: torch.Tensor) -> Int4Weight | None:
    """``quantize`` with the largest group of ``GROUPS`` that divides the input width, unless
    groups of 32 hold the weight exactly (weights dequantized from 4-bit 32-blocks, as
    llama.cpp's Q4_0 and Q4_1 and the default model's GGUF, also once rounded to 16 bits):
    then those, losing nothing but that rounding.
    None: no group divides the width."""
    group = group_for(weight.shape[1])
    if group is None:
        return None
    if group != 32 and weight.shape[1] % 32 == 0 and _exact_in_32(weight[:8]):
        fine = quantize(weight, 32)
        if _exact_in_32(weight, fine):
            return fine
    return quantize(weight, group)


def _exact_in_32(weight: torch.Tensor, fine: Int4Weight | None = None) -> bool:
    """Whether groups of 32 hold ``weight`` up to its own dtype's rounding (a 16-bit copy of
    4-bit values, the group's extremes too, is off by up to half a unit in the last place of
    the group's largest value) and a thousandth of their step (``fine``: its quantization in
    groups of 32, made here if not given)."""
    fine = fine if fine is not None else quantize(weight, 32)
    absmax = torch.maximum(fine.low.abs(), (fine.low + 15 * fine.scale).abs())
    tol = fine.scale * 1e-3 + absmax * torch.finfo(weight.dtype).eps  # [out, groups]
    err = (dequantize(fine) - weight.float()).abs().reshape(*fine.scale.shape, 32)
    return bool((err <= tol[..., None]).all())


def dequantize(w: Int4Weight) -> torch.Tensor:
    """float32 [out, in]."""
    out, n_in = w.shape
    q = unpack(w.packed).float().reshape(out, n_in // w.group, w.group)
    return (q * w.scale[..., None] + w.low[..., None]).reshape(out, n_in)


def linear_dequant(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """The device-independent path: the weight dequantized to x's dtype per call."""
    return F.linear(x, dequantize(w).to(x.dtype), bias)


def reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), dequantize(w), None if bias is None else bias.float())


# ---------------------------------------------------------------------------------- CPU
@dataclass(frozen=True)
class CpuInt4:
    """torch's CPU int4 layout of one weight."""

    packed: torch.Tensor
    scale_and_zero: torch.Tensor
    group: int


def to_cpu_layout(w: Int4Weight) -> CpuInt4:
    q = unpack(w.packed).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = w.low + 8 * w.scale
    sz = torch.stack((w.scale, zero), dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
    return CpuInt4(packed, sz.to(torch.bfloat16), w.group)


def linear_cpu(x: torch.Tensor, w: CpuInt4, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] through ``_weight_int4pack_mm_for_cpu`` (bfloat16 activations)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.bfloat16:  # each call skipped is a few µs of a decode step's ~120
        x2 = x2.to(torch.bfloat16)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group, w.scale_and_zero)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], -1)


@functools.cache
def cpu_int4pack_available() -> bool:
    """True when torch's CPU int4 matmul runs here and agrees with the reference."""
    if getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None) is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = quantize(torch.randn(48, 256, generator=gen))
        x = torch.randn(3, 256, generator=gen)
        got = linear_cpu(x, to_cpu_layout(w), None)
        want = reference(x, w, None)
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, want, atol=0.15, rtol=0.05))
