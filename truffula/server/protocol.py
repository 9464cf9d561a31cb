"""Request bodies of the HTTP API (pydantic) and the error bodies of its OpenAPI schema.

Every optional field accepts explicit ``null``; unknown fields are ignored, as LoRAX and the
OpenAI API do. Types are strict, as LoRAX's and OpenAI's own servers are: an integer field takes
a JSON integer (not ``true``, ``2.0`` or ``"2"``), a boolean field ``true`` / ``false``, a number
field a JSON number (integers too). Text must be valid Unicode: a lone surrogate (``"\\ud800"``,
which JSON can spell but UTF-8 cannot encode) is a 422 naming the field, never replaced.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

Int = StrictInt
Bool = StrictBool
Float = StrictFloat
"""JSON numbers, integers included; never booleans or strings."""

MAX_SUBREQUESTS = 256
"""Most engine requests one HTTP request may start: ``/score`` continuations, OpenAI prompts x n."""


def first_surrogate(value: Any, into_dicts: bool = True) -> bool:
    """Whether ``value`` (a string, or lists / dicts of them, nested to any depth) holds a lone
    surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict) and into_dicts:
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


_STRICT = {"on": False}


def set_strict_fields(on: bool) -> None:
    """``--strict-params``: an unknown field in any request body is a 422 naming it."""
    _STRICT["on"] = on


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if _STRICT["on"] and isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                names = ", ".join(f"`{k}`" for k in unknown)
                raise ValueError(f"unknown field(s) {names} (the server runs with --strict-params)")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _valid_text(cls, value: Any, info: ValidationInfo) -> Any:
        # before pydantic's own str check (whose message is vaguer); nested objects check
        # their own fields, so the message names the innermost one
        if first_surrogate(value, into_dicts=False):
            raise ValueError(
                f"`{info.field_name}` must be valid Unicode text (a lone surrogate such as "
                "\\ud800 cannot be encoded)"
            )
        return value


class MergedAdapters(_Lenient):
    ids: list[str] | None = None
    weights: list[Float] | None = None
    merge_strategy: str | None = Field(None, description="linear | ties | dare_linear | dare_ties")
    density: Float | None = Field(None, description="fraction of weights kept by ties / dare")
    majority_sign_method: str | None = Field(None, description="total | frequency")


class GenerateParameters(_Lenient):
    """LoRAX / TGI generation parameters plus truffula's token-probability extensions."""

    adapter_id: str | None = Field(
        None, description="LoRA adapter serving this request (null or '' = base model)"
    )
    adapter_source: str | None = Field(None, description="local | hub")
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: Int | None = Field(
        None, description="sample this many sequences, return the most likely"
    )
    temperature: Float | None = Field(None, description="0 = greedy")
    repetition_penalty: Float | None = None
    frequency_penalty: Float | None = None
    presence_penalty: Float | None = None
    top_k: Int | None = None
    top_p: Float | None = None
    typical_p: Float | None = None
    min_p: Float | None = None
    do_sample: Bool | None = False
    max_new_tokens: Int | None = None
    max_tokens: Int | None = Field(None, description="vLLM / OpenAI name of max_new_tokens")
    ignore_eos_token: Bool | None = False
    ignore_eos: Bool | None = Field(None, description="vLLM name of ignore_eos_token")
    return_full_text: Bool | None = False
    stop: str | list[str] | None = Field(None, description="stop strings (one string or a list)")
    truncate: Int | None = Field(None, description="keep only the last N prompt tokens")
    watermark: Bool | None = False
    details: Bool | None = False
    decoder_input_details: Bool | None = Field(
        False, description="return the prompt tokens with logprobs"
    )
    return_k_alternatives: Int | None = Field(
        None, description="k most likely tokens at each generated position"
    )
    top_n_tokens: Int | None = Field(
        None, description="TGI name of return_k_alternatives (details.top_tokens)"
    )
    seed: Int | None = None
    response_format: Any | None = Field(
        None, description="{type: text | json_object | json_schema, schema?}: constrain the output"
    )
    grammar: Any | None = Field(None, description="TGI: {type: json | regex, value}")
    logprobs_mode: str | None = Field(None, description="processed (default) | raw")
    speculative: Bool | None = Field(
        None, description="false: no speculative decoding for this request (default: as served)"
    )
    prompt_k_alternatives: Int | None = Field(
        None, description="k most likely tokens at each prompt position"
    )
    apply_chat_template: Bool | None = Field(
        False,
        description="format `inputs` with the model's chat template: a user message, or a JSON "
        "list of {role, content} messages",
    )


class GenerateRequest(_Lenient):
    inputs: str = Field(..., min_length=1, description="the prompt")
    parameters: GenerateParameters | None = None


class CompatGenerateRequest(GenerateRequest):
    stream: Bool | None = False


class TokenizeRequest(_Lenient):
    inputs: str = Field(..., min_length=1)
    add_special_tokens: Bool | None = True


class ScoreRequest(_Lenient):
    prompt: str = Field(..., min_length=1, description="context the continuations follow")
    continuations: list[str] = Field(
        ..., min_length=1, max_length=MAX_SUBREQUESTS, description="each scored on its own"
    )
    adapter_id: str | None = None
    adapter_source: str | None = None
    k: Int | None = Field(None, description="alternatives per continuation token")


class StreamOptions(_Lenient):
    include_usage: Bool | None = False


class _OpenAIRequest(_Lenient):
    """The fields the completions and chat bodies share (OpenAI's, then vLLM's and truffula's)."""

    model: str | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    n: Int | None = 1
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    user: str | None = None
    top_k: Int | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    ignore_eos: Bool | None = None
    adapter_source: str | None = None
    logprobs_mode: str | None = None
    speculative: Bool | None = None
    response_format: dict[str, Any] | None = Field(
        None,
        description="{type: text | json_object | json_schema, json_schema?: {name, schema, strict}}",
    )
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM: one of {json, regex, choice, grammar, json_object}"
    )


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: Bool | None = False
    best_of: Int | None = Field(None, description="only 1 (or null): use `n` for more choices")
    suffix: str | None = None
    ignore_eos_token: Bool | None = None


class ContentPart(_Lenient):
    """One part of a message's content; parts other than text are left out."""

    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: Bool | None = False
    top_logprobs: Int | None = None


class ErrorResponse(BaseModel):
    """The error body of the LoRAX / TGI routes and of every route outside ``/v1``."""

    error: str
    error_type: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class OpenAIErrorResponse(BaseModel):
    """The error body of the ``/v1`` routes."""

    error: OpenAIErrorDetail


ERROR_STATUSES = {
    401: "missing or wrong API key (`--api-key`)",
    403: "the adapter resolves outside `--adapter-root`",
    404: "the adapter is neither under `--adapter-root` nor in the local Hugging Face cache",
    409: "the adapter is serving requests",
    413: "the body is larger than `--max-request-bytes`",
    422: "a parameter of the wrong type or out of range (the message names it), malformed JSON, "
    "an adapter that cannot be loaded",
    424: "generation failed while the request ran",
    429: "`--max-concurrent-requests` requests are already in flight",
    503: "the server is shutting down or the engine process is gone",
}


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the error statuses a route can answer."""
    model = OpenAIErrorResponse if openai else ErrorResponse
    return {s: {"model": model, "description": ERROR_STATUSES[s]} for s in statuses}


GENERATION_ERRORS = (401, 403, 404, 413, 422, 424, 429, 503)
"""Statuses of a route that runs requests, adapters included."""
