"""Rotary position embedding in Triton: cos/sin looked up by position inside the kernel, and a
form that also writes the rotated keys and the values to their KV cache slots (decode steps).
Reference: ``rotary_torch.apply_rotary``."""

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
def _rotary_kernel(
    x_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_t,
    stride_h,
    n_heads,
    n_rot_heads,
    n_kv_heads,
    stride_cs,
    stride_ch,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    ROT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """One head of one token's whole qkv projection per program: heads [0, n_heads) are queries,
    rotated into ``out``; past them come keys (rotated) and values (copied), written to their
    cache slot."""
    if PDL:  # launched while the kernel before finishes: wait for it before touching memory
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    base = x_ptr + t * stride_t + h * stride_h
    x = tl.load(base + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    xp = tl.load(base + partner, mask=d < ROT, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + pos * ROT + d, mask=d < ROT, other=1.0)
    sin = tl.load(sin_ptr + pos * ROT + d, mask=d < ROT, other=0.0)
    rotated = tl.where(d < HALF, -xp, xp)
    y = tl.where((d < ROT) & (h < n_rot_heads), x * cos + rotated * sin, x)
    out = out_ptr + (t * n_heads + h) * HEAD_DIM
    if h >= n_heads:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        kv = h - n_heads
        if kv < n_kv_heads:
            dst = k_cache_ptr + slot * stride_cs + kv * stride_ch
        else:
            dst = v_cache_ptr + slot * stride_cs + (kv - n_kv_heads) * stride_ch
        tl.store(dst + d, y.to(k_cache_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    else:
        tl.store(out + d, y.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _rotary_rows_kernel(
    x_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_t,
    stride_h,
    n_heads,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    ROT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``BLOCK_H`` heads of one token per program, rotated into ``out`` (cos and sin read once
    for them): a prefill's many tokens in few, wide programs."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    h_ok = hs < n_heads
    base = x_ptr + t * stride_t + hs[:, None] * stride_h
    x = tl.load(base + d[None, :], mask=h_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    xp = tl.load(base + partner[None, :], mask=h_ok[:, None] & (d < ROT)[None, :], other=0.0)
    cos = tl.load(cos_ptr + pos * ROT + d, mask=d < ROT, other=1.0)
    sin = tl.load(sin_ptr + pos * ROT + d, mask=d < ROT, other=0.0)
    xf = x.to(tl.float32)
    xpf = xp.to(tl.float32)
    rotated = tl.where((d < HALF)[None, :], -xpf, xpf)
    y = tl.where((d < ROT)[None, :], xf * cos[None, :] + rotated * sin[None, :], xf)
    out = out_ptr + (t * n_heads + hs[:, None]) * HEAD_DIM + d[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & (d < HEAD_DIM)[None, :])


ROWS_HEADS = 16
"""Heads per program of ``_rotary_rows_kernel``."""


def rotary(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int
) -> torch.Tensor:
    """x [T, H, D] (any strides with a unit last stride) -> rotated copy [T, H, D]; ``cos`` and
    ``sin`` are the whole tables [max_len, rot_dim] (fp32)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    bh = min(ROWS_HEADS, next_pow2(h))
    _rotary_rows_kernel[(t, triton.cdiv(h, bh))](
        x,
        positions,
        cos,
        sin,
        out,
        x.stride(0),
        x.stride(1),
        h,
        HEAD_DIM=d,
        HALF=rot_dim // 2,
        ROT=rot_dim,
        BLOCK_D=next_pow2(d),
        BLOCK_H=bh,
    )
    return out


def rotary_into_cache(
    qkv: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rot_dim: int,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """qkv [T, H + 2 Hkv, D]: rotate q (returned [T, H, D]) and k, store k and v at ``slots``
    of the caches ([slots, Hkv, D]); one launch instead of rotary + two cache writes."""
    t, _, d = qkv.shape
    out = torch.empty((t, n_heads, d), dtype=qkv.dtype, device=qkv.device)
    dependent = pdl(qkv.device, t)
    _rotary_kernel[(t, n_heads + 2 * n_kv_heads)](
        qkv,
        positions,
        cos,
        sin,
        out,
        slots,
        k_cache,
        v_cache,
        qkv.stride(0),
        qkv.stride(1),
        n_heads,
        n_heads + n_kv_heads,
        n_kv_heads,
        k_cache.stride(0),
        k_cache.stride(1),
        HEAD_DIM=d,
        HALF=rot_dim // 2,
        ROT=rot_dim,
        BLOCK_D=next_pow2(d),
        PDL=dependent,
        **pdl_launch(dependent),
    )
    return out
