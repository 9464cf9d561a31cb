"""The model and engine flags every command shares, and where they become an ``EngineConfig``.

A flag's default is its field's default in ``truffula/config.py`` (``default_of``); the
batching limits left unset are filled in by device there too (``DEVICE_DEFAULTS``), and the
help text quotes those numbers from it.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from truffula.config import (
    ASYNC_SCHEDULING,
    DEVICE_DEFAULTS,
    DTYPES,
    LINEAR_KERNELS,
    LOAD_FORMATS,
    QUANTIZATIONS,
    CacheConfig,
    EngineConfig,
    LimitsConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    parse_size,
)


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name!r}")


def _by_device(name: str) -> tuple[int, int]:
    """A batching limit's (CUDA, CPU) defaults."""
    return getattr(DEVICE_DEFAULTS["cuda"], name), getattr(DEVICE_DEFAULTS["cpu"], name)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    M, C, S, L, A = ModelConfig, CacheConfig, SchedulerConfig, LimitsConfig, LoRAConfig
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=default_of(M, "model"),
        help="'default' (embedded SmolLM2-135M-Instruct), a local HF folder, a .gguf file, or a "
        "hub id org/name[@revision] (the HF cache first, then a download)",
    )
    g.add_argument("--device", default=default_of(M, "device"), help="auto, cpu or cuda")
    g.add_argument("--dtype", default=default_of(M, "dtype"), choices=DTYPES)
    g.add_argument(
        "--quantization",
        default=default_of(M, "quantization"),
        choices=QUANTIZATIONS,
        help="int8: weight-only int8 linears, per-output-channel scales; fp8: e4m3 weights with "
        "per-output-channel scales (CUDA 8.9+: W8A8 with per-token activation scales; "
        "weight-only elsewhere); int4: weight-only 4-bit groups of 128, 64 or 32 input columns "
        "(torch's int4 matmul on CPU, Triton on CUDA); LoRA factors stay 16/32-bit",
    )
    g.add_argument(
        "--load-format",
        default=default_of(M, "load_format"),
        choices=LOAD_FORMATS,
        help="auto: the model's weights; dummy: random weights of its shape, nothing read "
        "(to measure speed and memory without the checkpoint; outputs are meaningless)",
    )
    g.add_argument(
        "--cpu-linear",
        default=default_of(M, "linear_kernel"),
        choices=LINEAR_KERNELS,
        help="CPU linears: auto (the faster of packed and torch for each weight shape, timed "
        "once on this CPU and cached), packed (oneDNN pre-packed weights) or torch (F.linear)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=default_of(M, "max_model_len"),
        help="longest prompt + generation",
    )
    g.add_argument(
        "--kv-cache-memory",
        default=default_of(C, "kv_cache_memory"),
        help="KV cache budget, e.g. 512MiB, 4GB (default: sized to the machine; CUDA: see "
        "--gpu-memory-utilization; CPU: 10%% of available RAM up to 1 GiB, at least one "
        "sequence of the full length)",
    )
    utilization = default_of(C, "gpu_memory_utilization")
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=utilization,
        help="CUDA: fraction of the GPU's total memory truffula may use (weights, activations, "
        "CUDA graphs, KV cache; other processes' memory counts against it); the KV cache takes "
        f"what is left (default {utilization:.2f})",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=default_of(C, "num_blocks"),
        help="exact KV block count (overrides --kv-cache-memory)",
    )
    g.add_argument(
        "--block-size", type=int, default=default_of(C, "block_size"), help="tokens per KV block"
    )
    gpu, cpu = _by_device("max_num_batched_tokens")
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=default_of(S, "max_num_batched_tokens"),
        help=f"token budget of one step (default: {gpu} on CUDA, {cpu} on CPU)",
    )
    gpu, cpu = _by_device("max_prefill_while_decoding")
    g.add_argument(
        "--max-prefill-while-decoding",
        type=int,
        default=default_of(S, "max_prefill_while_decoding"),
        help="most prefill tokens in a step that also decodes, while the decodes outnumber the "
        "requests waiting to start, so new prompts add a bounded delay to running streams "
        f"(default: {gpu} on CUDA, where such steps replay CUDA graphs; "
        f"{cpu}, no cap beyond the step budget, on CPU)",
    )
    g.add_argument(
        "--speculative-config",
        default=default_of(S, "speculative"),
        help='speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 1, "prompt_lookup_max": 4} (prompt lookup) or {"method": '
        '"draft_model", "model": PATH, "num_speculative_tokens": 4} (a smaller model with the '
        "same tokenizer); outputs, logprobs and alternatives are those of plain decoding",
    )
    gpu, cpu = _by_device("max_num_seqs")
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=default_of(S, "max_num_seqs"),
        help=f"most requests running in one step (default: {gpu} on CUDA, {cpu} on CPU)",
    )
    g.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=default_of(M, "cuda_graph_max_batch"),
        help="largest decode batch replayed as a CUDA graph (default: --max-num-seqs; 0: none)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=default_of(M, "tensor_parallel_size"),
        help="shard the model over N processes (one per GPU on CUDA, gloo on CPU): Llama, "
        "Mistral, Qwen2/3, Phi-3, Gemma 2, Mixtral (docs/tensor-parallel.md)",
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=default_of(S, "max_queued_requests"),
        help="requests held before 429",
    )
    g.add_argument(
        "--async-scheduling",
        default=default_of(S, "async_scheduling"),
        choices=ASYNC_SCHEDULING,
        help="launch each step before reading the previous one's results (auto: on CUDA)",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        default=default_of(C, "enable_prefix_caching"),
        help="compute every prompt in full (default: reuse cached KV blocks of shared prefixes)",
    )
    g.add_argument(
        "--max-k-alternatives",
        type=int,
        default=default_of(L, "max_k_alternatives"),
        help="largest k a request may ask",
    )
    g.add_argument("--max-stop-sequences", type=int, default=default_of(L, "max_stop_sequences"))
    g.add_argument(
        "--max-active-adapters",
        type=int,
        default=default_of(A, "max_active_adapters"),
        help="LoRA adapters resident at once",
    )
    g.add_argument(
        "--adapter-root",
        default=default_of(A, "adapter_root"),
        help="directory local adapter ids must resolve under (default: the working directory)",
    )
    g.add_argument(
        "--max-lora-rank",
        type=int,
        default=default_of(A, "max_lora_rank"),
        help="largest adapter rank served",
    )
    g.add_argument(
        "--max-cpu-adapters",
        type=int,
        default=default_of(A, "max_cpu_adapters"),
        help="adapters kept in host memory; the least recently used unused ones are dropped",
    )
    g.add_argument("-v", "--verbose", action="store_true")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags as ``EngineConfig.from_kwargs`` (and ``LLM``) keywords."""
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "linear_kernel": args.cpu_linear,
        "load_format": args.load_format,
        "max_model_len": args.max_model_len,
        "kv_cache_memory": None
        if args.kv_cache_memory is None
        else parse_size(args.kv_cache_memory),
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "num_blocks": args.num_kv_blocks,
        "block_size": args.block_size,
        "enable_prefix_caching": args.prefix_caching,
        "max_num_batched_tokens": args.max_batch_tokens,
        "max_num_seqs": args.max_num_seqs,
        "max_prefill_while_decoding": args.max_prefill_while_decoding,
        "speculative": args.speculative_config,
        "cuda_graph_max_batch": args.cuda_graph_max_batch,
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_queued_requests": args.max_concurrent_requests,
        "async_scheduling": args.async_scheduling,
        "max_k_alternatives": args.max_k_alternatives,
        "max_stop_sequences": args.max_stop_sequences,
        "max_active_adapters": args.max_active_adapters,
        "adapter_root": args.adapter_root,
        "max_lora_rank": args.max_lora_rank,
        "max_cpu_adapters": args.max_cpu_adapters,
    }


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(**engine_options(args))
