"""HF ``architectures`` string -> native model class, and model construction from a folder."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from truffula.errors import ModelLoadError
from truffula.models.common import CausalLM

_NATIVE: dict[str, str] = {
    "LlamaForCausalLM": "truffula.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "truffula.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "truffula.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "truffula.models.qwen3:Qwen3ForCausalLM",
    "Phi3ForCausalLM": "truffula.models.phi3:Phi3ForCausalLM",
    "Gemma2ForCausalLM": "truffula.models.gemma2:Gemma2ForCausalLM",
    "GPT2LMHeadModel": "truffula.models.gpt2:GPT2LMHeadModel",
    "GPTNeoXForCausalLM": "truffula.models.gpt_neox:GPTNeoXForCausalLM",
    "MixtralForCausalLM": "truffula.models.mixtral:MixtralForCausalLM",
}


def native_architectures() -> list[str]:
    return sorted(_NATIVE)


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in _NATIVE:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported (native: {', '.join(native_architectures())})"
        )
    module, name = _NATIVE[architecture].split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class LoadedModel:
    model: CausalLM
    hf_config: Any
    architecture: str
    folder: Path
    max_len: int


def load_model(
    folder: Path, dtype: torch.dtype, device: torch.device, max_len: int | None
) -> LoadedModel:
    from transformers import AutoConfig

    from truffula.model_store.resolve import read_config

    raw = read_config(folder)
    archs = raw.get("architectures") or []
    if not archs:
        raise ModelLoadError(f"config.json in {folder} names no architectures")
    cls = model_class(archs[0])
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises several types for bad configs
        raise ModelLoadError(
            f"config.json in {folder} cannot be read by transformers: {exc}"
        ) from exc
    context = int(getattr(config, "max_position_embeddings", 2048))
    limit = min(max_len, context) if max_len else context
    from truffula.models.loader import build_and_load

    model = build_and_load(cls, config, folder, dtype, device, limit)
    return LoadedModel(model, config, archs[0], folder, limit)
