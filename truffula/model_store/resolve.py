"""Turn a ``--model`` argument into a local folder holding config.json, tokenizer and safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from truffula.errors import ModelLoadError
from truffula.model_store.default_model import DEFAULT_MODEL_ALIASES, ensure_default_model
from truffula.model_store.gguf_convert import ensure_gguf_model, find_gguf
from truffula.model_store.hub import (
    MODEL_PATTERNS,
    hub_snapshot,
    looks_like_repo_id,
    missing_model_files,
)


def resolve_model(model: str, progress: bool = True, need_weights: bool = True) -> Path:
    """Return the folder of ``model``: the default model, a local folder, or a hub id (the cache
    first, then a download)."""
    if model in DEFAULT_MODEL_ALIASES:
        return ensure_default_model(progress=progress)
    path = Path(model).expanduser()
    if path.exists():
        gguf = find_gguf(path)
        if gguf is not None:
            return ensure_gguf_model(gguf, progress=progress)
        if not path.is_dir():
            raise ModelLoadError(
                f"model path {model!r} is a file; pass the folder holding config.json, or a .gguf"
            )
        check_model_dir(path, need_weights)
        return path
    if looks_like_repo_id(model):
        folder = hub_snapshot(model, MODEL_PATTERNS, missing_model_files, progress=progress)
        check_model_dir(folder)
        return folder
    raise ModelLoadError(
        f"model {model!r} not found: it is neither a local folder, a .gguf file nor a hub id "
        "(org/name[@revision])"
    )


def check_model_dir(folder: Path, need_weights: bool = True) -> None:
    """Raise ModelLoadError naming the first missing or unreadable file of a model folder."""
    read_config(folder)
    if need_weights and not list(folder.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors weights in {folder} (only safetensors are loaded)")
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise ModelLoadError(f"no tokenizer (tokenizer.json / tokenizer_config.json) in {folder}")


def read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"no config.json in {folder}")
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"config.json in {folder} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"config.json in {folder} is not a JSON object")
    return data
