"""The paged KV cache of a model's attention layers: its size, decided once at start-up
(``truffula.runner.sizing`` does the arithmetic), and its allocation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from truffula.config import EngineConfig
from truffula.layers.attention import Attention
from truffula.runner.graphs import StepGraphs
from truffula.runner.sizing import (
    CudaMemory,
    EngineSizing,
    available_host_memory,
    choose_kv_cache,
)


def cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The cache's dtype for a model computing in ``dtype``: its own, but float32 on CPU, where
    a 16-bit model's decode attention runs in float32 (CPU SDPA is faster there): a float32
    cache holds the same values (16-bit ones widen exactly) and is attended in place, without a
    conversion of every cached key and value at every layer of every step."""
    return torch.float32 if device.type == "cpu" and dtype.is_floating_point else dtype


class KVCache:
    """One [slots, kv_heads, head_dim] key and value tensor per attention layer, bound to it
    (``cache_dtype`` of the model's dtype)."""

    def __init__(
        self,
        attn_layers: list[Attention],
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.attn_layers = attn_layers
        self.block_size = block_size
        self.device = device
        self.dtype = cache_dtype(device, dtype)

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * a.num_kv_heads * a.head_dim for a in self.attn_layers) * elem

    def allocate(self, num_blocks: int) -> None:
        """A cache of ``num_blocks`` blocks (the old one is freed first)."""
        slots = num_blocks * self.block_size
        for a in self.attn_layers:
            a.bind_cache(torch.empty(0), torch.empty(0))  # free the old cache first
            k = torch.zeros(slots, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
            a.bind_cache(k, torch.zeros_like(k))


def size_kv_cache(
    cache: KVCache,
    config: EngineConfig,
    given: EngineConfig,
    max_len: int,
    graphs: StepGraphs | None,
    profile_step: Callable[[], None],
) -> EngineSizing:
    """Decide the KV cache's size for ``config`` (the batching limits filled in by device;
    ``given``: as the caller set them); on CUDA with an automatic size, first measure the memory
    the heaviest step (``profile_step``) and the decode graphs take."""
    cache_cfg, device, block_size = config.cache, cache.device, cache.block_size
    per_token = cache.bytes_per_token
    auto = cache_cfg.num_blocks is None and cache_cfg.kv_cache_memory is None and per_token > 0
    cuda = measure_cuda(cache, graphs, profile_step) if auto and device.type == "cuda" else None
    host = available_host_memory() if auto and device.type != "cuda" else None
    flag_len = given.model.max_model_len
    max_len_flag = flag_len is not None and max_len == flag_len
    choice = choose_kv_cache(
        cache_cfg,
        bytes_per_block=per_token * block_size,
        max_len=max_len,
        max_num_seqs=config.scheduler.max_num_seqs or 1,
        cuda=cuda,
        host_available=host,
        max_len_flag=max_len_flag,
    )

    def source(value: object) -> str:
        return "auto" if value is None else "flag"

    return EngineSizing(
        device=str(device),
        kv_cache_bytes=(choice.num_blocks + 1) * block_size * per_token,
        num_blocks=choice.num_blocks,
        block_size=block_size,
        kv_bytes_per_token=per_token,
        kv_capacity_tokens=choice.num_blocks * block_size,
        max_len=max_len,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens or 1,
        max_num_seqs=config.scheduler.max_num_seqs or 1,
        max_prefill_while_decoding=config.scheduler.max_prefill_while_decoding or 0,
        graph_batch_sizes=tuple(graphs.sizes) if graphs is not None else (),
        mixed_graph_tokens=tuple(graphs.mixed_sizes) if graphs is not None else (),
        kv_cache_source=choice.source,
        kv_cache_reason=choice.reason,
        max_len_source="flag" if max_len_flag else "auto",
        max_num_batched_tokens_source=source(given.scheduler.max_num_batched_tokens),
        max_num_seqs_source=source(given.scheduler.max_num_seqs),
        max_prefill_while_decoding_source=source(given.scheduler.max_prefill_while_decoding),
        graph_batch_sizes_source=source(given.model.cuda_graph_max_batch),
        memory=cuda,
    )


def measure_cuda(
    cache: KVCache, graphs: StepGraphs | None, profile_step: Callable[[], None]
) -> CudaMemory:
    """GPU memory once the model is loaded, before the KV cache exists: what PyTorch holds,
    what is free, the peak of the heaviest step at the token budget, and an eager decode at
    the largest graph batch (the graphs' pool holds what it allocates). The profile runs
    over a one-block cache: every token's slot is in the null block."""
    dev = cache.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    cache.allocate(1)
    base = torch.cuda.memory_reserved(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    profile_step()
    torch.cuda.synchronize(dev)
    activations = torch.cuda.max_memory_reserved(dev) - base
    graph_bytes = 0
    if graphs is not None:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        kept = graphs.profile()
        torch.cuda.synchronize(dev)
        graph_bytes = torch.cuda.max_memory_reserved(dev) - base + kept
    cache.allocate(0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    weights = torch.cuda.memory_allocated(dev)
    return CudaMemory(total, free, weights, max(0, activations), max(0, graph_bytes))
