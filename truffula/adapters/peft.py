"""Reading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors or .bin).

An adapter becomes a ``LoRAWeights``: for each target Linear of the model (by its name in
truffula, e.g. ``model.layers.3.self_attn.qkv_proj``) and each output shard (``q``/``k``/``v``
of a fused projection, or ``None`` for the whole output), ``A [r, in]`` and ``B [out, r]`` with
the scaling (alpha / r, or alpha / sqrt(r) with rslora) already folded into ``B``. Anything the
engine cannot serve (DoRA, LoRA on embeddings or the head, trained biases, other PEFT types,
shapes that do not fit the base model) is an AdapterError naming the reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from truffula.errors import AdapterError
from truffula.layers.linear import Linear

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$"
)


@dataclass
class LoRAWeights:
    adapter_id: str
    rank: int
    modules: dict[str, dict[str | None, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )
    """target module -> shard -> (A [r, in], B [out, r] scaled)."""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for m in self.modules.values()
            for a, b in m.values()
        )


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"no adapter_config.json in adapter folder {folder.name!r}", 404)
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(
            f"adapter_config.json of {folder.name!r} is not valid JSON: {exc}", 422
        ) from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json of {folder.name!r} is not a JSON object", 422)
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"adapter type {kind} is not supported (only LoRA)", 422)
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported", 422)
    if cfg.get("bias", "none") not in ("none", None):
        raise AdapterError(
            f"adapters with trained biases (bias={cfg['bias']!r}) are not supported", 422
        )
    if cfg.get("modules_to_save"):
        raise AdapterError(
            "adapters with modules_to_save (fully trained modules) are not supported", 422
        )
    return cfg


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            data = torch.load(str(pt), map_location="cpu", weights_only=True)
            if not isinstance(data, dict):
                raise ValueError("not a state dict")
            return data
    except Exception as exc:
        raise AdapterError(
            f"adapter weights of {folder.name!r} cannot be read: {exc}", 422
        ) from exc
    raise AdapterError(f"no adapter_model.safetensors or adapter_model.bin in {folder.name!r}", 404)


def load_peft(
    adapter_id: str, folder: Path, targets: dict[str, Linear], packed: dict[str, tuple[str, str]]
) -> LoRAWeights:
    """Read an adapter folder and map its tensors onto the model's Linear modules."""
    cfg = read_config(folder)
    tensors = read_tensors(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise AdapterError(
                    f"unsupported adapter tensor {key!r} (LoRA on embeddings / DoRA)", 422
                )
            raise AdapterError(f"unexpected tensor {key!r} in adapter {adapter_id!r}", 422)
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = value.detach().float()
    if not pairs:
        raise AdapterError(f"adapter {adapter_id!r} has no LoRA tensors", 422)
    base_r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", cfg.get("r", 8)))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = LoRAWeights(adapter_id, 0, config=cfg)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(
                f"adapter {adapter_id!r}: module {module} lacks lora_{'B' if 'A' in ab else 'A'}",
                422,
            )
        target, shard = _target(module, targets, packed, adapter_id)
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        expected_r = _pattern(module, rank_pattern, base_r)
        if r != expected_r or b.shape[1] != r:
            raise AdapterError(
                f"adapter {adapter_id!r}: {module} has rank {r}, config says {expected_r}", 422
            )
        lin = targets[target]
        out_features = lin.shard_offsets[shard][1] if shard is not None else lin.out_features  # type: ignore[attr-defined]
        if a.shape[1] != lin.in_features or b.shape[0] != out_features:
            raise AdapterError(
                f"adapter {adapter_id!r} does not fit the base model: {module} expects "
                f"[{out_features} x {lin.in_features}], adapter gives [{b.shape[0]} x {a.shape[1]}]",
                422,
            )
        a_alpha = float(_pattern(module, alpha_pattern, alpha))
        scale = a_alpha / math.sqrt(r) if cfg.get("use_rslora") else a_alpha / r
        out.modules.setdefault(target, {})[shard] = (a.contiguous(), (b * scale).contiguous())
        out.rank = max(out.rank, r)
    return out


def _pattern(module: str, pattern: dict[str, Any], default: Any) -> Any:
    for key, value in pattern.items():
        if re.search(rf"(^|\.){re.escape(key)}$", module) or module.endswith(key):
            return value
    return default


def _target(
    module: str, targets: dict[str, Linear], packed: dict[str, tuple[str, str]], adapter_id: str
) -> tuple[str, str | None]:
    """PEFT module path (``model.layers.0.self_attn.q_proj``) -> (truffula Linear, shard)."""
    if module in targets:
        return module, None
    parent, _, leaf = module.rpartition(".")
    if leaf in packed:
        fused, shard = packed[leaf]
        name = f"{parent}.{fused}"
        if name in targets:
            return name, shard
    if leaf in ("embed_tokens", "lm_head", "wte", "embed_out"):
        raise AdapterError(f"adapter {adapter_id!r}: LoRA on {leaf} is not supported", 422)
    raise AdapterError(
        f"adapter {adapter_id!r} targets {module!r}, which the base model does not have", 422
    )
