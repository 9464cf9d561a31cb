"""Reading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors or .bin).

An adapter becomes a ``LoRAWeights``: for each target Linear of the model (by its name in
truffula, e.g. ``model.layers.3.self_attn.qkv_proj``) and each output shard (``q``/``k``/``v``
of a fused projection, or ``None`` for the whole output), ``A [r, in]`` and ``B [out, r]`` with
the scaling (alpha / r, or alpha / sqrt(r) with rslora) already folded into ``B``. Anything the
engine cannot serve (DoRA, LoRA on embeddings or the head, trained biases, other PEFT types,
shapes that do not fit the base model) is an AdapterError naming the reason, and so is anything
that would serve numbers that mean nothing: a config whose ``r`` is not a positive integer or
whose ``lora_alpha`` is not a finite positive number, tensors holding NaN or inf, rank-0 or
non-matrix tensors. Every file read must resolve inside the adapter root (a symlink to a file
elsewhere is refused).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from truffula.errors import AdapterError
from truffula.layers.linear import Linear, MergedLinear

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


MAX_CONFIG_BYTES = 1 << 20
"""adapter_config.json larger than this is refused (PEFT writes a few hundred bytes)."""


def adapter_file(folder: Path, name: str, root: Path | None = None) -> Path | None:
    """``folder / name`` resolved, or None when absent. Refused (403) when it resolves outside
    ``root`` (default: the folder itself), e.g. a symlink to a file elsewhere; 422 when it is not
    a regular file."""
    path = folder / name
    try:
        if not path.exists() and not path.is_symlink():
            return None
        real = path.resolve()
        inside = (root or folder).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise AdapterError(
            f"{name} of adapter {folder.name!r} cannot be opened: {exc}", 422
        ) from exc
    if real != inside and inside not in real.parents:
        raise AdapterError(
            f"{name} of adapter {folder.name!r} resolves outside the adapter root; refused", 403
        )
    if not real.is_file():
        raise AdapterError(f"{name} of adapter {folder.name!r} is not a regular file", 422)
    return real


def read_config(folder: Path, root: Path | None = None) -> dict[str, Any]:
    path = adapter_file(folder, "adapter_config.json", root)
    if path is None:
        raise AdapterError(f"no adapter_config.json in adapter folder {folder.name!r}", 404)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(
                f"adapter_config.json of {folder.name!r} is larger than {MAX_CONFIG_BYTES} bytes",
                422,
            )
        cfg = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ints
        raise AdapterError(
            f"adapter_config.json of {folder.name!r} is not valid JSON: {exc}", 422
        ) from exc
    except OSError as exc:
        raise AdapterError(
            f"adapter_config.json of {folder.name!r} cannot be read: {exc}", 422
        ) from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json of {folder.name!r} is not a JSON object", 422)
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"adapter type {kind[:60]} is not supported (only LoRA)", 422)
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported", 422)
    if cfg.get("bias", "none") not in ("none", None):
        raise AdapterError(
            f"adapters with trained biases (bias={cfg['bias']!r:.60}) are not supported", 422
        )
    if cfg.get("modules_to_save"):
        raise AdapterError(
            "adapters with modules_to_save (fully trained modules) are not supported", 422
        )
    _check_config(cfg, folder.name)
    return cfg


def _check_config(cfg: dict[str, Any], name: str) -> None:
    """``r`` a positive integer, ``lora_alpha`` a finite positive number, their patterns maps of
    the same, ``use_rslora`` a boolean: anything else is a 422 naming the field."""

    def bad(what: str, rule: str, value: object) -> AdapterError:
        return AdapterError(
            f"adapter_config.json of {name!r}: `{what}` must be {rule}. Given: {value!r:.60}", 422
        )

    def rank(what: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(what, "a positive integer", value)

    def alpha(what: str, value: object) -> None:
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        try:
            ok = ok and math.isfinite(value) and value > 0  # type: ignore[arg-type,operator]
        except OverflowError:
            ok = False
        if not ok:
            raise bad(what, "a finite positive number", value)

    rank("r", cfg.get("r", 8))
    alpha("lora_alpha", cfg.get("lora_alpha", cfg.get("r", 8)))
    for what, check in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = cfg.get(what)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(what, "an object", pattern)
        for key, value in pattern.items():
            check(f"{what}.{key}", value)
    if not isinstance(cfg.get("use_rslora", False), bool | None):
        raise bad("use_rslora", "a boolean", cfg["use_rslora"])


def read_tensors(folder: Path, root: Path | None = None) -> dict[str, torch.Tensor]:
    st = adapter_file(folder, "adapter_model.safetensors", root)
    pt = None if st is not None else adapter_file(folder, "adapter_model.bin", root)
    try:
        if st is not None:
            from safetensors.torch import load_file

            data = load_file(str(st))
        elif pt is not None:
            data = torch.load(str(pt), map_location="cpu", weights_only=True)
        else:
            data = None
        if data is not None and not (
            isinstance(data, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
        ):
            raise ValueError("not a state dict (names -> tensors)")
    except Exception as exc:
        raise AdapterError(
            f"adapter weights of {folder.name!r} cannot be read: {exc}", 422
        ) from exc
    if data is None:
        raise AdapterError(
            f"no adapter_model.safetensors or adapter_model.bin in {folder.name!r}", 404
        )
    return data


def load_peft(
    adapter_id: str,
    folder: Path,
    targets: dict[str, Linear],
    packed: dict[str, tuple[str, str]],
    root: Path | None = None,
) -> LoRAWeights:
    """Read an adapter folder and map its tensors onto the model's Linear modules.

    ``root``: every file read must resolve inside it (default: the folder). Refused with an
    AdapterError: tensors that are not 2-D floating-point matrices, hold NaN or inf, have a
    rank of 0 or other than the config's, or do not fit the base model."""
    cfg = read_config(folder, root)
    tensors = read_tensors(folder, root)
    weights_file = (
        "adapter_model.safetensors"
        if (folder / "adapter_model.safetensors").exists()
        else "adapter_model.bin"
    )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise AdapterError(
                    f"unsupported adapter tensor {key!r} (LoRA on embeddings / DoRA)", 422
                )
            raise AdapterError(f"unexpected tensor {key!r} in adapter {adapter_id!r}", 422)
        if not value.is_floating_point() or value.dim() != 2:
            raise AdapterError(
                f"adapter {adapter_id!r}: tensor {key!r} must be a 2-D floating-point matrix, "
                f"is {str(value.dtype).removeprefix('torch.')} of shape {list(value.shape)}",
                422,
            )
        value = value.detach().float()
        if not bool(value.isfinite().all()):
            raise AdapterError(
                f"adapter {adapter_id!r}: tensor {key!r} in {weights_file} holds NaN or "
                "infinite values",
                422,
            )
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = value
    if not pairs:
        raise AdapterError(f"adapter {adapter_id!r} has no LoRA tensors", 422)
    base_r, alpha = cfg.get("r", 8), float(cfg.get("lora_alpha", cfg.get("r", 8)))
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
                f"adapter {adapter_id!r}: {module} has rank {r} (lora_A {list(a.shape)}, lora_B "
                f"{list(b.shape)}), config says {expected_r}",
                422,
            )
        lin = targets[target]
        # a shard names a projection of a fused layer (``_target``): a MergedLinear
        out_features, in_features = (
            cast(MergedLinear, lin).shard_offsets[shard][1]
            if shard is not None
            else lin.out_features,
            lin.in_features,
        )
        logical = getattr(lin, "logical_shape", None)  # a tensor-parallel layer's whole shape
        if logical is not None:
            out_features, in_features = logical(shard)
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(
                f"adapter {adapter_id!r} does not fit the base model: {module} expects "
                f"[{out_features} x {in_features}], adapter gives [{b.shape[0]} x {a.shape[1]}]",
                422,
            )
        a_alpha = float(_pattern(module, alpha_pattern, alpha))
        scale = a_alpha / math.sqrt(r) if cfg.get("use_rslora") else a_alpha / r
        scaled = b * scale
        if not bool(scaled.isfinite().all()):
            raise AdapterError(
                f"adapter {adapter_id!r}: lora_B of {module} scaled by lora_alpha / r "
                f"({a_alpha:g} / {r}) is not finite in float32",
                422,
            )
        out.modules.setdefault(target, {})[shard] = (a.contiguous(), scaled.contiguous())
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
