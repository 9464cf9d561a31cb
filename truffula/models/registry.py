"""HF ``architectures`` string -> native model class, and model construction from a folder."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from truffula.errors import ModelLoadError
from truffula.kernels.select import select_kernels
from truffula.layers.bind import bind_kernels
from truffula.layers.parallel_linear import Group
from truffula.models.common import CausalLM
from truffula.models.sharding import check_shardable

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
    serving_path: str = "native"
    """``native`` (truffula's implementation) or ``fallback`` (transformers, request-level)."""


def load_model(
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_len: int | None,
    weights: Mapping[str, torch.Tensor] | None = None,
    shard: Group | None = None,
    random_weights: bool = False,
) -> LoadedModel:
    """Build the model of ``folder`` (config.json); weights from its safetensors or ``weights``;
    a native model computes through the kernels of ``device`` and ``dtype``. ``shard``: this
    rank's part of a tensor-parallel model (``truffula.models.sharding``). ``random_weights``:
    random weights of the folder's shape (``--load-format dummy``; native models only)."""
    from transformers import AutoConfig

    from truffula.model_store.resolve import read_config

    raw = read_config(folder)
    archs = raw.get("architectures") or []
    if not archs:
        raise ModelLoadError(f"config.json in {folder} names no architectures")
    arch = archs[0]
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises several types for bad configs
        raise ModelLoadError(
            f"config.json in {folder} cannot be read by transformers: {exc}"
        ) from exc
    context = int(getattr(config, "max_position_embeddings", 2048))
    limit = min(max_len, context) if max_len else context
    if shard is not None:
        check_shardable(arch, config, shard.world)
    if arch not in _NATIVE:
        if random_weights:
            raise ModelLoadError(
                f"--load-format dummy: {arch} is not a native architecture (native: "
                f"{', '.join(native_architectures())})"
            )
        import transformers

        if getattr(transformers, arch, None) is None:
            raise ModelLoadError(
                f"architecture {arch!r} is neither native (native: {', '.join(native_architectures())}) "
                "nor a causal LM this transformers version can load"
            )
        from truffula.models.hf_fallback import HFFallbackLM

        fallback = HFFallbackLM.load(folder, config, dtype, device)
        return LoadedModel(fallback, config, arch, folder, limit, "fallback")  # type: ignore[arg-type]
    from truffula.models.loader import build_and_load

    cls = model_class(arch)
    model = build_and_load(
        cls, config, folder, dtype, device, limit, weights, shard, random_weights
    )
    bind_kernels(model, select_kernels(device, dtype))
    return LoadedModel(model, config, arch, folder, limit)
