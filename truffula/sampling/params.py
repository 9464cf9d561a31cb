"""Per-request sampling and token-probability options of the engine API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from truffula.config import LimitsConfig
from truffula.errors import RequestValidationError

LogprobsMode = Literal["processed", "raw"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and what to report about them.

    ``temperature == 0`` means greedy decoding. Filters that are off: ``top_k == 0``,
    ``top_p == 1``, ``typical_p == 1``, ``min_p == 0``.
    """

    max_new_tokens: int | None = None
    """None: up to the server default, within the model's maximum length."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: int | None = None
    """Keep only the last ``truncate`` prompt tokens."""
    skip_special_tokens: bool = True
    # Token probabilities ------------------------------------------------------------------
    details: bool = False
    """Report id, text, logprob and special flag of every generated token."""
    return_k_alternatives: int = 0
    """Report the k most likely tokens at every generated position (implies ``details``)."""
    logprobs_mode: LogprobsMode = "processed"
    """``processed``: the distribution sampled from; ``raw``: the model's own softmax."""
    decoder_input_details: bool = False
    """Report every prompt token with its logprob (the first position has none)."""
    prompt_k_alternatives: int = 0
    """Report the k most likely tokens at every prompt position (implies decoder_input_details)."""
    adapter_id: str | None = None
    """LoRA adapter serving the request (None: the base model)."""
    extra_stop_token_ids: tuple[int, ...] = field(default=())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.details or self.return_k_alternatives > 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.decoder_input_details or self.prompt_k_alternatives > 0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    @property
    def needs_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0 or self.min_p > 0.0

    def with_updates(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)  # type: ignore[arg-type]

    def validate(self, limits: LimitsConfig) -> None:
        """Raise RequestValidationError naming the first field outside its range."""
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, lo=1)
        _check_real("temperature", self.temperature, "must be >= 0", lambda v: v >= 0)
        _check_int("top_k", self.top_k, lo=0, hint=" (0 turns it off)")
        _check_real("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_real("typical_p", self.typical_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_real("min_p", self.min_p, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        _check_real("repetition_penalty", self.repetition_penalty, "must be > 0", lambda v: v > 0)
        for name in ("frequency_penalty", "presence_penalty"):
            _check_real(name, getattr(self, name), "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**64 - 1)
        if len(self.stop) > limits.max_stop_sequences:
            raise RequestValidationError(
                "stop",
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                f"Given: {len(self.stop)}",
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestValidationError("stop", "`stop` sequences must be non-empty strings")
        if self.truncate is not None:
            _check_int("truncate", self.truncate, lo=1)
        for name in ("return_k_alternatives", "prompt_k_alternatives"):
            k = getattr(self, name)
            _check_int(name, k, lo=0)
            if k > limits.max_k_alternatives:
                raise RequestValidationError(
                    name,
                    f"`{name}` must be <= {limits.max_k_alternatives} (the server's "
                    f"max_k_alternatives). Given: {k}",
                )
        if self.logprobs_mode not in ("processed", "raw"):
            raise RequestValidationError(
                "logprobs_mode",
                f"`logprobs_mode` must be 'processed' or 'raw'. Given: {self.logprobs_mode!r}",
            )


def _check_int(name: str, value: object, lo: int, hi: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestValidationError(name, f"`{name}` must be an integer. Given: {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestValidationError(name, f"`{name}` must be {bound}{hint}. Given: {value}")


def _check_real(name: str, value: object, rule: str, ok: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestValidationError(name, f"`{name}` must be a number. Given: {value!r}")
    if not math.isfinite(value) or not ok(value):  # type: ignore[operator]
        raise RequestValidationError(name, f"`{name}` {rule}. Given: {value}")
