"""truffula: multi-LoRA LLM serving with token probabilities for every token."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
