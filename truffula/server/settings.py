"""``ServerSettings``: what ``truffula serve`` was told, fixed for the life of the server.

Built once, from the command line (``truffula/cli/serve.py``, whose flags take these fields'
defaults), validated on construction; the launcher hands the same object to every API process.
Imports nothing heavy: the CLI reads the defaults when it builds its parser.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from truffula import __version__

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""``--max-request-bytes``: larger bodies are answered 413 before they are read or parsed."""
LOG_FORMATS = ("text", "json")
ADAPTER_SOURCES = ("local", "hub")


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    """The model's name in responses (``x-model-id``, OpenAI ``model``); ``model_id_of``."""
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    """Required as ``Authorization: Bearer KEY`` on every route but /health."""
    preload_adapters: tuple[str, ...] = ()
    default_adapter_source: str | None = None
    """``adapter_source`` of requests that give none (unset: local folder, else the HF cache)."""
    drain_timeout: float = 10.0
    """Seconds running requests get to finish on SIGINT/SIGTERM."""
    log_level: str = "info"
    log_format: str = "text"
    strict_params: bool = False
    """Answer 422 naming an unknown field of a request body (default: ignored, as LoRAX)."""
    otlp_endpoint: str | None = None
    otlp_service_name: str = "truffula"
    api_server_count: int = 1
    """HTTP processes in front of the one engine process, sharing the listening socket."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_best_of: int = 2
    version: str = __version__
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.api_server_count < 1:
            raise ValueError("api_server_count must be at least 1")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be at least 1")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.default_adapter_source not in (None, *ADAPTER_SOURCES):
            raise ValueError(
                "default_adapter_source must be local, hub or unset, "
                f"not {self.default_adapter_source!r}"
            )


def model_id_of(model: str) -> str:
    """The served name of ``--model``: the default model's hub id, else the flag as given."""
    from truffula.model_store.default_model import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME

    return f"HuggingFaceTB/{DEFAULT_MODEL_NAME}" if model in DEFAULT_MODEL_ALIASES else model
