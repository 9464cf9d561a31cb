"""fp8 linears on CUDA (reference: ``kernels.quant_fp8.reference``).

One row (batch-1 decode): a Triton GEMV over the fp8 weight with 16-bit activations, the row
scales applied to its sums (``gemv_fp8``). More rows: each activation row quantized to fp8 by
its absmax in one Triton program (``quantize_rows``), then ``torch._scaled_mm`` with the
per-row activation scales and per-channel weight scales (cuBLASLt's fp8 GEMM).

``gemv_fp8`` reads the weight as 32-bit words of four e4m3 values and turns each into a float32
with shifts and masks, not conversion instructions: an e4m3 value's sign and its 7 exponent
and mantissa bits, placed at bit 31 and bits 26..20 of a float32, make that value times
2^-120 (subnormals included, as float32 subnormals). Hopper converts fp8 to float32 at a
quarter of its integer rate, which held a GEMV that converts (``linear_triton.gemv`` with a
scale) to about 70% of the weight-read bandwidth. The activations are scaled by 2^64 first so
that the products stay normal floats, and the row scales by 2^56.
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
    tl.store(q_ptr + row.to(tl.int64) * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _gemv_fp8_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    n_out,
    n_words,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_out
    rows = w_ptr + n[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_W], tl.float32)
    sign = -2147483648  # 0x80000000
    for w0 in range(0, n_words, BLOCK_W):
        k = w0 + tl.arange(0, BLOCK_W)
        kmask = k < n_words
        w = tl.load(rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        x0 = tl.load(x_ptr + 4 * k, mask=kmask, other=0.0).to(tl.float32) * 18446744073709551616.0
        x1 = (
            tl.load(x_ptr + 4 * k + 1, mask=kmask, other=0.0).to(tl.float32)
            * 18446744073709551616.0
        )
        x2 = (
            tl.load(x_ptr + 4 * k + 2, mask=kmask, other=0.0).to(tl.float32)
            * 18446744073709551616.0
        )
        x3 = (
            tl.load(x_ptr + 4 * k + 3, mask=kmask, other=0.0).to(tl.float32)
            * 18446744073709551616.0
        )
        f0 = ((w << 24) & sign) | ((w << 20) & 0x07F00000)
        f1 = ((w << 16) & sign) | ((w << 12) & 0x07F00000)
        f2 = ((w << 8) & sign) | ((w << 4) & 0x07F00000)
        f3 = (w & sign) | ((w >> 4) & 0x07F00000)
        acc += f0.to(tl.float32, bitcast=True) * x0[None, :]
        acc += f1.to(tl.float32, bitcast=True) * x1[None, :]
        acc += f2.to(tl.float32, bitcast=True) * x2[None, :]
        acc += f3.to(tl.float32, bitcast=True) * x3[None, :]
    y = tl.sum(acc, axis=1) * (tl.load(s_ptr + n, mask=nmask, other=0.0) * 72057594037927936.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


WORD_CONFIGS: list[tuple[int, int, int, int]] = [(16, 128, 4, 3), (8, 256, 8, 4), (4, 512, 4, 4)]
"""(BLOCK_N, BLOCK_W words, num_warps, num_stages) for many / mid / few output rows."""


def gemv_fp8(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [1, K] -> [1, N] = x @ dequantize(q, scale)^T (+ bias), for ``words`` = the fp8
    weight [N, K] viewed as int32 [N, K / 4] (``as_words``), float32 ``scale`` [N]."""
    n_out, n_words = words.shape
    x = x.contiguous()
    y = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    if config is None:
        config = WORD_CONFIGS[0 if n_out >= 16384 else 1 if n_out > 4096 else 2]
    bn, bw, warps, stages = config
    _gemv_fp8_kernel[(triton.cdiv(n_out, bn),)](
        x,
        words,
        scale,
        bias if bias is not None else y,
        y,
        n_out,
        n_words,
        words.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=bn,
        BLOCK_W=bw,
        num_warps=warps,
        num_stages=stages,
    )
    return y


def as_words(q: torch.Tensor) -> torch.Tensor | None:
    """The fp8 weight [N, K] as int32 words [N, K / 4] (the same memory), or None when K is
    not a multiple of 4."""
    if q.shape[1] % 4 or not q.is_contiguous():
        return None
    return q.view(torch.int32)


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
        words = as_words(q)
        y = gemv(x2, q, bias, scale) if words is None else gemv_fp8(x2, words, scale, bias)
    else:
        xq, xs = quantize_rows(x2 if x2.stride(-1) == 1 else x2.contiguous())
        y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale_row, out_dtype=x.dtype)
        if bias is not None:
            y = y + bias
    return y.reshape(*shape[:-1], -1)
