"""int4 linears on CUDA (layout and reference: ``kernels.quant_int4``).

One row (batch-1 decode): a GEMV that streams the packed bytes, each tile ``TILE_GROUPS``
groups of ``GROUP`` columns of ``BLOCK_N`` rows: the low and high nibbles multiply the even and
odd entries of x, each byte's two products are scaled by its group's scale and the group's
minimum times the two entries of x is added (``s * (q_e x_e + q_o x_o) + low * (x_e + x_o)``),
into one float32 sum per byte of the tile, reduced once after the last step. A dependent
launch (PDL) reads its first tile before it waits for x. Up to
``DEQUANT_ROWS`` rows: a GEMM whose weight tiles are unpacked and dequantized to x's dtype in
registers before ``tl.dot``, one group per K step; from there (prefill) the weight dequantized
whole, then cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from truffula.kernels.quant_int4 import Int4Weight
from truffula.kernels.triton_support import gdc_launch_dependents, gdc_wait, pdl, pdl_launch


@triton.jit
def _gemv_tile(rows3, nmask, t, GROUP: tl.constexpr, TILE_GROUPS: tl.constexpr, EVEN: tl.constexpr):
    """Step ``t``'s packed bytes [BLOCK_N, TILE_GROUPS, GROUP / 2] (rows past the end: 0)."""
    if EVEN:
        return tl.load(rows3 + t * (TILE_GROUPS * GROUP // 2))
    return tl.load(rows3 + t * (TILE_GROUPS * GROUP // 2), mask=nmask[:, None, None], other=0)


@triton.jit
def _gemv_step(acc, b, x_ptr, s_ptr, lo_ptr, srow, col, nmask, t,
               GROUP: tl.constexpr, TILE_GROUPS: tl.constexpr):  # fmt: skip
    """``acc`` plus step ``t``'s terms ``s * (q_even x_even + q_odd x_odd) + low * (x_even +
    x_odd)`` for each byte, kept apart by byte (reduced once, after the last step)."""
    two = tl.arange(0, 2)
    x2 = tl.load(x_ptr + t * (TILE_GROUPS * GROUP) + (2 * col)[:, :, None] + two[None, None, :])
    xe, xo = tl.split(x2.to(tl.float32))
    s = tl.load(s_ptr + srow + t * TILE_GROUPS, mask=nmask[:, None], other=0.0)
    m = tl.load(lo_ptr + srow + t * TILE_GROUPS, mask=nmask[:, None], other=0.0)
    q = (b & 0xF).to(tl.float32) * xe[None] + (b >> 4).to(tl.float32) * xo[None]
    return acc + s[:, :, None] * q + m[:, :, None] * (xe + xo)[None]


@triton.jit
def _gemv_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    lo_ptr,
    b_ptr,
    y_ptr,
    n_out,
    n_in,
    n_groups,
    HAS_BIAS: tl.constexpr,
    GROUP: tl.constexpr,
    TILE_GROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,
    PDL: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_out
    col = tl.arange(0, TILE_GROUPS)[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
    rows3 = p_ptr + n[:, None, None].to(tl.int64) * (n_in // 2) + col[None, :, :]
    srow = n[:, None].to(tl.int64) * n_groups + tl.arange(0, TILE_GROUPS)[None, :]
    acc = tl.zeros([BLOCK_N, TILE_GROUPS, GROUP // 2], tl.float32)
    start = 0
    if PDL:  # launched while the kernel before (x's writer) finishes: its first bytes meanwhile
        b0 = _gemv_tile(rows3, nmask, 0, GROUP, TILE_GROUPS, EVEN)
        gdc_wait()
        gdc_launch_dependents()
        acc = _gemv_step(acc, b0, x_ptr, s_ptr, lo_ptr, srow, col, nmask, 0, GROUP, TILE_GROUPS)
        start = 1
    for t in range(start, n_groups // TILE_GROUPS):
        b = _gemv_tile(rows3, nmask, t, GROUP, TILE_GROUPS, EVEN)
        acc = _gemv_step(acc, b, x_ptr, s_ptr, lo_ptr, srow, col, nmask, t, GROUP, TILE_GROUPS)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


GemvConfig = tuple[int, int, int, int]
"""(BLOCK_N, TILE_GROUPS, num_warps, num_stages): rows a program owns, groups a K step reads."""


def gemv_config(n_out: int, n_groups: int) -> GemvConfig:
    """8 rows a program, 4 warps, 3 stages, and as many groups a step as divide the row, up to
    8 (512 bytes of each row at group 128) for the 4,096-row projections and 4 for wider ones:
    the fastest of the tables tried on an H200 (8B shape, batch-1 decode in the engine,
    ``benchmarks/gemv_tiles.py``)."""
    tiles = (4, 2, 1) if n_out > 4096 else (8, 4, 2, 1)
    return 8, next(t for t in tiles if n_groups % t == 0), 4, 3


@triton.jit
def _group_tile(p_ptr, s_ptr, lo_ptr, rn, nmask, g, n_in, n_groups, GROUP: tl.constexpr):
    """Rows ``rn`` of group ``g``, dequantized: float32 [rows, GROUP] (masked rows: 0)."""
    half = tl.arange(0, GROUP // 2)
    b = tl.load(
        p_ptr + rn[:, None].to(tl.int64) * (n_in // 2) + (g * (GROUP // 2) + half)[None, :],
        mask=nmask[:, None],
        other=0,
    )
    q = tl.interleave(b & 0xF, b >> 4).to(tl.float32)
    s = tl.load(s_ptr + rn.to(tl.int64) * n_groups + g, mask=nmask, other=0.0)
    m = tl.load(lo_ptr + rn.to(tl.int64) * n_groups + g, mask=nmask, other=0.0)
    return q * s[:, None] + m[:, None]


@triton.jit
def _gemm_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    lo_ptr,
    b_ptr,
    y_ptr,
    m_rows,
    n_out,
    n_in,
    n_groups,
    stride_x,
    HAS_BIAS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < m_rows, rn < n_out
    k = tl.arange(0, GROUP)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(0, n_groups):
        k0 = g * GROUP
        x = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * stride_x + (k0 + k)[None, :],
            mask=mmask[:, None],
            other=0.0,
        )
        w = _group_tile(p_ptr, s_ptr, lo_ptr, rn, nmask, g, n_in, n_groups, GROUP).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None].to(tl.int64) * n_out + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


@triton.jit
def _dequant_kernel(
    p_ptr,
    s_ptr,
    lo_ptr,
    w_ptr,
    n_out,
    n_in,
    n_groups,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    nmask = rn < n_out
    w = _group_tile(p_ptr, s_ptr, lo_ptr, rn, nmask, g, n_in, n_groups, GROUP)
    k = g * GROUP + tl.arange(0, GROUP)
    tl.store(
        w_ptr + rn[:, None].to(tl.int64) * n_in + k[None, :],
        w.to(w_ptr.dtype.element_ty),
        mask=nmask[:, None],
    )


def dequantize(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight [N, K] in ``dtype`` (the values the GEMM multiplies by)."""
    n_out, n_in = w.shape
    out = torch.empty(n_out, n_in, dtype=dtype, device=w.packed.device)
    _dequant_kernel[(triton.cdiv(n_out, 32), n_in // w.group)](
        w.packed, w.scale, w.low, out, n_out, n_in, n_in // w.group, GROUP=w.group, BLOCK_N=32
    )
    return out


DEQUANT_ROWS = 128
"""From this many rows (prefill) the weight is dequantized whole and multiplied by cuBLAS:
on an H200 (8B shapes, 512 rows) the in-register GEMM took 3.3-4.4x cuBLAS's bf16 time, more
than writing the 16-bit weight once costs; at 64 rows it is the faster of the two."""

GemmConfig = tuple[int, int, int]
"""(BLOCK_N, num_warps, num_stages) of the GEMM; BLOCK_M follows the rows (16, else 64)."""
GEMM_CONFIG: GemmConfig = (32, 4, 4)
"""The fastest of 7 tried on an H200 at 64 rows of the 8B shapes (µs, against 64 weight rows a
program, 4 warps, 3 stages): qkv 30.6 / 36.4, o 22.0 / 35.9, gate_up 113.2 / 116.3, down 70.4 /
135.6: with 64 rows a program the 4,096-row projections fill half the SMs."""


def linear(
    x: torch.Tensor,
    w: Int4Weight,
    bias: torch.Tensor | None,
    config: GemvConfig | None = None,
    gemm_config: GemmConfig | None = None,
) -> torch.Tensor:
    """x [..., K] (16-bit) -> [..., N] for the int4 weight ``w`` ([N, K], K a multiple of its
    group); ``config``: the GEMV's tiles for one row (``gemv_config`` by default),
    ``gemm_config`` the GEMM's for more (``GEMM_CONFIG``)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, (n_out, n_in) = x2.shape[0], w.shape
    if m >= DEQUANT_ROWS:
        return F.linear(x2, dequantize(w, x2.dtype), bias).reshape(*shape[:-1], -1)
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    groups = n_in // w.group
    b = bias if bias is not None else y
    if m == 1:
        bn, tile, warps, stages = config or gemv_config(n_out, groups)
        if groups % tile:
            raise ValueError(f"{tile} groups a step do not divide the row's {groups} groups")
        dependent = pdl(x.device, 1)
        _gemv_kernel[(triton.cdiv(n_out, bn),)](
            x2, w.packed, w.scale, w.low, b, y, n_out, n_in, groups,
            HAS_BIAS=bias is not None, GROUP=w.group, TILE_GROUPS=tile, BLOCK_N=bn,
            EVEN=n_out % bn == 0, PDL=dependent, num_warps=warps, num_stages=stages, **pdl_launch(dependent),
        )  # fmt: skip
    else:
        bm = 16 if m <= 16 else 64
        bn, warps, stages = gemm_config or GEMM_CONFIG
        grid = (triton.cdiv(m, bm), triton.cdiv(n_out, bn))
        _gemm_kernel[grid](
            x2, w.packed, w.scale, w.low, b, y, m, n_out, n_in, groups, x2.stride(0),
            HAS_BIAS=bias is not None, GROUP=w.group, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return y.reshape(*shape[:-1], -1)
