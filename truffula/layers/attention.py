"""Attention over the paged KV cache; the kernel is chosen by the runner when it binds the cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from truffula.kernels import triton_kernels
from truffula.kernels.attention_torch import paged_attention
from truffula.runner.context import get_forward_context

AttentionFn = Callable[..., torch.Tensor]


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.impl: AttentionFn = paged_attention

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, impl: AttentionFn) -> None:
        """Attach this layer's cache views ([num_slots, kv_heads, head_dim]) and kernel."""
        self.k_cache, self.v_cache, self.impl = k_cache, v_cache, impl

    def can_fuse_decode(self, qkv: torch.Tensor, rotary: object) -> bool:
        """A CUDA decode-only step that the fused rotary + cache-write kernel can serve."""
        if not (triton_kernels.use(qkv) and self.head_dim & (self.head_dim - 1) == 0):
            return False
        if getattr(rotary, "params", {}).get("rope_type") == "longrope":
            return False
        return get_forward_context().attn.num_decodes == qkv.shape[0]

    def decode_from_cache(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of one-token queries [T, H, d] over the cache (keys already written)."""
        meta = get_forward_context().attn
        out = triton_kernels.decode_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens,
            self.scale,
            meta.block_size,
            self.sliding_window,
            self.softcap,
        )
        return out.reshape(out.shape[0], -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, d], k/v [T, Hkv, d] -> [T, H * d]."""
        meta = get_forward_context().attn
        out = self.impl(
            q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window, self.softcap
        )
        return out.reshape(out.shape[0], -1)
