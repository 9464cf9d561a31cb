"""Attention over the paged KV cache, with the rotary embedding of its queries and keys.

The runner attaches each layer's cache (``bind_cache``); the kernels are bound at start-up
(``use_kernels``): paged attention for ``forward(q, k, v)``, and for ``forward_qkv`` (a whole
qkv projection) a fused kernel on decode-only steps where the device has one.
"""

from __future__ import annotations

import torch
from torch import nn

from truffula.forward import AttentionFn, get_forward_context
from truffula.kernels.attention_torch import paged_attention
from truffula.kernels.select import Kernels, RotaryAttentionFn
from truffula.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        """``rotary``: the embedding ``forward_qkv`` applies (shared by the model's layers)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.rotary = rotary
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.impl: AttentionFn = paged_attention
        self.fused: RotaryAttentionFn | None = None
        """Rotary, cache write and attention of a decode-only step in one kernel."""

    def use_kernels(self, kernels: Kernels) -> None:
        self.impl = kernels.attention(self.head_dim)
        if self.rotary is not None:
            self.fused = kernels.rotary_attention(self.head_dim, self.rotary.rope_type)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Attach this layer's cache views ([num_slots, kv_heads, head_dim])."""
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, d], k/v [T, Hkv, d] -> [T, H * d]."""
        meta = get_forward_context().attn
        out = self.impl(
            q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window, self.softcap
        )
        return out.reshape(out.shape[0], -1)

    def forward_qkv(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, H + 2 Hkv, d] (one projection's output): rotate q and k by ``positions``,
        write k and v to the cache, attend -> [T, H * d]."""
        h, hkv = self.num_heads, self.num_kv_heads
        assert self.rotary is not None
        if self.fused is not None:
            meta = get_forward_context().attn
            if meta.num_decodes == qkv.shape[0]:
                rotary = self.rotary
                out = self.fused(
                    qkv,
                    positions,
                    rotary.cos_table,
                    rotary.sin_table,
                    rotary.rot_dim,
                    self.k_cache,
                    self.v_cache,
                    meta,
                    self.scale,
                    self.sliding_window,
                    self.softcap,
                )
                return out.reshape(out.shape[0], -1)
        # q and k rotate together: one rotary call for both
        qk = self.rotary(positions, qkv[:, : h + hkv])
        return self.forward(qk[:, :h], qk[:, h:], qkv[:, h + hkv :])
