"""How large the KV cache, the steps and the decode graphs are: decided once, at start-up.

The step token budget, the running-request cap and the largest decode graph default by device
(``EngineConfig.for_device``). The KV cache, unless ``--num-kv-blocks`` or ``--kv-cache-memory``
sets it, is sized to the machine once the model is loaded (``choose_kv_cache``):

- CUDA: ``gpu_memory_utilization`` x the GPU's total memory, less what is in use once the model
  is loaded (its weights and LoRA slots, the CUDA context, other processes), less the peak
  memory of one step at the token budget and the decode graphs' memory pool (both measured by
  the runner before the cache exists; ``CudaMemory``);
- CPU: a tenth of the available RAM (``MemAvailable``), at most 1 GiB;

then raised, if need be, to hold one sequence of the model's full length, and never more than
the running-request cap times that length (blocks no request could use). A cache that cannot
hold one sequence of the maximum length is an error naming the flag to change, never a silently
shorter maximum length.

Everything here is arithmetic on numbers handed in (no torch, no device), so it is testable
without a GPU; the runner takes the readings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from truffula.config import CacheConfig
from truffula.errors import TruffulaError

GiB = 1 << 30
MiB = 1 << 20

CPU_KV_FRACTION = 0.10
"""CPU: the KV cache's share of the available RAM."""
CPU_KV_CAP = 1 << 30
"""CPU: the largest automatic KV cache (1 GiB: 23,000 tokens of the default model in fp32)."""
CPU_KV_MAX_FRACTION = 0.5
"""CPU: one full-length sequence may raise the cache up to this share of the available RAM."""


class CacheTooSmallError(ValueError, TruffulaError):
    """The KV cache cannot hold one sequence of the maximum length."""


@dataclass(frozen=True)
class CudaMemory:
    """GPU memory readings taken after the model is loaded, before the KV cache exists."""

    total: int
    """The GPU's memory."""
    free: int
    """Free on the GPU (after PyTorch's cache was emptied)."""
    weights: int
    """Held by PyTorch in this process: weights, LoRA slots, static buffers."""
    activations: int
    """Peak extra memory of one step at the token budget (measured, or an estimate)."""
    graphs: int = 0
    """The decode CUDA graphs' memory pool (estimated from an eager decode at the largest
    graph batch)."""

    @property
    def other(self) -> int:
        """In use but not PyTorch's tensors: the CUDA context, libraries, other processes."""
        return max(0, self.total - self.free - self.weights)


def cuda_kv_budget(mem: CudaMemory, utilization: float) -> int:
    """Bytes left for the KV cache: ``total x utilization - weights - other - activations -
    graphs`` (may be negative)."""
    return int(mem.total * utilization) - mem.weights - mem.other - mem.activations - mem.graphs


def cpu_kv_budget(available: int) -> int:
    """Bytes of KV cache on a CPU with ``available`` bytes of RAM available (before raising it
    to one full-length sequence)."""
    return min(CPU_KV_CAP, int(available * CPU_KV_FRACTION))


def available_host_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo (free RAM plus reclaimable caches), else the free
    physical pages; None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class KVChoice:
    num_blocks: int
    """Usable blocks (the pool's capacity); one more, the null block, is allocated."""
    source: str
    """``flag`` (``--num-kv-blocks`` / ``--kv-cache-memory``) or ``auto``."""
    reason: str
    """How the size was reached, for the start-up line."""


def choose_kv_cache(
    cache: CacheConfig,
    *,
    bytes_per_block: int,
    max_len: int,
    max_num_seqs: int,
    cuda: CudaMemory | None = None,
    host_available: int | None = None,
    max_len_flag: bool = False,
) -> KVChoice:
    """The KV cache's size in blocks: from ``cache.num_blocks`` or ``cache.kv_cache_memory`` when
    set, else from ``cuda`` (on a GPU) or ``host_available`` (on a CPU; None: 1 GiB).

    ``bytes_per_block == 0`` means the model keeps its own caches (the transformers fallback):
    blocks only count tokens, one full-length sequence per running request. Raises
    ``CacheTooSmallError`` naming the flags to change when one sequence of ``max_len`` tokens
    does not fit."""
    bs = cache.block_size
    per_seq = -(-max_len // bs)
    useful = max_num_seqs * per_seq  # every running request at the full length: more go unused
    length = "--max-model-len" if max_len_flag else "the model's context length"
    if cache.num_blocks is not None:
        n, source = cache.num_blocks, "flag"
        reason = f"--num-kv-blocks {cache.num_blocks}"
        fix = "raise --num-kv-blocks or lower --max-model-len"
    elif bytes_per_block == 0:
        n, source, reason = useful, "auto", "the model keeps its own caches: blocks only count"
        fix = "lower --max-model-len"
    elif cache.kv_cache_memory is not None:
        n, source = cache.kv_cache_memory // bytes_per_block - 1, "flag"
        reason = f"--kv-cache-memory {_size(cache.kv_cache_memory)}"
        fix = "raise --kv-cache-memory or lower --max-model-len"
    elif cuda is not None:
        util = cache.gpu_memory_utilization
        budget = cuda_kv_budget(cuda, util)
        n, source = max(0, budget // bytes_per_block - 1), "auto"
        reason = (
            f"{util:.2f} x {_size(cuda.total)} - {_size(cuda.weights)} weights - "
            f"{_size(cuda.activations)} activations - {_size(cuda.graphs)} CUDA graphs - "
            f"{_size(cuda.other)} other (CUDA context, other processes)"
        )
        fix = (
            f"raise --gpu-memory-utilization (now {util:.2f}), free GPU memory, set "
            "--kv-cache-memory, or lower --max-model-len"
        )
    else:
        one_seq = (per_seq + 1) * bytes_per_block
        if host_available is None:
            budget, reason = CPU_KV_CAP, f"{_size(CPU_KV_CAP)} (available RAM unknown)"
        else:
            budget = cpu_kv_budget(host_available)
            reason = (
                f"min({CPU_KV_FRACTION:.0%} of {_size(host_available)} available RAM, "
                f"{_size(CPU_KV_CAP)})"
            )
            if one_seq > budget and one_seq > host_available * CPU_KV_MAX_FRACTION:
                raise CacheTooSmallError(
                    f"one sequence of {max_len} tokens ({length}) needs {_size(one_seq)} of KV "
                    f"cache, more than half of the {_size(host_available)} of RAM available: "
                    "set --kv-cache-memory or lower --max-model-len"
                )
        if one_seq > budget:
            budget, reason = one_seq, f"{reason}, raised to one sequence of {max_len} tokens"
        n, source = budget // bytes_per_block - 1, "auto"
        fix = "set --kv-cache-memory or lower --max-model-len"
    if source == "auto" and n > useful:
        n = useful
        reason += f"; capped at {max_num_seqs} sequences of {max_len} tokens"
    if n < per_seq:
        raise CacheTooSmallError(
            f"the KV cache holds {max(0, n) * bs:,} tokens ({reason}), less than one sequence "
            f"of the maximum length, {max_len} tokens ({length}): {fix}"
        )
    return KVChoice(n, source, reason)


def profile_layout(budget: int, max_seqs: int, max_len: int) -> list[tuple[int, int]]:
    """``(start_pos, num_tokens)`` of the sequences of the heaviest step the scheduler can make:
    decodes at the full length first (one token each), then prefill chunks that each continue a
    sequence up to the full length (the widest attention: many queries over a long cache)."""
    cap = max(1, max_len - 1)
    n_pre = min(max_seqs, -(-budget // cap))
    n_dec = max(0, min(max_seqs - n_pre, budget - n_pre))
    layout = [(max_len - 1, 1)] * n_dec
    rest = budget - n_dec
    while rest > 0 and len(layout) < max_seqs:
        n = min(rest, cap)
        layout.append((max_len - n, n))
        rest -= n
    return layout


@dataclass(frozen=True)
class EngineSizing:
    """What the engine was sized to, and how each number was decided (``auto``: by device and
    machine; ``flag``: set by the caller). ``EngineCore.sizing``."""

    device: str
    kv_cache_bytes: int
    """Bytes of KV cache allocated (the null block included)."""
    num_blocks: int
    """Usable KV blocks (the block pool's capacity; one null block more is allocated)."""
    block_size: int
    kv_bytes_per_token: int
    """Keys and values of every layer for one token (0: the model keeps its own caches)."""
    kv_capacity_tokens: int
    """Tokens the cache holds, all requests together."""
    max_len: int
    """Longest sequence (prompt + generation) served."""
    max_num_batched_tokens: int
    max_num_seqs: int
    max_prefill_while_decoding: int
    """Prefill tokens in a step that also decodes (0: the step budget alone)."""
    graph_batch_sizes: tuple[int, ...]
    """Decode batch sizes captured in CUDA graphs (empty: none)."""
    mixed_graph_tokens: tuple[int, ...]
    """Token counts of the CUDA graphs of steps with prefill chunks (empty: none)."""
    kv_cache_source: str
    kv_cache_reason: str
    max_len_source: str
    """``auto`` (the model's context length) or ``flag`` (``--max-model-len``)."""
    max_num_batched_tokens_source: str
    max_num_seqs_source: str
    max_prefill_while_decoding_source: str
    graph_batch_sizes_source: str
    memory: CudaMemory | None = None
    """The GPU readings the automatic KV cache was computed from (CUDA, automatic only)."""

    def describe(self) -> str:
        """One line: what was chosen and why."""
        if self.kv_bytes_per_token:
            kv = f"KV cache {_size(self.kv_cache_bytes)} ({self.kv_cache_source}: "
        else:
            kv = f"KV cache kept by the model, {self.num_blocks:,} blocks to count it ("
        kv += (
            f"{self.kv_cache_reason}): {self.kv_capacity_tokens:,} tokens in "
            f"{self.num_blocks:,} blocks of {self.block_size}"
        )
        length = "the model's" if self.max_len_source == "auto" else "--max-model-len"
        graphs = "no decode graphs"
        if self.graph_batch_sizes:
            sizes = self.graph_batch_sizes
            graphs = (
                f"decode graphs for {sizes[0]}..{sizes[-1]} ({len(sizes)} sizes, "
                f"{self.graph_batch_sizes_source})"
            )
        if self.mixed_graph_tokens:
            graphs += f", mixed-step graphs for {self.mixed_graph_tokens[-1]} tokens or fewer"
        return (
            f"{kv}; max length {self.max_len:,} ({length}); step budget "
            f"{self.max_num_batched_tokens:,} tokens ({self.max_num_batched_tokens_source}), "
            f"prefill while decoding {self.max_prefill_while_decoding or 'not capped'} "
            f"({self.max_prefill_while_decoding_source}), "
            f"{self.max_num_seqs} running requests ({self.max_num_seqs_source}), {graphs}"
        )


def _size(n: int) -> str:
    if abs(n) >= 1000 * MiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= 10 * MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / MiB:.1f} MiB"
