"""Paged attention in plain torch: the CPU path and the oracle of every attention kernel.

Semantics, as a loop::

    for each sequence s with query tokens t in [qs, qe) and seq_len L (cache holds L tokens
    after this step's tokens were written):
        query i (absolute position p = L - (qe - qs) + i) attends to cache positions j with
        j <= p and, with a sliding window W, j > p - W.
        scores = q . k * scale (then softcap * tanh(scores / softcap) when softcap is set)
        out[t] = softmax(scores) @ v

Keys and values of the step's own tokens are written to their cache slots first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from truffula.forward import AttentionMetadata

ChunkAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(q [Lq, H, d], k [Lk, Hkv, d], v, scale) -> [Lq, H, d], query i seeing keys up to
Lk - Lq + i (``kernels.attention_prefill_triton.chunk_attention``)."""


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store new keys/values. Caches are [num_slots, kv_heads, head_dim]; k, v [T, kv_heads, head_dim]."""
    k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v.to(v_cache.dtype))


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
    *,
    flash_prefill: bool = False,
) -> torch.Tensor:
    """q [T, H, d], k/v [T, Hkv, d] -> [T, H, d]. Writes k/v into the cache. ``flash_prefill``
    (CUDA): a whole prompt without window or softcap goes through SDPA's causal kernel."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    nd = meta.num_decodes
    out = q.new_empty(0) if nd == q.shape[0] else torch.empty_like(q)
    if nd:
        slots, mask, span = decode_layout(meta, sliding_window)
        if span is not None:  # one sequence in consecutive slots: read the cache in place
            kd, vd = (
                k_cache[span[0] : span[1]].unsqueeze(0),
                v_cache[span[0] : span[1]].unsqueeze(0),
            )
        else:
            kd, vd = _gather(k_cache, slots), _gather(v_cache, slots)
        qd = q[:nd]
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # CPU SDPA in 16-bit types is slower than in fp32 for decode shapes (87 against
            # 48 us a layer, batch 1): attend in fp32 (the cache is float32 on CPU, see
            # ``runner.kv_cache.cache_dtype``; a 16-bit one is converted here)
            qd, kd, vd = qd.float(), kd.float(), vd.float()
        kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)  # [nd, Hkv, max_kv, d]
        qd = qd.unsqueeze(2)  # [nd, H, 1, d]
        decoded = _attend(qd, kd, vd, mask, scale, softcap).squeeze(2)
        if nd == q.shape[0]:  # a decode-only step: no output to assemble
            return decoded.to(q.dtype)
        out[:nd] = decoded
    prefill_attention(
        out, q, k, v, k_cache, v_cache, meta, scale, sliding_window, softcap, flash_prefill
    )
    return out


def prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    flash_prefill: bool,
    chunk_kernel: ChunkAttentionFn | None = None,
) -> None:
    """The multi-token sequences of the step (after the decodes), one at a time, into ``out``.
    ``chunk_kernel``: the attention of a chunk after cached tokens (no window, no softcap),
    in place of the dense mask."""
    starts = meta.query_start_loc_cpu
    for s in range(meta.num_decodes, meta.num_seqs):
        qs, qe, kv_len = starts[s], starts[s + 1], meta.seq_lens_cpu[s]
        ql = qe - qs
        if kv_len == ql:  # whole sequence in this step: use the fresh keys, no gather
            ks, vs = k[qs:qe], v[qs:qe]
        else:  # a chunk after cached tokens (a float32 cache on CPU: back to q's dtype, exactly)
            slots = seq_slots(meta, s, kv_len)
            ks, vs = _gather(k_cache, slots).to(q.dtype), _gather(v_cache, slots).to(q.dtype)
        if chunk_kernel is not None and kv_len != ql and sliding_window is None and softcap is None:
            out[qs:qe] = chunk_kernel(q[qs:qe], ks, vs, scale)
            continue
        qp = q[qs:qe].transpose(0, 1).unsqueeze(0)  # [1, H, ql, d]
        kp = ks.transpose(0, 1).unsqueeze(0)
        vp = vs.transpose(0, 1).unsqueeze(0)
        if flash_prefill and kv_len == ql and sliding_window is None and softcap is None:
            gqa = qp.shape[1] != kp.shape[1]
            o = F.scaled_dot_product_attention(
                qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            mask = prefill_mask(meta, s, ql, kv_len, sliding_window)
            o = _attend(qp, kp, vp, mask, scale, softcap)
        out[qs:qe] = o[0].transpose(0, 1)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slots]`` through ``index_select`` (row copies; 3x faster than advanced indexing
    on CPU for decode-sized gathers)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q [B, H, Lq, d], k/v [B, Hkv, Lk, d], mask broadcastable to [B, H, Lq, Lk] (True = keep)."""
    if softcap is None:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


DecodeLayout = tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]


def decode_layout(meta: AttentionMetadata, window: int | None) -> DecodeLayout:
    """Slot indices [nd, max_kv] and keep-mask [nd, 1, 1, max_kv] of the decode sequences; no
    mask when it would keep everything (every sequence as long as the longest, within the
    window: always so for a single stream), which spares SDPA its masked path. On CPU, a
    single stream whose slots are consecutive (blocks handed out in order, as a free pool
    does) also gets their range: its keys and values are then read in place, not gathered
    (alone, gather and SDPA of a layer 114 µs against 25 over a slice at 100 cached tokens;
    in the engine, the default model's single stream 1.02x: 27.0 against 26.5 tok/s, 2
    threads)."""
    key = ("decode", window)
    if key not in meta.memo:
        nd = meta.num_decodes
        lens_cpu = meta.seq_lens_cpu[:nd]
        max_kv = max(lens_cpu)
        dev = meta.block_tables.device
        pos = torch.arange(max_kv, device=dev)
        blocks = meta.block_tables[:nd, pos // meta.block_size].long()
        slots = blocks * meta.block_size + pos % meta.block_size
        mask = None
        if min(lens_cpu) != max_kv or (window is not None and max_kv > window):
            lens = meta.seq_lens[:nd].long().unsqueeze(1)
            keep = pos.unsqueeze(0) < lens
            if window is not None:
                keep &= pos.unsqueeze(0) >= lens - window
            mask = keep[:, None, None, :]
        span = None
        if nd == 1 and mask is None and dev.type == "cpu":
            first = int(slots[0, 0])
            if int(slots[0, -1]) - first == max_kv - 1 and bool((slots[0].diff() == 1).all()):
                span = (first, first + max_kv)
        meta.memo[key] = (slots, mask, span)
    return cast(DecodeLayout, meta.memo[key])


def seq_slots(meta: AttentionMetadata, s: int, kv_len: int) -> torch.Tensor:
    key = ("seq", s)
    if key not in meta.memo:
        pos = torch.arange(kv_len, device=meta.block_tables.device)
        blocks = meta.block_tables[s, pos // meta.block_size].long()
        meta.memo[key] = blocks * meta.block_size + pos % meta.block_size
    return cast(torch.Tensor, meta.memo[key])


def prefill_mask(
    meta: AttentionMetadata, s: int, q_len: int, kv_len: int, window: int | None
) -> torch.Tensor:
    key = ("mask", s, window)
    if key not in meta.memo:
        device = meta.block_tables.device
        qpos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
        kpos = torch.arange(kv_len, device=device).unsqueeze(0)
        keep = kpos <= qpos
        if window is not None:
            keep &= kpos > qpos - window
        meta.memo[key] = keep
    return cast(torch.Tensor, meta.memo[key])
