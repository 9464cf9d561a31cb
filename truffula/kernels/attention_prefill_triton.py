"""Causal attention of a prefill chunk over its sequence's keys in Triton: the chunk's queries
are the last of the keys (bottom-right aligned causal mask), as when a long prompt is prefilled
in chunks and each chunk attends to the cached ones before it.

Reference: ``kernels.attention_torch.prefill_attention`` (a dense mask through SDPA). On CUDA a
chunk after cached tokens cannot take SDPA's flash kernel (its causal mask is top-left aligned),
and its masked path runs at about 240 TFLOP/s on an H200 where flash runs at 600; this kernel
is the flash algorithm for the bottom-right case. One program per (BLOCK_M queries, query head)
walks the keys in BLOCK_N blocks with an online softmax (exp2, the scale folded in): first
every key the whole tile sees, without a mask, then the diagonal blocks, masked. Tiles are
issued longest first. Keys and values are rows [keys, kv_heads, head_dim] (the caller gathers
the cached ones); grouped query heads read their kv head. On Hopper-class GPUs, with a Triton
that has tensor descriptors, the key and value blocks come through TMA (``TMA``), 1.2x the
plain loads' speed. Tiles shrink to fit the device (``fit_tiles``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from truffula.kernels.triton_support import HAS_DESCRIPTORS, fit_tiles

CONFIG = (128, 128, 8, 3)
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) with keys and values read through tensor
descriptors (TMA): 579 TFLOP/s on an H200 for 8,192 queries after 24,576 cached keys, 539 for
2,048 after 6,144 (SDPA's flash kernel: 590-650 for a whole prompt)."""

CONFIG_NO_TMA = (128, 64, 8, 3)
"""The same with plain loads (pre-Hopper GPUs, unaligned rows): 469 and 380 TFLOP/s there."""


@triton.jit
def _softmax_block(q, k_blk, v_blk, m_i, l_i, acc, keep, MASKED: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        s = tl.dot(q, tl.trans(k_blk), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k_blk))
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v_blk.dtype), v_blk, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v_blk.dtype), v_blk)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    n_q,
    n_kv,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    TMA: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest key ranges first
    h = tl.program_id(1)
    kvh = h // GROUP
    offset = n_kv - n_q  # keys before the first query
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_q
    q = tl.load(
        q_ptr + rows[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    q = (q * qk_scale).to(q.dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    if TMA:  # rows of [keys, kv_heads x head_dim]; blocks past the last key read zeros
        k_desc = tl.make_tensor_descriptor(
            k_ptr, [n_kv, KV_WIDTH], [stride_kt, 1], [BLOCK_N, HEAD_DIM]
        )
        v_desc = tl.make_tensor_descriptor(
            v_ptr, [n_kv, KV_WIDTH], [stride_vt, 1], [BLOCK_N, HEAD_DIM]
        )
    cols = tl.arange(0, BLOCK_N)
    # keys every row of the tile sees, in whole blocks: no mask
    full = (offset + tile * BLOCK_M) // BLOCK_N * BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        if TMA:
            k_blk = k_desc.load([n0, kvh * HEAD_DIM])
            v_blk = v_desc.load([n0, kvh * HEAD_DIM])
        else:
            n = (n0 + cols).to(tl.int64)
            k_blk = tl.load(k_base + n[:, None] * stride_kt + d[None, :])
            v_blk = tl.load(v_base + n[:, None] * stride_vt + d[None, :])
        m_i, l_i, acc = _softmax_block(q, k_blk, v_blk, m_i, l_i, acc, None, False, IEEE)
    # the diagonal: up to the tile's last query, masked causally and at the end of the keys
    end = tl.minimum(offset + (tile + 1) * BLOCK_M, n_kv)
    for n0 in range(full, end, BLOCK_N):
        n = n0 + cols
        ok = n < n_kv
        if TMA:
            k_blk = k_desc.load([n0, kvh * HEAD_DIM])
            v_blk = v_desc.load([n0, kvh * HEAD_DIM])
        else:
            n64 = n.to(tl.int64)
            k_off = n64[:, None] * stride_kt + d[None, :]
            v_off = n64[:, None] * stride_vt + d[None, :]
            # zeros past the end: their weight is 0, and 0 x a stray NaN would not be
            k_blk = tl.load(k_base + k_off, mask=ok[:, None], other=0.0)
            v_blk = tl.load(v_base + v_off, mask=ok[:, None], other=0.0)
        keep = ok[None, :] & (n[None, :] <= (offset + rows)[:, None])
        m_i, l_i, acc = _softmax_block(q, k_blk, v_blk, m_i, l_i, acc, keep, True, IEEE)
    l_i = tl.where(row_ok, l_i, 1.0)
    out = acc / l_i[:, None]
    o = o_ptr + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :]
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@functools.cache
def _smem(device: torch.device) -> int:
    """Shared memory a program may claim on ``device`` (bytes)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def _tma_fits(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether keys and values can be read through tensor descriptors: a Hopper-class GPU,
    16-bit rows of adjacent heads, 16-byte aligned."""
    if not (HAS_DESCRIPTORS and k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    return all(
        t.dtype in (torch.bfloat16, torch.float16)
        and t.stride(1) == t.shape[2]
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in (k, v)
    )


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    config: tuple[int, int, int, int] | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """q [Lq, H, D]; k, v [Lk, Hkv, D] with Lk >= Lq, unit stride in D -> [Lq, H, D]: query i
    attends to keys 0 .. Lk - Lq + i. D a power of two. ``tma``: read keys and values
    through tensor descriptors (default: where ``_tma_fits``)."""
    n_q, h, d = q.shape
    n_kv, hkv = k.shape[0], k.shape[1]
    out = torch.empty_like(q)
    if tma is None:
        tma = _tma_fits(k, v)
    if tma:  # the descriptors' memory
        dev = q.device
        triton.set_allocator(
            lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev)
        )
    bm, bn, warps, stages = config or (CONFIG if tma else CONFIG_NO_TMA)
    if q.dtype == torch.float32:  # the registers of fp32 tiles
        bm, bn, warps, stages = min(bm, 64), min(bn, 32), 4, 1
    if q.is_cuda:
        bm, bn, stages = fit_tiles(bm, bn, stages, d, q.element_size(), _smem(q.device))
    _prefill_kernel[(triton.cdiv(n_q, bm), h)](
        q,
        k,
        v,
        out,
        n_q,
        n_kv,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        scale * math.log2(math.e),
        GROUP=h // hkv,
        HEAD_DIM=d,
        KV_WIDTH=hkv * d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        IEEE=q.dtype == torch.float32,
        TMA=tma,
        num_warps=warps,
        num_stages=stages,
    )
    return out
