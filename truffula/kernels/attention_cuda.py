"""Paged attention on CUDA: one-token queries through the Triton decode kernel (graph-capturable:
it reads lengths and block tables from device tensors), multi-token chunks through torch SDPA
(flash attention for a whole prompt). Same semantics as ``attention_torch.paged_attention``."""

from __future__ import annotations

import torch

from truffula.kernels import triton_kernels
from truffula.kernels.attention_torch import paged_attention as torch_paged_attention
from truffula.kernels.attention_torch import prefill_attention, write_kv
from truffula.runner.context import AttentionMetadata


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
    d = q.shape[-1]
    if d & (d - 1):  # the Triton kernel tiles the head dimension by powers of two
        return torch_paged_attention(
            q, k, v, k_cache, v_cache, meta, scale, sliding_window, softcap
        )
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    nd = meta.num_decodes
    if nd == q.shape[0]:
        return triton_kernels.decode_attention(
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
        out[:nd] = triton_kernels.decode_attention(
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
    prefill_attention(out, q, k, v, k_cache, v_cache, meta, scale, sliding_window, softcap)
    return out
