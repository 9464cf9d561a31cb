"""The one weight loader: build a model on the meta device, allocate it, stream safetensors in.

A module may define ``weight_loader(param, tensor, shard)`` for its parameters; fused projections
use it to place a checkpoint tensor in its row range. A checkpoint tensor that holds several
parameters (Mixtral's stacked experts) is cut into pieces by the model's
``split_checkpoint_tensor``. Missing or unexpected tensors are errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from truffula.errors import ModelLoadError
from truffula.layers.linear import Linear
from truffula.layers.parallel_linear import Group
from truffula.model_store.prequantized import DequantizingSource, Int4Grid
from truffula.models.common import CausalLM
from truffula.models.sharding import shard_model


def build_and_load(
    cls: type[CausalLM],
    config: Any,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_len: int,
    weights: Mapping[str, torch.Tensor] | None = None,
    shard: Group | None = None,
    random_weights: bool = False,
) -> CausalLM:
    """``shard``: this rank's tensor-parallel group; the model is sharded on the meta device
    (``truffula.models.sharding``) and each parallel layer loads its slice of every tensor.
    ``random_weights``: ``fill_random`` instead of reading any weights (``--load-format dummy``)."""
    with torch.device("meta"):
        model = cls(config, max_len)
        if shard is not None:
            shard_model(model, shard)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    if random_weights:
        fill_random(model)
    else:
        load_weights(model, folder, weights, quantization_config(config), shard is None)
    model.eval()
    return model


@torch.no_grad()
def fill_random(model: CausalLM, seed: int = 0) -> None:
    """Every parameter drawn at random in place: norm weights 1, biases 0, the rest normal with
    standard deviation 0.02 (transformers' ``initializer_range``). For measuring a shape's
    speed and memory; a tensor-parallel rank fills only its shard."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("bias"):
            p.zero_()
        elif "norm" in name.rsplit(".", 2)[-2]:
            p.fill_(1.0)
        else:
            gen = torch.Generator(device=p.device).manual_seed(seed + i)
            p.normal_(0.0, 0.02, generator=gen)


class _StateSource:
    """A name -> tensor mapping read like a safetensors file (``keys`` / ``get_tensor``)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


def quantization_config(config: Any) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` as a dict (transformers may keep an object)."""
    q = getattr(config, "quantization_config", None)
    if q is None or isinstance(q, dict):
        return q
    return q.to_dict() if hasattr(q, "to_dict") else dict(vars(q))


def load_weights(
    model: CausalLM,
    folder: Path,
    weights: Mapping[str, torch.Tensor] | None = None,
    qconfig: Mapping[str, Any] | None = None,
    keep_grids: bool = True,
) -> None:
    """Load from the folder's safetensors files, or from ``weights`` (a HF-named state dict);
    a pre-quantized checkpoint (``qconfig``) is read dequantized (``model_store.prequantized``),
    its 4-bit grids kept on the linears unless ``keep_grids`` is False (a tensor-parallel
    shard, whose slices the grids do not follow)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    if weights is not None:
        source = _StateSource(weights)
        for name in weights:
            _load_one(model, params, name, source, loaded)
        _check_complete(params, loaded, folder)
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    if qconfig:
        _load_prequantized(model, params, files, qconfig, folder, loaded, keep_grids)
        return
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    _load_one(model, params, name, f, loaded)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{file.name} in {folder} is corrupt or unreadable: {exc}"
            ) from exc
    _check_complete(params, loaded, folder)


def _load_prequantized(
    model: CausalLM,
    params: dict[str, torch.nn.Parameter],
    files: list[Path],
    qconfig: Mapping[str, Any],
    folder: Path,
    loaded: set[str],
    keep_grids: bool,
) -> None:
    with contextlib.ExitStack() as stack:
        try:
            handles = [
                stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files
            ]
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{folder}: a weights file is corrupt or unreadable: {exc}"
            ) from exc
        source = DequantizingSource(handles, qconfig, str(folder))
        for name in source.names:
            _load_one(model, params, name, source, loaded)
    _check_complete(params, loaded, folder)
    if keep_grids:
        _attach_grids(model, source.grids)


def _attach_grids(model: CausalLM, grids: Mapping[str, Int4Grid]) -> None:
    """Give each linear the 4-bit grids of the checkpoint projections it holds (by shard), for
    ``--quantization int4`` to keep the checkpoint's integers (``Linear.quantize``)."""
    for module, grid in grids.items():
        mapped = model.checkpoint_name(module + ".weight")
        if mapped is None:
            continue
        target, shard = mapped
        owner = model.get_submodule(target.removesuffix(".weight"))
        if isinstance(owner, Linear):
            owner.int4_grids[shard] = grid


def _check_complete(params: dict[str, torch.nn.Parameter], loaded: set[str], folder: Path) -> None:
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"weights missing from {folder}: {', '.join(missing[:5])}{more}")


def _load_one(
    model: CausalLM, params: dict[str, torch.nn.Parameter], name: str, f: Any, loaded: set[str]
) -> None:
    mapped = model.checkpoint_name(name)
    if mapped is None:
        return
    target, _ = mapped
    if target not in params:
        if target == "lm_head.weight" and "lm_head.weight" not in params:
            return  # tied embeddings: the checkpoint may store the copy anyway
        pieces = model.split_checkpoint_tensor(name, f.get_tensor(name))
        if pieces is None:
            raise ModelLoadError(
                f"checkpoint tensor {name!r} has no place in {type(model).__name__}"
            )
        for piece_name, piece in pieces:
            _load_tensor(model, params, piece_name, piece, loaded)
        return
    _load_tensor(model, params, name, _read(model, f, name, target, mapped[1]), loaded)


def _read(model: CausalLM, f: Any, name: str, target: str, shard: str | None) -> torch.Tensor:
    """The checkpoint tensor, or only the part of it a tensor-parallel layer holds (its
    ``checkpoint_part``) where the file can be read in slices (safetensors)."""
    owner_name, _, leaf = target.rpartition(".")
    part = getattr(model.get_submodule(owner_name), "checkpoint_part", None) if owner_name else None
    spec = part(leaf, shard) if part is not None else None
    if spec is None or not hasattr(f, "get_slice"):
        return f.get_tensor(name)
    dim, start, n = spec
    index = (slice(None),) * dim + (slice(start, start + n),)
    return f.get_slice(name)[index]


def _load_tensor(
    model: CausalLM,
    params: dict[str, torch.nn.Parameter],
    name: str,
    tensor: torch.Tensor,
    loaded: set[str],
) -> None:
    """Copy one checkpoint tensor into its parameter, through the owner's ``weight_loader``."""
    mapped = model.checkpoint_name(name)
    if mapped is None:
        return
    target, shard = mapped
    if target not in params:
        raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
    param = params[target]
    tensor = tensor.to(param.dtype)
    owner = model.get_submodule(target.rsplit(".", 1)[0]) if "." in target else model
    loader = getattr(owner, "weight_loader", None)
    try:
        if loader is None:
            if tensor.shape != param.shape:
                raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            loader(param, tensor, shard)
    except ValueError as exc:
        raise ModelLoadError(f"checkpoint tensor {name!r}: {exc}") from exc
    loaded.add(target)
