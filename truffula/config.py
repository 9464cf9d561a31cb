"""Engine configuration: frozen dataclasses composed into one ``EngineConfig``.

Each part validates itself in ``__post_init__`` and raises ``ValueError`` naming the field.
The CLI (``truffula/cli/``) is the only place that turns command-line flags into these; its
flags' defaults are these fields' defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from truffula.speculative.config import SpeculativeConfig

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "fp8", "int4")
ASYNC_SCHEDULING = ("auto", "on", "off")
LINEAR_KERNELS = ("auto", "packed", "torch")
LOAD_FORMATS = ("auto", "dummy")


def parse_size(text: str | int) -> int:
    """Parse a memory size such as ``512MiB``, ``2GB`` or ``1073741824`` into bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"cannot parse memory size {text!r} (examples: 512MiB, 2GB, 1073741824)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    base = unit[:1]
    scale = 1024 ** "bkmgt".index(base) if "i" in unit and base else _UNITS[base]
    return int(number * scale)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how."""

    model: str = "default"
    """``default`` (the embedded SmolLM2-135M-Instruct), a local HF folder, a .gguf file or a hub
    id ``org/name[@revision]`` (the HF cache first, then a download)."""
    device: str = "auto"
    """``auto`` picks CUDA when present, else CPU."""
    dtype: str = "auto"
    """``auto`` is float32 on CPU and bfloat16 on CUDA; or float32 / bfloat16 / float16."""
    max_model_len: int | None = None
    """Longest sequence (prompt + generation); defaults to the model's context length."""
    cuda_graphs: bool = True
    """Replay CUDA graphs for decode-only steps (CUDA only)."""
    cuda_graph_max_batch: int | None = None
    """Largest decode batch captured in a CUDA graph; None: the running-request cap
    (``max_num_seqs``); 0: no graphs."""
    linear_kernel: str = "auto"
    """CPU linears (``--cpu-linear``): ``packed`` (oneDNN pre-packed weights), ``torch``
    (F.linear, the reference) or ``auto`` (for each weight shape the faster of the two on this
    CPU, timed once and cached: ``kernels.linear_cpu.choose``)."""
    quantization: str | None = None
    """``int8``: weight-only int8 linears with per-output-channel scales (not the LM head);
    ``fp8``: e4m3 weights with per-output-channel scales (W8A8 with per-token activation
    scales on CUDA steps of several rows, weight-only otherwise); ``int4``: weight-only 4-bit
    groups of 128 (or 64, 32) input columns with a scale and minimum each; None: the
    weights in ``dtype``."""
    tensor_parallel_size: int = 1
    """Processes the model is sharded over (``truffula.distributed``; docs/tensor-parallel.md):
    one per GPU on CUDA (NCCL), gloo on CPU; 1: one process, no collectives."""
    load_format: str = "auto"
    """``auto``: the folder's weights; ``dummy``: random weights of the folder's shape, no
    weights file read (vLLM's ``--load-format dummy``: speed and memory on a model's shape,
    meaningless outputs)."""

    def __post_init__(self) -> None:
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(
                f"quantization must be {' or '.join(QUANTIZATIONS)} or unset, "
                f"not {self.quantization!r}"
            )
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(
                f"linear_kernel must be auto, packed or torch, not {self.linear_kernel!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be auto or dummy, not {self.load_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.cuda_graph_max_batch is not None and self.cuda_graph_max_batch < 0:
            raise ValueError("cuda_graph_max_batch must be >= 0")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size (--tensor-parallel-size) must be at least 1, not "
                f"{self.tensor_parallel_size}"
            )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: fixed-size blocks drawn from a pool sized by a memory budget.

    Left unset, the budget is sized to the machine once the model is loaded
    (``truffula.runner.sizing``): on CUDA, ``gpu_memory_utilization`` of the GPU's memory less
    the weights, the activations of a step and the CUDA graphs; on CPU, a tenth of the available
    RAM up to 1 GiB, and never less than one sequence of the model's full length."""

    block_size: int = 16
    kv_cache_memory: int | None = None
    """Bytes of KV cache; the pool holds as many blocks as fit. None: sized to the machine."""
    num_blocks: int | None = None
    """Overrides ``kv_cache_memory`` with an exact number of blocks (tests, tiny budgets)."""
    gpu_memory_utilization: float = 0.90
    """CUDA: the fraction of the GPU's total memory truffula may use (weights, activations,
    CUDA graphs and KV cache together; what other processes hold counts against it). Used
    when neither ``kv_cache_memory`` nor ``num_blocks`` is set."""
    enable_prefix_caching: bool = True
    """Reuse the full KV blocks (and prompt-logprob records) of prompts seen before
    (``truffula.scheduler.prefix_cache``)."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, not {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], not {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class DeviceDefaults:
    """Batching limits left unset, by device kind (``EngineConfig.for_device``)."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_prefill_while_decoding: int
    """Prefill tokens in a step that also decodes (0: no cap beyond the step budget)."""


DEVICE_DEFAULTS: dict[str, DeviceDefaults] = {
    # a GPU reads the weights once per step whatever its width: wide steps (long prefill
    # chunks, hundreds of decodes) are what keep its matrix units busy. While requests decode, a
    # step's prefill is held near the GPU's balance point (the tokens whose matmul time is about
    # one read of the weights) and the step is replayed as a CUDA graph, so new prompts lengthen
    # running streams' steps boundedly; without such graphs (see ``runner.graphs``) the runner
    # lifts the cap: an eager mixed step's launches alone cost several decode steps
    "cuda": DeviceDefaults(
        max_num_batched_tokens=8192, max_num_seqs=256, max_prefill_while_decoding=256
    ),
    # a CPU step's time grows with its tokens: short steps keep decodes flowing
    "cpu": DeviceDefaults(
        max_num_batched_tokens=512, max_num_seqs=64, max_prefill_while_decoding=0
    ),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_batched_tokens: int | None = None
    """Token budget of one step (prefill chunks and decodes together). None: by device
    (``DEVICE_DEFAULTS``: 8192 on CUDA, 512 on CPU)."""
    max_num_seqs: int | None = None
    """Most requests running in one step. None: by device (256 on CUDA, 64 on CPU)."""
    max_prefill_while_decoding: int | None = None
    """Most prefill tokens in a step that also runs decodes (chunked prefill keeps the rest for
    later steps); 0: the step budget alone. None: by device (256 on CUDA when such steps run
    as CUDA graphs, else 0). Bounds the inter-token latency new prompts add to running streams;
    held only while the decodes outnumber the requests waiting to start (a burst of arrivals
    gets the whole budget)."""
    speculative: SpeculativeConfig | None = None
    """Speculative decoding (``--speculative-config``); None: off."""
    max_queued_requests: int = 1024
    """Most requests held (running + waiting) before new ones are refused as overloaded."""
    async_scheduling: str = "auto"
    """``on``: launch step N+1 before reading step N's results, so the host's work (results,
    text, scheduling) overlaps the device's; ``auto``: on CUDA only; ``off``."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_prefill_while_decoding is not None and self.max_prefill_while_decoding < 0:
            raise ValueError("max_prefill_while_decoding must be 0 (no cap) or more")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be at least 1")
        if self.async_scheduling not in ASYNC_SCHEDULING:
            raise ValueError(
                f"async_scheduling must be auto, on or off, not {self.async_scheduling!r}"
            )


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits enforced by validation."""

    max_k_alternatives: int = 20
    max_stop_sequences: int = 4
    max_stop_length: int = 1000
    """Longest stop sequence, in characters."""
    max_top_k: int = 1 << 20
    """Largest ``top_k`` accepted (above any vocabulary: a ``top_k`` at or above the vocabulary
    size keeps every token); larger values are refused before they become tensors."""
    max_new_tokens_default: int = 256
    prompt_logprobs_chunk: int = 256
    """Prompt positions whose logits are materialized at once for prompt logprobs."""

    def __post_init__(self) -> None:
        if self.max_k_alternatives < 1:
            raise ValueError("max_k_alternatives must be at least 1")
        if self.max_stop_sequences < 0:
            raise ValueError("max_stop_sequences must be >= 0")
        if self.max_stop_length < 1:
            raise ValueError("max_stop_length must be at least 1")
        if not 1 <= self.max_top_k < 2**63:
            raise ValueError("max_top_k must be in [1, 2**63)")
        if self.prompt_logprobs_chunk < 1:
            raise ValueError("prompt_logprobs_chunk must be at least 1")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter serving limits."""

    max_active_adapters: int = 8
    """Device slots for adapters; others wait in host memory (LRU)."""
    max_lora_rank: int = 16
    adapter_root: str | None = None
    """Directory under which ``adapter_source: local`` ids must resolve."""
    max_cpu_adapters: int = 64
    """Adapters (and merges) kept in host memory; beyond it the least recently used one that
    no request holds is dropped (and read again on its next use)."""
    max_merged_adapters: int = 16
    """Most adapters one ``merged_adapters`` request may combine."""

    def __post_init__(self) -> None:
        if self.max_active_adapters < 1:
            raise ValueError("max_active_adapters must be at least 1")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be at least 1")
        if self.max_cpu_adapters < 1:
            raise ValueError("max_cpu_adapters must be at least 1")
        if self.max_merged_adapters < 1:
            raise ValueError("max_merged_adapters must be at least 1")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def for_device(self, device_type: str) -> EngineConfig:
        """This config with the batching limits left unset (None) filled in for a device kind
        (``cuda``, ``cpu``; others take the CPU values): the step token budget, the
        running-request cap and the largest CUDA graph batch (the cap). The one place these
        defaults are applied; a config already resolved comes back unchanged. The KV cache
        size needs the loaded model and is resolved by the runner (``truffula.runner.sizing``)."""
        d = DEVICE_DEFAULTS.get(device_type, DEVICE_DEFAULTS["cpu"])
        s = self.scheduler
        max_num_seqs = s.max_num_seqs or d.max_num_seqs
        scheduler = replace(
            s,
            max_num_batched_tokens=s.max_num_batched_tokens or d.max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_prefill_while_decoding=d.max_prefill_while_decoding
            if s.max_prefill_while_decoding is None
            else s.max_prefill_while_decoding,
        )
        graphs = self.model.cuda_graph_max_batch
        model = replace(
            self.model,
            cuda_graph_max_batch=min(max_num_seqs, graphs) if graphs is not None else max_num_seqs,
        )
        return replace(self, model=model, scheduler=scheduler)

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        """Build a config from flat keyword arguments (``model=..., num_blocks=...``)."""
        parts: dict[str, dict[str, object]] = {}
        sections: dict[str, type[Any]] = {
            "model": ModelConfig,
            "cache": CacheConfig,
            "scheduler": SchedulerConfig,
            "limits": LimitsConfig,
            "lora": LoRAConfig,
        }
        for key, value in kwargs.items():
            owner = next(
                (name for name, c in sections.items() if key in c.__dataclass_fields__), None
            )
            if owner is None:
                raise TypeError(f"unknown engine option {key!r}")
            if key == "speculative" and isinstance(value, str | dict):
                value = SpeculativeConfig.parse(value)
            if key == "kv_cache_memory" and isinstance(value, str):  # None stays automatic
                value = parse_size(value)
            parts.setdefault(owner, {})[key] = value
        return cls(**{name: sections[name](**parts.get(name, {})) for name in sections})
