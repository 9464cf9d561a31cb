"""Finding models on disk: the embedded default model, local folders and the offline HF cache."""

from truffula.model_store.resolve import resolve_model

__all__ = ["resolve_model"]
