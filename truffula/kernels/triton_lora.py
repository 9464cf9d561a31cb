"""Batched multi-adapter LoRA in Triton (SGMV: segmented gather matrix-vector).

Reference: ``kernels.lora_torch.lora_reference``. The step's tokens come in segments of equal
adapter slot (the scheduler orders decodes by slot; a prefill chunk is one segment). One program
per (segment, shard or output block) loads its adapter's factor tile once and applies it to the
segment's tokens 16 at a time with ``tl.dot``: a segment of many tokens shares one weight read,
a segment of one token costs one read (BGMV). Segment tables are device data of a fixed size,
so the launches are CUDA-graph safe.

shrink: tmp[t, j, :] += A[slot, j, :, K-chunk] @ x[t, K-chunk]    (split-K, fp32 atomics)
expand: y[t, o]     += sum_r tmp[t, shard(o), r] * Bt[slot, r, o]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 16
BLOCK_K = 256
BLOCK_O = 128


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    seg_ptr,
    tmp_ptr,
    n_in,
    stride_x,
    stride_as,
    stride_aj,
    stride_ar,
    n_shards,
    RANK: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    seg = tl.program_id(0)
    j = tl.program_id(1)
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(seg_ptr + 3 * seg)
    length = tl.load(seg_ptr + 3 * seg + 1)
    slot = tl.load(seg_ptr + 3 * seg + 2).to(tl.int64)
    if length > 0:
        r = tl.arange(0, RANK_PAD)
        kmask = k < n_in
        a = tl.load(
            a_ptr + slot * stride_as + j * stride_aj + r[:, None] * stride_ar + k[None, :],
            mask=(r < RANK)[:, None] & kmask[None, :],
            other=0.0,
        )
        for t0 in range(0, length, BLOCK_T):
            rows = start + t0 + tl.arange(0, BLOCK_T)
            rmask = (t0 + tl.arange(0, BLOCK_T)) < length
            x = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            )
            if IEEE:
                part = tl.dot(x, tl.trans(a), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(a))
            out = tmp_ptr + (rows[:, None].to(tl.int64) * n_shards + j) * RANK_PAD + r[None, :]
            tl.atomic_add(out, part, mask=rmask[:, None])


@triton.jit
def _expand_kernel(
    y_ptr,
    tmp_ptr,
    bt_ptr,
    seg_ptr,
    n_out,
    stride_y,
    stride_bs,
    stride_br,
    off1,
    off2,
    N_SHARDS: tl.constexpr,
    RANK: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    IEEE: tl.constexpr,
):
    seg = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    start = tl.load(seg_ptr + 3 * seg)
    length = tl.load(seg_ptr + 3 * seg + 1)
    slot = tl.load(seg_ptr + 3 * seg + 2).to(tl.int64)
    if length > 0:
        r = tl.arange(0, RANK_PAD)
        omask = o < n_out
        bmat = tl.load(
            bt_ptr + slot * stride_bs + r[:, None] * stride_br + o[None, :],
            mask=(r < RANK)[:, None] & omask[None, :],
            other=0.0,
        )
        shard = (o >= off1).to(tl.int32) + (o >= off2).to(tl.int32)
        for t0 in range(0, length, BLOCK_T):
            rows = start + t0 + tl.arange(0, BLOCK_T)
            rmask = (t0 + tl.arange(0, BLOCK_T)) < length
            acc = tl.zeros([BLOCK_T, BLOCK_O], tl.float32)
            for j in tl.static_range(N_SHARDS):
                s = tl.load(
                    tmp_ptr + (rows[:, None].to(tl.int64) * N_SHARDS + j) * RANK_PAD + r[None, :],
                    mask=rmask[:, None],
                    other=0.0,
                ).to(bmat.dtype)
                if IEEE:
                    contrib = tl.dot(s, bmat, input_precision="ieee")
                else:
                    contrib = tl.dot(s, bmat)
                acc += tl.where((shard == j)[None, :], contrib, 0.0)
            y = y_ptr + rows[:, None].to(tl.int64) * stride_y + o[None, :]
            mask = rmask[:, None] & omask[None, :]
            prev = tl.load(y, mask=mask, other=0.0).to(tl.float32)
            tl.store(y, (prev + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def lora_sgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    offsets: list[int],
    seg_table: torch.Tensor,
) -> torch.Tensor:
    """y[t, off_j:off_j+n_j] += Bt[s, :, off_j:off_j+n_j]^T (A[s, j] x[t]) over the segments of
    ``seg_table`` ([n_segments * 3] int: start, length, slot; see ``lora_torch.segments``), in place. ``a`` [slots, shards,
    R, in]; ``bt`` [slots, R, out] (all shards side by side, at most 3). Three launches."""
    t = x.shape[0]
    n_seg = seg_table.numel() // 3
    _, n_shards, rank, n_in = a.shape
    rank_pad = max(16, _pow2(rank))
    ieee = x.dtype == torch.float32
    tmp = torch.zeros(t, n_shards, rank_pad, dtype=torch.float32, device=x.device)
    _shrink_kernel[(n_seg, n_shards, triton.cdiv(n_in, BLOCK_K))](
        x,
        a,
        seg_table,
        tmp,
        n_in,
        x.stride(0),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        n_shards,
        RANK=rank,
        RANK_PAD=rank_pad,
        BLOCK_T=BLOCK_T,
        BLOCK_K=BLOCK_K,
        IEEE=ieee,
    )
    offs = [*offsets[1:], 1 << 62, 1 << 62][:2]  # shard starts; unused ones are never reached
    n_out = bt.shape[2]
    _expand_kernel[(n_seg, triton.cdiv(n_out, BLOCK_O))](
        y,
        tmp,
        bt,
        seg_table,
        n_out,
        y.stride(0),
        bt.stride(0),
        bt.stride(1),
        offs[0],
        offs[1],
        N_SHARDS=n_shards,
        RANK=rank,
        RANK_PAD=rank_pad,
        BLOCK_T=BLOCK_T,
        BLOCK_O=BLOCK_O,
        IEEE=ieee,
    )
    return y
