"""Linear layers on x86 CPUs with weights pre-packed once for oneDNN.

``torch.nn.functional.linear`` re-reads a [out, in] fp32 weight in a layout that is slow for
the skinny activations of decoding; oneDNN's reordered weight streams at close to memory
bandwidth. Semantics are exactly ``F.linear(x, weight, bias)`` (same fp32 arithmetic, another
summation order). The reference is ``F.linear`` itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def pack(weight: torch.Tensor) -> torch.Tensor:
    """Reorder a [out, in] weight into oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] with a weight from ``pack``."""
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), packed, bias).reshape(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """True when oneDNN packing works here and matches F.linear on a small check."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=gen).to(dtype)
        b = torch.randn(48, generator=gen).to(dtype)
        x = torch.randn(3, 32, generator=gen).to(dtype)
        got = linear(x, pack(w), b).float()
        want = F.linear(x.float(), w.float(), b.float())
    except (RuntimeError, AttributeError):
        return False
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(got, want, atol=tol, rtol=tol))
