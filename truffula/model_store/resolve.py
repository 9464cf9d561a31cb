"""Turn a ``--model`` argument into a local folder holding config.json, tokenizer and safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from truffula.errors import ModelLoadError
from truffula.model_store.default_model import DEFAULT_MODEL_ALIASES, ensure_default_model


def resolve_model(model: str, progress: bool = True, need_weights: bool = True) -> Path:
    """Return the folder of ``model``: the default model, a local folder, or a cached hub id."""
    if model in DEFAULT_MODEL_ALIASES:
        return ensure_default_model(progress=progress)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model path {model!r} is a file; pass the folder holding config.json"
            )
        check_model_dir(path, need_weights)
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        folder = _from_hf_cache(model)
        check_model_dir(folder)
        return folder
    raise ModelLoadError(
        f"model {model!r} not found: it is neither a local folder nor a hub id (org/name) "
        "in the local Hugging Face cache"
    )


def _from_hf_cache(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache and truffula never "
            f"downloads at run time; fetch it first (hf download {repo_id}) or pass a local folder"
        ) from exc


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
