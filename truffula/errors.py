"""Typed errors shared by the engine, the CLI and the HTTP server."""

from __future__ import annotations


class TruffulaError(Exception):
    """Base class of every error truffula raises on purpose."""


class ModelLoadError(TruffulaError):
    """A model could not be found, read or built. The message names what is missing."""


class RequestValidationError(ValueError, TruffulaError):
    """A request parameter is out of range. ``field`` names the parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class EngineOverloadedError(TruffulaError):
    """The engine already holds its maximum number of requests."""


class AdapterError(TruffulaError):
    """A LoRA adapter could not be found, parsed or applied to the base model."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class GenerationError(TruffulaError):
    """A request failed while it was being generated."""


class EngineDeadError(TruffulaError):
    """The engine process stopped (or the server is shutting down): requests cannot be served."""


class TensorParallelError(TruffulaError):
    """A tensor-parallel rank died, timed out or fell out of step with the others: the engine
    cannot go on (``fatal``: the step isolation raises it, and the engine process exits)."""

    fatal = True
