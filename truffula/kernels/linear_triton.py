"""One-row matrix-vector product in Triton: ``y = W x (+ b)`` for a single token (batch-1 decode);
``linear`` takes it for one-row inputs and ``F.linear`` for the others.
Reference: ``torch.nn.functional.linear``. The same kernel reads fp8 weights with per-row scales
(``y = (W x) * s``, ``kernels.quant_fp8_triton``).

Each program owns BLOCK_N output rows and streams them across K in BLOCK_K tiles (loads
pipelined over ``num_stages``), accumulating in fp32; one launch, no split-K reduction kernel.
Measured on an H200 at one token (8B shapes, in CUDA graphs): 30.0 µs against cuBLAS's
31.3 µs (GEMM + split-K reduction) for 14336 -> 4096, 13.0 against 13.8 µs for
4096 -> 6144, 239 against 247 µs for the 128k-vocabulary LM head, and on a par (57 µs) for
4096 -> 28672.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from truffula.kernels.activation_triton import gate_act
from truffula.kernels.triton_support import gdc_launch_dependents, gdc_wait, pdl, pdl_launch


@triton.jit
def _tile(rows, k, nmask, n_in, EVEN: tl.constexpr):
    """Columns ``k`` of the program's weight rows (unmasked loads when the shape is even)."""
    if EVEN:
        return tl.load(rows + k[None, :])
    return tl.load(rows + k[None, :], mask=nmask[:, None] & (k < n_in)[None, :], other=0.0)


@triton.jit
def _xs(x_ptr, k, n_in, EVEN: tl.constexpr):
    """Entries ``k`` of x in float32."""
    if EVEN:
        return tl.load(x_ptr + k).to(tl.float32)
    return tl.load(x_ptr + k, mask=k < n_in, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    s_ptr,
    y_ptr,
    n_out,
    n_in,
    stride_w,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    GLU: tl.constexpr = 0,
):
    if GLU:  # rows [gate | up]: half the program's rows from each half, act(gate) * up out
        i = tl.arange(0, BLOCK_N)
        j = tl.program_id(0) * (BLOCK_N // 2) + i % (BLOCK_N // 2)
        n = tl.where(i < BLOCK_N // 2, j, n_out // 2 + j)
        nmask = j < n_out // 2
    else:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < n_out
    rows = w_ptr + n[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k = tl.arange(0, BLOCK_K)
    start = 0
    if PDL:  # launched while the kernel before finishes: wait for it before touching x
        if PREFETCH:  # the weight does not depend on it: the first tile streams in meanwhile
            w0 = _tile(rows, k, nmask, n_in, EVEN)
        gdc_wait()
        gdc_launch_dependents()
        if PREFETCH:
            acc += w0.to(tl.float32) * _xs(x_ptr, k, n_in, EVEN)[None, :]
            start = BLOCK_K
    for k0 in range(start, n_in, BLOCK_K):
        w = _tile(rows, k0 + k, nmask, n_in, EVEN)
        acc += w.to(tl.float32) * _xs(x_ptr, k0 + k, n_in, EVEN)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if GLU:
        gate, up = tl.split(tl.permute(tl.reshape(y, [2, BLOCK_N // 2]), [1, 0]))
        o = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        y = gate_act(gate, GLU == 2) * up  # 2: GLU_GELU
        tl.store(y_ptr + o, y.to(y_ptr.dtype.element_ty), mask=o < n_out // 2)
    else:
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


PREFETCH = True
"""A dependent launch loads its first weight tile before it waits for the kernel before it (whose
output is x): on an H200 (8B shape, ``benchmarks/gemv_prefetch.py`` and earlier A/B runs)
batch-1 decode took 4.05-4.08 against 4.12-4.21 ms/token, and fp8 weights 2.82-2.89 against
2.90-2.93; two tiles (4.25) and prefetching further into L2 (4.44-5.16) were slower."""

GATED_ROWS = True
"""One-row [gate | up] projections apply the gated activation in the GEMV's epilogue
(``gated_row``) instead of a separate kernel after it: on an H200 (8B shape, ``benchmarks/
gemv_prefetch.py --switch gated``) batch-1 decode took 3.98 against 4.01 ms/token, fp8 2.66
against 2.69."""

Config = tuple[int, int, int, int]
"""(BLOCK_N, BLOCK_K, num_warps, num_stages)."""


def _config(n_out: int, elem: int = 2) -> Config:
    """The fastest measured for each 8B shape class on an H200 (``benchmarks/gemv_tiles.py``,
    batch-1 decode in the engine): many rows -> short wide tiles; few rows -> 4 rows x 1024
    columns a step for 16-bit weights, 4 x 2048 (as many bytes) with 8 warps for fp8 (``elem``:
    bytes a weight)."""
    if n_out >= 16384:
        return 16, 256, 4, 3
    if n_out > 4096:
        return (8, 512, 4, 4) if elem == 2 else (8, 512, 8, 4)
    return (4, 1024, 4, 4) if elem == 2 else (4, 2048, 8, 4)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    config: Config | None = None,
    glu: int = 0,
) -> torch.Tensor:
    """x [1, K] -> [1, N] = x @ weight^T (* scale) (+ bias); ``weight`` [N, K] with unit column
    stride (16-bit, or fp8 with ``scale`` [N] per row). ``glu`` (``activation_triton.GLU_SILU``, ``GLU_GELU``):
    the rows are [gate | up], and the result [1, N / 2] is act(gate) * up."""
    n_out, n_in = weight.shape
    x = x.contiguous()
    y = torch.empty(1, n_out // 2 if glu else n_out, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = config or _config(n_out, weight.element_size())
    dependent = pdl(x.device, 1)
    _gemv_kernel[(triton.cdiv(y.shape[1], bn // 2 if glu else bn),)](
        x,
        weight,
        bias if bias is not None else y,
        scale if scale is not None else y,
        y,
        n_out,
        n_in,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        BLOCK_N=bn,
        BLOCK_K=bk,
        EVEN=(n_out // 2 % (bn // 2) if glu else n_out % bn) == 0 and n_in % bk == 0,
        PDL=dependent,
        PREFETCH=PREFETCH and dependent,
        GLU=glu,
        num_warps=warps,
        num_stages=stages,
        **pdl_launch(dependent),
    )
    return y


def weight_fits(weight: torch.Tensor) -> bool:
    """A dense row-major 16-bit weight: the kind ``gemv`` reads (checked once, at start-up)."""
    return (
        weight.dtype in (torch.bfloat16, torch.float16)
        and weight.dim() == 2
        and weight.stride(1) == 1
    )


def one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x is one row of ``weight``'s dtype."""
    return x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype


def gated_row(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    glu: int,
) -> torch.Tensor | None:
    """act(gate) * up [1, N / 2] for one row ``x`` and a [gate | up] ``weight`` that ``gemv``
    reads (16-bit of x's dtype, or fp8 with its row ``scale``); None for other inputs."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.stride(1) != 1:
        return None
    fp8 = scale is not None and weight.element_size() == 1 and weight.is_floating_point()
    if not (fp8 or (scale is None and weight.dtype == x.dtype and weight_fits(weight))):
        return None
    return gemv(x, weight, bias, scale, glu=glu)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a weight that ``weight_fits``, through ``gemv`` for one row."""
    if one_row(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
