"""Per-request sampling and token-probability options of the engine API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from truffula.config import LimitsConfig
from truffula.errors import RequestValidationError
from truffula.structured.spec import StructuredOutput

LogprobsMode = Literal["processed", "raw"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and what to report about them.

    ``temperature == 0`` means greedy decoding; a positive temperature below
    ``MIN_TEMPERATURE`` is raised to it on construction (dividing logits by 1e-300 makes them
    inf and the distribution NaN; at 0.01 the distribution is already all but one-hot).
    Filters that are off: ``top_k == 0``, ``top_p == 1``, ``typical_p == 1``, ``min_p == 0``.
    ``validate`` checks every field's type and range (see ``docs/api.md``) before the engine
    turns them into tensors.
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
    speculative: bool = True
    """Let the engine verify drafted tokens for this request when it speculates
    (``--speculative-config``); outputs and records are the same either way."""
    structured: StructuredOutput | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar (``truffula.structured``):
    tokens the constraint forbids are masked before the filters; ``processed`` logprobs are
    renormalised over the allowed tokens, ``raw`` ones are the model's own."""

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, int | float) and not isinstance(t, bool) and 0 < t < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)

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
    def constrained(self) -> bool:
        return self.structured is not None

    @property
    def needs_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0 or self.min_p > 0.0

    def with_updates(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)  # type: ignore[arg-type]

    def validate(self, limits: LimitsConfig) -> None:
        """Raise RequestValidationError naming the first field of the wrong type or out of range.

        Integers must be ``int`` (not ``bool``), reals ``int`` or ``float`` (not ``bool``) and
        finite; booleans must be ``bool``. The bounds keep every value representable in the
        sampler's tensors (int64 / float32) and its arithmetic finite."""
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, lo=1, hi=MAX_TOKENS)
        _check_real(
            "temperature",
            self.temperature,
            f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
            lambda v: v == 0 or MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
        )
        _check_int("top_k", self.top_k, lo=0, hi=limits.max_top_k, hint=" (0 turns it off)")
        _check_real("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_real("typical_p", self.typical_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_real("min_p", self.min_p, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        lo, hi = REPETITION_PENALTY_RANGE
        _check_real(
            "repetition_penalty",
            self.repetition_penalty,
            f"must be in [{lo}, {hi}] (1 turns it off)",
            lambda v: lo <= v <= hi,
        )
        for name in ("frequency_penalty", "presence_penalty"):
            _check_real(name, getattr(self, name), "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=MAX_SEED)
        self._validate_stop(limits)
        for name in ("ignore_eos", "skip_special_tokens", "details", "decoder_input_details"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise RequestValidationError(
                    name, f"`{name}` must be a boolean. Given: {_show(value)}"
                )
        if self.truncate is not None:
            _check_int("truncate", self.truncate, lo=1, hi=MAX_TOKENS)
        for name in ("return_k_alternatives", "prompt_k_alternatives"):
            k = getattr(self, name)
            _check_int(name, k, lo=0)
            if k > limits.max_k_alternatives:
                raise RequestValidationError(
                    name,
                    f"`{name}` must be <= {limits.max_k_alternatives} (the server's "
                    f"max_k_alternatives). Given: {k}",
                )
        if not isinstance(self.logprobs_mode, str) or self.logprobs_mode not in (
            "processed",
            "raw",
        ):
            raise RequestValidationError(
                "logprobs_mode",
                f"`logprobs_mode` must be 'processed' or 'raw'. Given: {_show(self.logprobs_mode)}",
            )
        if self.adapter_id is not None and (
            not isinstance(self.adapter_id, str) or not self.adapter_id
        ):
            raise RequestValidationError(
                "adapter_id",
                f"`adapter_id` must be a non-empty string. Given: {_show(self.adapter_id)}",
            )
        ids = self.extra_stop_token_ids
        if not isinstance(ids, tuple | list) or len(ids) > MAX_EXTRA_STOP_TOKEN_IDS:
            raise RequestValidationError(
                "extra_stop_token_ids",
                f"`extra_stop_token_ids` must be a list of at most {MAX_EXTRA_STOP_TOKEN_IDS} "
                "token ids",
            )
        for t in ids:
            _check_int("extra_stop_token_ids", t, lo=0, hi=MAX_TOKEN_ID)
        if not isinstance(self.speculative, bool):
            raise RequestValidationError(
                "speculative", f"`speculative` must be a boolean. Given: {_show(self.speculative)}"
            )
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise RequestValidationError(
                    "structured", "`structured` must be a StructuredOutput"
                )
            self.structured.validate()

    def _validate_stop(self, limits: LimitsConfig) -> None:
        stop = self.stop
        if not isinstance(stop, tuple | list):
            raise RequestValidationError(
                "stop", f"`stop` must be a list of strings. Given: {type(stop).__name__}"
            )
        if len(stop) > limits.max_stop_sequences:
            raise RequestValidationError(
                "stop",
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                f"Given: {len(stop)}",
            )
        for s in stop:
            if not isinstance(s, str) or not s:
                raise RequestValidationError("stop", "`stop` sequences must be non-empty strings")
            if len(s) > limits.max_stop_length:
                raise RequestValidationError(
                    "stop",
                    f"`stop` sequences must be at most {limits.max_stop_length} characters. "
                    f"Given: {len(s)}",
                )
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestValidationError(
                    "stop", "`stop` sequences must be valid Unicode (no lone surrogates)"
                ) from None


MIN_TEMPERATURE = 0.01
"""Positive temperatures below this are raised to it (as vLLM does)."""
MAX_TEMPERATURE = 100.0
"""Above this the distribution is uniform to float32 precision anyway."""
REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""Dividing a logit by 1e-45 (a float32 denormal) makes it inf, and the distribution NaN."""
MAX_TOKENS = 2**31 - 1
"""Bound of ``max_new_tokens`` and ``truncate`` (the model's length is checked later)."""
MAX_SEED = 2**64 - 1
"""``torch.Generator.manual_seed`` takes an unsigned 64-bit seed."""
MAX_TOKEN_ID = 2**31 - 1
MAX_EXTRA_STOP_TOKEN_IDS = 1024


def _check_int(name: str, value: object, lo: int, hi: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestValidationError(name, f"`{name}` must be an integer. Given: {_show(value)}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestValidationError(name, f"`{name}` must be {bound}{hint}. Given: {_show(value)}")


def _check_real(name: str, value: object, rule: str, ok: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestValidationError(name, f"`{name}` must be a number. Given: {_show(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or not ok(value):  # type: ignore[operator]
        raise RequestValidationError(name, f"`{name}` {rule}. Given: {_show(value)}")


def _show(value: object, limit: int = 60) -> str:
    """A value for an error message: short, and never an exception of its own (``str`` of an
    int of more than 4300 digits raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
