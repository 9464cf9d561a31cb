"""Models and adapters from the Hugging Face Hub: the local cache first, then a download.

``org/name[@revision]`` is looked up in the HF cache offline; when it is missing or incomplete and
the network is allowed (``HF_HUB_OFFLINE`` unset) only the files truffula reads are downloaded
through ``huggingface_hub.snapshot_download`` (``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured;
the environment is read at call time, not when huggingface_hub was imported).

A download writes each file to ``blobs/<hash>.incomplete`` and renames it when its size and hash
check out (huggingface_hub), so a later run resumes it rather than trusting it. When a download
fails, the snapshot folder of that commit (links to finished blobs only) is removed, and a
snapshot is used only when every file it needs is there (``missing_model_files``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from truffula.errors import ModelLoadError

MODEL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors"]


def split_revision(spec: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@``: revision None (the main branch)."""
    repo, sep, rev = spec.partition("@")
    return repo, (rev or None) if sep else None


def looks_like_repo_id(spec: str) -> bool:
    repo, _ = split_revision(spec)
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str:
    """``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


def missing_model_files(folder: Path) -> str | None:
    """What a model snapshot lacks (None: complete): config, tokenizer, weights and every shard
    its safetensors index names."""
    if not (folder / "config.json").is_file():
        return "config.json"
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return "tokenizer.json"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return "a readable model.safetensors.index.json"
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                return shard
    elif not any(p.is_file() for p in folder.glob("*.safetensors")):
        return "*.safetensors"
    return None


def missing_adapter_files(folder: Path) -> str | None:
    for name in ADAPTER_PATTERNS:
        if not (folder / name).is_file():
            return name
    return None


def hub_snapshot(
    spec: str,
    patterns: list[str],
    missing: Callable[[Path], str | None],
    what: str = "model",
    progress: bool = True,
) -> Path:
    """The local folder of hub repo ``spec`` (``org/name[@rev]``), downloaded when needed."""
    from huggingface_hub import snapshot_download

    repo, revision = split_revision(spec)
    cache = hub_cache_dir()
    lacks: str | None = "everything"
    try:
        folder = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=patterns,
            )
        )
        lacks = missing(folder)
        if lacks is None:
            return folder
    except Exception:  # not cached: huggingface_hub raises several types
        pass
    if offline():
        raise ModelLoadError(
            f"{what} {spec!r} is not in the local Hugging Face cache ({cache}), or not complete "
            f"there (missing: {lacks}), and HF_HUB_OFFLINE is set; unset it to download, or "
            "pass a local folder"
        )
    try:
        folder = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                allow_patterns=patterns,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
                token=os.environ.get("HF_TOKEN") or None,
                tqdm_class=None if progress else _silent_tqdm(),
            )
        )
    except Exception as exc:
        _drop_snapshots(cache, repo, revision)
        raise ModelLoadError(
            f"could not download {what} {spec!r} from the Hugging Face Hub "
            f"({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}): {type(exc).__name__}: "
            f"{str(exc)[:400]}"
        ) from exc
    lacks = missing(folder)
    if lacks is not None:
        raise ModelLoadError(
            f"{what} {spec!r} on the Hugging Face Hub has no {lacks} (a {what} needs "
            f"{', '.join(patterns[:3])}, ...)"
        )
    return folder


def _drop_snapshots(cache: str, repo: str, revision: str | None) -> None:
    """Remove the snapshot (file links) a failed download may have left; finished blobs stay,
    ``.incomplete`` ones are resumed by the next download."""
    base = Path(cache) / ("models--" + repo.replace("/", "--"))
    ref = base / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    if commit and (base / "snapshots" / commit).is_dir():
        shutil.rmtree(base / "snapshots" / commit, ignore_errors=True)


def _silent_tqdm() -> type:
    """A tqdm class that draws nothing (``progress=False``) but still iterates."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
