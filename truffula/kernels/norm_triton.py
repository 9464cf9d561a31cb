"""RMSNorm with the fused residual add in Triton (one pass). Reference: ``norm_torch.add_rms_norm``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from truffula.kernels.triton_support import (
    gdc_launch_dependents,
    gdc_wait,
    next_pow2,
    pdl,
    pdl_launch,
)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    n_cols,
    eps,
    offset,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # launched while the kernel before finishes: wait for it before touching memory
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    y = x * (1.0 / tl.sqrt(var + eps)) * w
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual), or (norm(x), None) without a residual."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    r2 = residual.reshape(-1, n) if residual is not None else x2
    dependent = pdl(x.device, x2.shape[0])
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight,
        out,
        res_out,
        x2.stride(0),
        r2.stride(0),
        n,
        eps,
        offset,
        HAS_RES=residual is not None,
        BLOCK=next_pow2(n),
        PDL=dependent,
        num_warps=8 if n >= 4096 else 4,  # H200, hidden 4096: 1.6 against 1.9 µs with 4
        **pdl_launch(dependent),
    )
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else None)
