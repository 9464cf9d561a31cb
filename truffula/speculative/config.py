"""``--speculative-config``: vLLM's JSON shape, checked once at start-up."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None
    """The draft model (``draft_model``): a folder or hub id with the target's tokenizer."""

    @classmethod
    def parse(cls, text: str | dict[str, Any]) -> SpeculativeConfig:
        """From the flag's JSON (or its parsed dict); ValueError naming the bad key."""
        try:
            data = json.loads(text) if isinstance(text, str) else dict(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--speculative-config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("--speculative-config must be a JSON object")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}
        known |= {"model"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"--speculative-config: unknown key(s) {', '.join(unknown)}")
        method = data.get("method", "ngram" if "model" not in data else "draft_model")
        if method not in METHODS:
            raise ValueError(
                f"--speculative-config: method must be one of {METHODS}, not {method!r}"
            )
        k = data.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                "--speculative-config: num_speculative_tokens must be an integer in "
                f"[1, {MAX_SPECULATIVE_TOKENS}]"
            )
        lo, hi = data.get("prompt_lookup_min", 1), data.get("prompt_lookup_max", 4)
        for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise ValueError(f"--speculative-config: {name} must be an integer in [1, 64]")
        if lo > hi:
            raise ValueError("--speculative-config: prompt_lookup_min exceeds prompt_lookup_max")
        model = data.get("model")
        if method == "draft_model" and not isinstance(model, str):
            raise ValueError('--speculative-config: draft_model needs "model" (a path or hub id)')
        return cls(method, k, lo, hi, model)
