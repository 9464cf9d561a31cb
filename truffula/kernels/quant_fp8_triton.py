"""fp8 linears on CUDA (reference: ``kernels.quant_fp8.reference``).

One row (batch-1 decode): the Triton GEMV over the fp8 weight with 16-bit activations, the
row scales applied to its sums (``linear_triton.gemv``). More rows: each activation row
quantized to fp8 by its absmax in one Triton program (``quantize_rows``), then an fp8 GEMM
with the per-row activation scales and per-channel weight scales applied to its sums: up to
``GEMM_ROWS`` rows (decode steps) a Triton GEMM whose narrow tiles spread the weight over
every SM, above it ``torch._scaled_mm`` (cuBLASLt's fp8 GEMM).

The GEMV converts each e4m3 value to float32 in registers and, with its own tiles for the
4,096-row projections (``linear_triton._config``), reaches 59-90% of the weight-read bandwidth
on an H200 for the 8B shapes (bf16: 87-100%; benchmarks/quantized_gpu.py).
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


@triton.jit
def _gemm_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    b_ptr,
    y_ptr,
    m_rows,
    n_out,
    n_in,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = (xq wq^T) * xs * ws (+ b): fp8 x [M, K] (contiguous) and w [N, K] (unit column
    stride), fp32 accumulation."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask, nmask = rm < m_rows, rn < n_out
    xp = x_ptr + rm[:, None].to(tl.int64) * n_in + rk[None, :]
    wp = w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        if EVEN:
            x = tl.load(xp, mask=mmask[:, None], other=0.0)
            w = tl.load(wp)
        else:
            kmask = (k0 + rk < n_in)[None, :]
            x = tl.load(xp, mask=mmask[:, None] & kmask, other=0.0)
            w = tl.load(wp, mask=nmask[:, None] & kmask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        xp += BLOCK_K
        wp += BLOCK_K
    acc *= tl.load(xs_ptr + rm, mask=mmask, other=0.0)[:, None]
    acc *= tl.load(ws_ptr + rn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None].to(tl.int64) * n_out + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


GEMM_ROWS = 64
"""Rows up to which the Triton GEMM runs (one 64-row tile; more rows would read the weight
again per tile): on an H200 at 64 rows of the 8B shapes, with the activations' quantization,
µs: qkv 14.7, o 11.7, gate_up 39.9, down 29.0 against ``_scaled_mm``'s 16.9 / 16.5 / 48.0 /
40.9 (cuBLAS bf16: 17.5 / 12.7 / 64.0 / 36.3)."""

GemmConfig = tuple[int, int, int, int]
"""(BLOCK_N, BLOCK_K, num_warps, num_stages)."""


def gemm_config(n_out: int) -> GemmConfig:
    """The fastest of four tile shapes measured at 64 rows for each 8B shape class on an H200
    (``GEMM_ROWS``): 16 weight rows a program for the 4,096-row projections, 32 above."""
    if n_out >= 16384:
        return 32, 128, 4, 4
    if n_out > 4096:
        return 32, 256, 4, 3
    return 16, 256, 4, 4


def gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """fp8 ``xq`` [M, K] (contiguous) with float32 row scales ``xs`` [M, 1] times the fp8 weight
    ``q`` [N, K] (unit column stride) with float32 ``scale`` [N] (+ ``bias``) -> [M, N] in
    ``dtype``."""
    m, n_in = xq.shape
    n_out = q.shape[0]
    y = torch.empty(m, n_out, dtype=dtype, device=xq.device)
    bn, bk, warps, stages = config or gemm_config(n_out)
    _gemm_kernel[(triton.cdiv(n_out, bn), triton.cdiv(m, 64))](
        xq, xs, q, scale, bias if bias is not None else y, y, m, n_out, n_in, q.stride(0),
        HAS_BIAS=bias is not None, EVEN=n_out % bn == 0 and n_in % bk == 0,
        BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


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
        if x2.shape[0] <= GEMM_ROWS and q.stride(1) == 1:
            y = gemm(xq, xs, q, scale, bias, x.dtype)
        else:
            y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale_row, out_dtype=x.dtype)
            if bias is not None:
                y = y + bias
    return y.reshape(*shape[:-1], -1)
