"""Triton kernels for CUDA. Importing this module never needs CUDA; ``AVAILABLE`` says whether
Triton is installed. Each wrapper states its torch reference (the CPU path and the test oracle):

- ``add_rms_norm``      -> ``layers.norm.RMSNorm`` (residual add, then RMSNorm, one pass)
- ``rotary``            -> ``layers.rotary.RotaryEmbedding.forward`` (half rotation, cos/sin
                           looked up by position inside the kernel)
- ``act_and_mul``       -> ``layers.activation.act_and_mul`` (SiLU or tanh-GELU gate times up)
- ``decode_attention``  -> ``kernels.attention_torch.paged_attention`` for one-token queries
- ``lora_bgmv``         -> ``kernels.lora_torch.lora_reference`` (per-token shrink then expand)
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False


ENABLED = AVAILABLE and os.environ.get("TRUFFULA_KERNELS", "auto") != "torch"
"""``TRUFFULA_KERNELS=torch`` keeps the torch reference on CUDA too (for comparisons)."""


def use(x: torch.Tensor) -> bool:
    """True when ``x`` lives on a CUDA device and the Triton kernels are enabled."""
    return ENABLED and x.is_cuda


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if AVAILABLE:

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
    ):
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

    @triton.jit
    def _rotary_kernel(
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
    ):
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
        y = tl.where(d < ROT, x * cos + rotated * sin, x)
        out = out_ptr + (t * n_heads + h) * HEAD_DIM
        tl.store(out + d, y.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)

    @triton.jit
    def _act_mul_kernel(x_ptr, out_ptr, n, stride_x, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        else:
            a = g * tl.sigmoid(g)
        tl.store(out_ptr + row * n + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        lens_ptr,
        out_ptr,
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
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        seq_len = tl.load(lens_ptr + b)
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
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(seq_len - window, 0)
            start = (start // BLOCK_N) * BLOCK_N
        for n0 in range(start, seq_len, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < seq_len
            if HAS_WINDOW:
                valid = valid & (n >= seq_len - window)
            blk = tl.load(bt_ptr + b * stride_bt + n // BLOCK_SIZE, mask=valid, other=0).to(
                tl.int64
            )
            slot = blk * BLOCK_SIZE + n % BLOCK_SIZE
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
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
        out = acc / lsum[:, None]
        o_ptr = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr,
        a_ptr,
        slots_ptr,
        tmp_ptr,
        n_in,
        stride_x,
        stride_as,
        stride_aj,
        stride_ar,
        n_shards,
        n_splits,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """tmp[t, j, split] = A[slot(t), j, :, K-chunk] @ x[t, K-chunk] (a split-K partial)."""
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        r = tl.arange(0, RANK_PAD)
        k = split * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < tl.where(slot >= 0, n_in, 0)  # base-model tokens read nothing
        x = tl.load(x_ptr + t * stride_x + k, mask=kmask, other=0.0).to(tl.float32)
        safe = tl.maximum(slot, 0)
        a_off = safe * stride_as + j * stride_aj + r[:, None] * stride_ar + k[None, :]
        a = tl.load(a_ptr + a_off, mask=(r < RANK)[:, None] & kmask[None, :], other=0.0).to(
            tl.float32
        )
        part = tl.sum(a * x[None, :], axis=1)
        tl.store(tmp_ptr + ((t * n_shards + j) * n_splits + split) * RANK_PAD + r, part)

    @triton.jit
    def _lora_expand_kernel(
        y_ptr,
        tmp_ptr,
        bt_ptr,
        slots_ptr,
        n_out,
        stride_y,
        stride_bs,
        stride_br,
        off1,
        off2,
        n_splits,
        N_SHARDS: tl.constexpr,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        """y[t, o] += sum_r shrink[t, shard(o), r] * Bt[slot(t), r, o] over the whole output;
        shards start at 0, off1, off2; each shard's shrink is summed over its K splits."""
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        if slot >= 0:
            o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
            shard = (o >= off1).to(tl.int32) + (o >= off2).to(tl.int32)
            r = tl.arange(0, RANK_PAD)
            sp = tl.arange(0, SPLITS_PAD)
            b_off = slot * stride_bs + r[:, None] * stride_br + o[None, :]
            bmat = tl.load(
                bt_ptr + b_off, mask=(r < RANK)[:, None] & (o < n_out)[None, :], other=0.0
            ).to(tl.float32)
            delta = tl.zeros([BLOCK_O], tl.float32)
            for j in tl.static_range(N_SHARDS):
                parts = tl.load(
                    tmp_ptr + ((t * N_SHARDS + j) * n_splits + sp[:, None]) * RANK_PAD + r[None, :],
                    mask=(sp < n_splits)[:, None],
                    other=0.0,
                )
                sj = tl.sum(parts, axis=0)
                delta += tl.where(shard == j, tl.sum(sj[:, None] * bmat, axis=0), 0.0)
            y = y_ptr + t * stride_y + o
            prev = tl.load(y, mask=o < n_out, other=0.0).to(tl.float32)
            tl.store(y, (prev + delta).to(y_ptr.dtype.element_ty), mask=o < n_out)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual), or (norm(x), None) without a residual."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    r2 = residual.reshape(-1, n) if residual is not None else x2
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
        BLOCK=_pow2(n),
    )
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else None)


def rotary(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int
) -> torch.Tensor:
    """x [T, H, D] (any strides with a unit last stride) -> rotated copy [T, H, D]."""
    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    _rotary_kernel[(t, h)](
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
        BLOCK_D=_pow2(d),
    )
    return out


def act_and_mul(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, _pow2(n))
    _act_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
        x2, out, n, x2.stride(0), GELU=gelu, BLOCK=block
    )
    return out.view(*x.shape[:-1], n)


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
) -> torch.Tensor:
    """q [B, H, D]; caches [slots, Hkv, D] -> [B, H, D] over each sequence's cached tokens."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    out = torch.empty_like(q)
    _decode_attention_kernel[(b, hkv)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
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
        GROUP=group,
        GROUP_PAD=max(16, _pow2(group)),
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        BLOCK_N=max(16, min(64, block_size * 4)),
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32,
    )
    return out


LORA_BLOCK_K = 512
LORA_BLOCK_O = 128


def lora_bgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    offsets: list[int],
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """y[t, off_j:off_j+n_j] += Bt[s, :, off_j:off_j+n_j]^T (A[s, j] x[t]) for tokens with slot
    s >= 0, in place. ``bt`` [slots, R, out] holds every shard's B side by side (up to 3 shards).
    Two launches: a split-K shrink into fp32 partials, then one expand over the whole output."""
    t = x.shape[0]
    _, n_shards, rank, n_in = a.shape
    rank_pad = max(16, _pow2(rank))
    splits = triton.cdiv(n_in, LORA_BLOCK_K)
    tmp = torch.empty(t, n_shards, splits, rank_pad, dtype=torch.float32, device=x.device)
    _lora_shrink_kernel[(t, n_shards, splits)](
        x,
        a,
        token_slots,
        tmp,
        n_in,
        x.stride(0),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        n_shards,
        splits,
        RANK=rank,
        RANK_PAD=rank_pad,
        BLOCK_K=LORA_BLOCK_K,
    )
    offs = [*offsets[1:], 1 << 62, 1 << 62][:2]  # shard starts; unused ones never reached
    n_out = bt.shape[2]
    _lora_expand_kernel[(t, triton.cdiv(n_out, LORA_BLOCK_O))](
        y,
        tmp,
        bt,
        token_slots,
        n_out,
        y.stride(0),
        bt.stride(0),
        bt.stride(1),
        offs[0],
        offs[1],
        splits,
        N_SHARDS=n_shards,
        RANK=rank,
        RANK_PAD=rank_pad,
        SPLITS_PAD=max(2, _pow2(splits)),
        BLOCK_O=LORA_BLOCK_O,
    )
    return y
