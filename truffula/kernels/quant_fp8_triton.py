"""fp8 linears on CUDA (reference: ``kernels.quant_fp8.reference``).

One row (batch-1 decode): the Triton GEMV over the fp8 weight with 16-bit activations, the
row scales applied to its sums (``linear_triton.gemv``). More rows: each activation row
quantized to fp8 by its absmax in one Triton program (``quantize_rows``), then
``torch._scaled_mm`` with the per-row activation scales and per-channel weight scales
(cuBLASLt's fp8 GEMM).

The GEMV converts each e4m3 value to float32 in registers and reaches 64-77% of the
weight-read bandwidth on an H200 for the 8B shapes (bf16: 76-97%; benchmarks/quantized_gpu.py).
Decoding the values from 32-bit words with shifts and masks instead of conversion
instructions measured the same, so the conversions are not what holds it back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from truffula.kernels.linear_triton import gemv
from truffula.kernels.quant_fp8 import FP8, FP8_MAX


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, n_cols, stride_x, FMAX: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FMAX
    q = tl.clamp(x / scale, -FMAX, FMAX)
    tl.store(
        q_ptr + row.to(tl.int64) * n_cols + cols,
        q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
        mask=mask,
    )
    tl.store(s_ptr + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] (unit column stride) -> (fp8 [M, K], float32 scale [M, 1])."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](
        x, q, s, k, x.stride(0), FMAX=FP8_MAX, BLOCK=block, num_warps=8 if block >= 4096 else 4
    )
    return q, s


def linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    scale_row: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., K] (16-bit) -> [..., N] with the fp8 weight ``q`` [N, K], its float32 ``scale``
    [N] and the same as a [1, N] row (``_scaled_mm``'s layout)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 1:
        y = gemv(x2, q, bias, scale)
    else:
        xq, xs = quantize_rows(x2 if x2.stride(-1) == 1 else x2.contiguous())
        y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale_row, out_dtype=x.dtype)
        if bias is not None:
            y = y + bias
    return y.reshape(*shape[:-1], -1)
