"""The fallback for every causal LM transformers can load without remote code.

The model runs through transformers itself, one sequence at a time (batched at the request
level), each sequence with its own transformers KV cache; the step's logits rows come back in
the flattened token order the runner expects, so the scheduler, sampler, token probabilities
(details, alternatives, rank, entropy, prompt logprobs) and every HTTP route work unchanged.
What it lacks against a native model: batched forward passes, the paged KV cache (cache memory
is not budgeted), LoRA adapters and CUDA graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from truffula.errors import ModelLoadError
from truffula.forward import get_forward_context

LIMITATIONS = "request-level batching, no paged KV cache, no LoRA adapters, no CUDA graphs"


class HFFallbackLM(nn.Module):
    """Wraps an ``AutoModelForCausalLM``; ``forward`` returns fp32 logits [T, vocab]."""

    is_fallback = True
    packed_modules: dict[str, tuple[str, str]] = {}  # noqa: RUF012 (never mutated)

    def __init__(self, hf: nn.Module, config: Any) -> None:
        super().__init__()
        self.hf = hf
        self.config = config
        self._caches: dict[str, Any] = {}
        import inspect

        params = inspect.signature(hf.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def load(
        cls, folder: Path, config: Any, dtype: torch.dtype, device: torch.device
    ) -> HFFallbackLM:
        from transformers import AutoModelForCausalLM

        try:
            hf = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:
            raise ModelLoadError(f"transformers cannot load the model in {folder}: {exc}") from exc
        # transformers types ``to`` through a decorator whose stub wants the model as argument 1
        return cls(hf.to(device).eval(), config)  # type: ignore[arg-type]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        meta = get_forward_context().attn
        starts = meta.query_start_loc_cpu
        rows = []
        for i, rid in enumerate(meta.request_ids):
            tokens = input_ids[starts[i] : starts[i + 1]]
            start = int(positions[starts[i]])
            if start == 0 or rid not in self._caches:  # new, or recomputed after preemption
                self._caches[rid] = DynamicCache()
            cache = self._caches[rid]
            out = self.hf(input_ids=tokens.unsqueeze(0), use_cache=True, **{self._cache_arg: cache})
            rows.append(out.logits[0].float())
        return torch.cat(rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # forward already produced the logits

    def release(self, request_id: str) -> None:
        self._caches.pop(request_id, None)

    def linear_modules(self) -> list[nn.Module]:
        return []

    def tie_weights(self) -> None:
        pass
