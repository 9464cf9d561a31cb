"""Request bodies of the HTTP API (pydantic). Every optional field accepts explicit ``null``;
unknown fields are ignored, as LoRAX and the OpenAI API do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class MergedAdapters(_Lenient):
    ids: list[str] | None = None
    weights: list[float] | None = None
    merge_strategy: str | None = Field(None, description="linear | ties | dare_linear | dare_ties")
    density: float | None = Field(None, description="fraction of weights kept by ties / dare")
    majority_sign_method: str | None = Field(None, description="total | frequency")


class GenerateParameters(_Lenient):
    """LoRAX / TGI generation parameters plus truffula's token-probability extensions."""

    adapter_id: str | None = Field(
        None, description="LoRA adapter serving this request (null or '' = base model)"
    )
    adapter_source: str | None = Field(None, description="local | hub")
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = Field(
        None, description="sample this many sequences, return the most likely"
    )
    temperature: float | None = Field(None, description="0 = greedy")
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    do_sample: bool | None = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool | None = False
    return_full_text: bool | None = False
    stop: list[str] | None = None
    truncate: int | None = Field(None, description="keep only the last N prompt tokens")
    watermark: bool | None = False
    details: bool | None = False
    decoder_input_details: bool | None = Field(
        False, description="return the prompt tokens with logprobs"
    )
    return_k_alternatives: int | None = Field(
        None, description="k most likely tokens at each generated position"
    )
    top_n_tokens: int | None = Field(
        None, description="TGI name of return_k_alternatives (details.top_tokens)"
    )
    seed: int | None = None
    response_format: Any | None = None
    grammar: Any | None = None
    logprobs_mode: str | None = Field(None, description="processed (default) | raw")
    prompt_k_alternatives: int | None = Field(
        None, description="k most likely tokens at each prompt position"
    )
    apply_chat_template: bool | None = Field(
        False,
        description="format `inputs` with the model's chat template: a user message, or a JSON "
        "list of {role, content} messages",
    )


class GenerateRequest(_Lenient):
    inputs: str
    parameters: GenerateParameters | None = None


class CompatGenerateRequest(GenerateRequest):
    stream: bool | None = False


class TokenizeRequest(_Lenient):
    inputs: str
    add_special_tokens: bool | None = True


class ScoreRequest(_Lenient):
    prompt: str = Field(..., description="context the continuations follow")
    continuations: list[str] = Field(..., min_length=1)
    adapter_id: str | None = None
    adapter_source: str | None = None
    k: int | None = Field(None, description="alternatives per continuation token")


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class CompletionRequest(_Lenient):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    suffix: str | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    ignore_eos_token: bool | None = None
    adapter_source: str | None = None
    logprobs_mode: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(
                part.get("text", "") for part in self.content if part.get("type") == "text"
            )
        return self.content or ""


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    adapter_source: str | None = None
    logprobs_mode: str | None = None
