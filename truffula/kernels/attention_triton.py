"""Paged attention on CUDA: one-token queries through a Triton decode kernel, split over the
sequence when the batch is small; multi-token chunks through torch SDPA (flash attention for a
whole prompt), or, in a CUDA graph of a step with prefill chunks, every token through
``attention_varlen_triton``.

Reference: ``kernels.attention_torch.paged_attention``. One program per
(sequence, kv head, split) handles all query heads of the group with ``tl.dot`` over blocks of
BLOCK_N cached tokens (online softmax). With several splits each writes a partial (max, sum,
weighted values); the split program that finishes last for its (sequence, kv head) merges them
(an atomic counter per group, reset by that program, so no second launch and no clearing
between launches). Lengths and block tables are read from device memory, so the launch is the
same for any lengths (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from truffula.forward import AttentionMetadata
from truffula.kernels.attention_prefill_triton import chunk_attention
from truffula.kernels.attention_torch import prefill_attention, write_kv
from truffula.kernels.attention_varlen_triton import varlen_attention
from truffula.kernels.rotary_triton import rotary_into_cache
from truffula.kernels.triton_support import (
    gdc_launch_dependents,
    gdc_wait,
    next_pow2,
    pdl,
    pdl_launch,
)

SMS_TARGET = 264  # about two programs per SM of an H100/H200


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    lens_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_ob,
    stride_oh,
    scale,
    softcap,
    window,
    n_heads,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # launched while the kernel before finishes: wait for it before touching memory
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=(g < GROUP)[:, None],
        other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    lsum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        blk = tl.load(bt_ptr + b * stride_bt + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = (
            (blk * BLOCK_SIZE + n % BLOCK_SIZE)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        )
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if HAS_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    gmask = (g < GROUP)[:, None]
    if SPLITS == 1:
        o_ptr = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, (acc / lsum[:, None]).to(out_ptr.dtype.element_ty), mask=gmask)
    else:
        # partial record per (b, head, split): [HEAD_DIM values | max | sum]
        row = ((b * n_heads + heads) * SPLITS + split) * (HEAD_DIM + 2)
        tl.store(part_ptr + row[:, None] + d[None, :], acc, mask=gmask)
        tl.store(part_ptr + row + HEAD_DIM, m, mask=g < GROUP)
        tl.store(part_ptr + row + HEAD_DIM + 1, lsum, mask=g < GROUP)
        # publish the partials, then count; the last split of the group merges all of them
        tl.debug_barrier()
        counter = count_ptr + b * tl.num_programs(1) + kvh
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        if done == SPLITS - 1:
            _merge_group(
                part_ptr,
                out_ptr,
                b,
                heads,
                g < GROUP,
                stride_ob,
                stride_oh,
                n_heads,
                GROUP_PAD,
                HEAD_DIM,
                SPLITS,
            )
            tl.atomic_xchg(counter, 0)


@triton.jit
def _merge_group(
    part_ptr,
    out_ptr,
    b,
    heads,
    hmask,
    stride_ob,
    stride_oh,
    n_heads,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Online merge of the SPLITS partial records of each head in ``heads``; empty splits
    (max -inf) weigh nothing. Loads bypass L1: other SMs wrote the records."""
    d = tl.arange(0, HEAD_DIM)
    gmask = hmask[:, None]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    lsum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for sp in tl.static_range(SPLITS):
        row = ((b * n_heads + heads) * SPLITS + sp) * (HEAD_DIM + 2)
        ms = tl.load(
            part_ptr + row + HEAD_DIM, mask=hmask, other=float("-inf"), cache_modifier=".cg"
        )
        ls = tl.load(part_ptr + row + HEAD_DIM + 1, mask=hmask, other=0.0, cache_modifier=".cg")
        accs = tl.load(
            part_ptr + row[:, None] + d[None, :], mask=gmask, other=0.0, cache_modifier=".cg"
        )
        m_new = tl.maximum(m, ms)
        live = m_new > float("-inf")
        alpha = tl.where(live, tl.exp(m - m_new), 0.0)
        beta = tl.where(live, tl.exp(ms - m_new), 0.0)
        lsum = lsum * alpha + ls * beta
        acc = acc * alpha[:, None] + accs * beta[:, None]
        m = m_new
    o_ptr = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, (acc / lsum[:, None]).to(out_ptr.dtype.element_ty), mask=gmask)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 split counters, kept per device (each launch leaves them zero). Grown only
    outside a graph capture: the warm-up before a capture runs the same shapes first."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = have
    return have


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_size: int,
    window: int | None,
    softcap: float | None,
    splits: int | None = None,
) -> torch.Tensor:
    """q [B, H, D]; caches [slots, Hkv, D] -> [B, H, D] over each sequence's cached tokens."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    if splits is None:  # depends on the shapes only, so a captured graph keeps it
        splits = min(16, -(-SMS_TARGET // (b * hkv)))
    splits = next_pow2(max(1, splits))
    out = torch.empty_like(q)
    part = torch.empty(
        b * h * splits * (d + 2) if splits > 1 else 1, dtype=torch.float32, device=q.device
    )
    dependent = pdl(q.device, b)
    _decode_kernel[(b, hkv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part,
        _counters(b * hkv, q.device) if splits > 1 else out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale,
        softcap or 1.0,
        window or 0,
        h,
        GROUP=group,
        GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        BLOCK_N=max(16, min(64, block_size * 4)),
        SPLITS=splits,
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32,
        PDL=dependent,
        **pdl_launch(dependent),
    )
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``attention_torch.paged_attention`` with the decodes through the Triton kernel
    (graph-capturable: it reads lengths and block tables from device tensors). Head dimensions
    are powers of two (the kernel tiles them so); ``select`` keeps the others on torch. With a
    tile map (``meta.tiles``: a graph of a step with prefill chunks), every query token goes
    through ``varlen_attention``; without one, a prefill chunk after cached tokens goes through
    ``chunk_attention`` (a whole prompt through SDPA's flash kernel)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if meta.tiles is not None:
        return varlen_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.tiles,
            scale,
            meta.block_size,
            sliding_window,
            softcap,
        )
    nd = meta.num_decodes
    if nd == q.shape[0]:
        return decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            scale,
            meta.block_size,
            sliding_window,
            softcap,
        )
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode_attention(
            q[:nd],
            k_cache,
            v_cache,
            meta.block_tables[:nd],
            meta.seq_lens[:nd],
            scale,
            meta.block_size,
            sliding_window,
            softcap,
        )
    prefill_attention(
        out, q, k, v, k_cache, v_cache, meta, scale, sliding_window, softcap, True, chunk_attention
    )
    return out


def rotary_decode_attention(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rot_dim: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """A decode-only step from the qkv projection [T, H + 2 Hkv, d]: rotate q and k and write k
    and v to the cache in one kernel (``rotary_into_cache``; cos/sin are the whole tables),
    then decode attention -> [T, H, d]."""
    h = qkv.shape[1] - 2 * k_cache.shape[1]
    q = rotary_into_cache(
        qkv, h, k_cache.shape[1], positions, cos, sin, rot_dim, meta.slot_mapping, k_cache, v_cache
    )
    return decode_attention(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        scale,
        meta.block_size,
        sliding_window,
        softcap,
    )
