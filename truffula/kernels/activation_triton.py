"""Gated activations in Triton: SiLU or tanh-GELU of the gate times up, one pass.
Reference: ``activation_torch.act_and_mul``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from truffula.kernels import activation_torch
from truffula.kernels.activation_torch import Activation
from truffula.kernels.triton_support import (
    gdc_launch_dependents,
    gdc_wait,
    next_pow2,
    pdl,
    pdl_launch,
)

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


GLU_SILU, GLU_GELU = 1, 2
"""``linear_triton.gemv``'s gated outputs: SiLU or tanh-GELU of the gate times up."""


@triton.jit
def gate_act(g, GELU: tl.constexpr):
    """SiLU, or with ``GELU`` tanh-GELU, of float32 ``g`` (this kernel's and the GEMV's
    gated epilogue's)."""
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    return g * tl.sigmoid(g)


@triton.jit
def _act_mul_kernel(
    x_ptr, out_ptr, n, stride_x, GELU: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    if PDL:  # launched while the kernel before finishes: wait for it before touching memory
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    a = gate_act(g, GELU)
    tl.store(out_ptr + row * n + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def act_and_mul(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    """[..., 2n] -> [..., n]: SiLU (or tanh-GELU) of the first half times the second."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, next_pow2(n))
    dependent = pdl(x.device, x2.shape[0])
    _act_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
        x2, out, n, x2.stride(0), GELU=gelu, BLOCK=block, PDL=dependent, **pdl_launch(dependent)
    )
    return out.view(*x.shape[:-1], n)


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    return act_and_mul(x, False)


def _gelu_tanh_mul(x: torch.Tensor) -> torch.Tensor:
    return act_and_mul(x, True)


def glu_mode(act_name: str) -> int:
    """``linear_triton.gemv``'s ``glu`` for the activation (0: none it computes)."""
    return GLU_SILU if act_name == "silu" else GLU_GELU if act_name in _GELU_TANH else 0


def gated(act_name: str) -> Activation:
    """The kernel for SiLU and the tanh-GELUs; torch for the other activations."""
    if act_name == "silu":
        return _silu_mul
    if act_name in _GELU_TANH:
        return _gelu_tanh_mul
    return activation_torch.gated(act_name)
