"""Triton kernels for CUDA. Importing this module never needs CUDA; ``AVAILABLE`` says whether
Triton is installed. Each wrapper states its torch reference (the CPU path and the test oracle):

- ``add_rms_norm``      -> ``layers.norm.RMSNorm`` (residual add, then RMSNorm, one pass)
- ``rotary``            -> ``layers.rotary.RotaryEmbedding.forward`` (half rotation, cos/sin
                           looked up by position inside the kernel)
- ``act_and_mul``       -> ``layers.activation.act_and_mul`` (SiLU or tanh-GELU gate times up)
- ``decode_attention``  -> ``kernels.attention_torch.paged_attention`` for one-token queries
                           (kernels in ``triton_attention.py``)
- ``lora_bgmv``         -> ``kernels.lora_torch.lora_reference`` (``triton_lora.py``)
- ``row_stats``         -> ``sampling.sampler.logprob_stats`` (``triton_stats.py``)
- ``argmax_rows``       -> ``torch.argmax`` over the last dimension (``triton_stats.py``)
- ``gemv``              -> ``torch.nn.functional.linear`` for one 16-bit row (``triton_gemv.py``)
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
        WRITE_CACHE: tl.constexpr,
    ):
        """Heads [0, n_heads) are rotated into ``out``. With WRITE_CACHE the row is a whole qkv
        projection: heads past n_heads are keys (rotated) then values (copied), written to
        their cache slot instead."""
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
        if WRITE_CACHE:
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
        else:
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
        num_warps=8 if n >= 4096 else 4,  # H200, hidden 4096: 1.6 against 1.9 µs with 4
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
        positions,
        out,
        out,
        x.stride(0),
        x.stride(1),
        h,
        h,
        0,
        0,
        0,
        HEAD_DIM=d,
        HALF=rot_dim // 2,
        ROT=rot_dim,
        BLOCK_D=_pow2(d),
        WRITE_CACHE=False,
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
        BLOCK_D=_pow2(d),
        WRITE_CACHE=True,
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


def decode_attention(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See ``truffula.kernels.triton_attention.decode_attention``."""
    from truffula.kernels import triton_attention

    return triton_attention.decode_attention(*args, **kwargs)


def lora_bgmv(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See ``truffula.kernels.triton_lora.lora_sgmv``."""
    from truffula.kernels import triton_lora

    return triton_lora.lora_sgmv(*args, **kwargs)


def row_stats(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """See ``truffula.kernels.triton_stats.row_stats``."""
    from truffula.kernels import triton_stats

    return triton_stats.row_stats(x, chosen)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """See ``truffula.kernels.triton_stats.argmax_rows``."""
    from truffula.kernels import triton_stats

    return triton_stats.argmax_rows(x)


def gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of 16-bit activations on CUDA with a dense row-major weight of the same dtype."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and use(x)
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """See ``truffula.kernels.triton_gemv.gemv``."""
    from truffula.kernels import triton_gemv

    return triton_gemv.gemv(x, weight, bias)
