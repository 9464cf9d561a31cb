"""What crosses the boundary between the API process(es) and the engine process.

Plain msgspec structs, encoded with MessagePack: requests and aborts in, per-step token outputs
out. An output carries token ids and the runner's ``TokenLogprobs`` (numbers only); text, the
text of alternatives and JSON are made on the API side. The same structs serve the in-process
engine (``LLM``), where nothing is encoded.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from truffula.errors import (
    AdapterError,
    EngineOverloadedError,
    GenerationError,
    RequestValidationError,
)
from truffula.runner.output import TokenLogprobs
from truffula.sampling.params import SamplingParams


class EngineRequest(msgspec.Struct, array_like=True):
    """A validated, tokenized request, ready for the scheduler."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    arrival: float = msgspec.field(default_factory=time.monotonic)
    """``time.monotonic()`` on the API side (one clock for every process of the machine)."""


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One step's news about a request, as numbers: new tokens, their statistics, the end.
    Untracked by the garbage collector (``gc=False``): it holds strings, numbers and lists of
    ``TokenLogprobs``, never itself."""

    request_id: str
    token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = msgspec.field(default_factory=list)
    """Parallel to ``token_ids``; None where the request asked for no logprobs."""
    finish_reason: str | None = None
    """length | eos_token | stop_sequence | abort, once the engine has let the request go."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """By prompt position (position 0 has none); sent once, with the first token."""
    num_prompt_tokens: int = 0
    error: str | None = None
    """The engine failed this request (it is gone); ``status`` is the HTTP status to answer."""
    status: int = 500
    timings: list[float] | None = None
    """``time.monotonic()`` of the request's admission and first token (on its first output),
    and of its end (on its finishing output): the queue / prefill / decode spans."""


class ModelInfo(msgspec.Struct):
    """Facts about the served model and the engine that the API side needs, sent once."""

    folder: str
    architecture: str
    serving_path: str
    dtype: str
    device: str
    max_len: int
    vocab_size: int
    kv_blocks: int
    kv_block_size: int
    config: Any
    """The ``EngineConfig`` as a plain dict (its frozen dataclasses, encoded)."""
    sizing: dict[str, Any] = msgspec.field(default_factory=dict)
    """How the cache and batch sizes were chosen (``core.sizing``), for /info and the log."""


# Client -> engine: (kind, payload). Engine -> client: (kind, payload).
ADD = b"add"
ABORT = b"abort"
CALL = b"call"
OUTPUTS = b"out"
REPLY = b"reply"


class Call(msgspec.Struct, array_like=True):
    """A utility call run by the engine process (adapters, stats); answered by a ``Reply``."""

    call_id: int
    method: str
    args: list[Any] = msgspec.field(default_factory=list)


class Reply(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    """The exception's class name (``AdapterError``, ``RequestValidationError``, ...)."""
    status: int = 500
    field: str | None = None


class Abort(msgspec.Struct, array_like=True):
    request_id: str
    reason: str = "abort"
    """``abort`` (client gone) or ``stop_sequence`` (the API side found a stop string)."""


encoder = msgspec.msgpack.Encoder()
outputs_decoder = msgspec.msgpack.Decoder(list[EngineOutput])
reply_decoder = msgspec.msgpack.Decoder(Reply)
request_decoder = msgspec.msgpack.Decoder(EngineRequest)
aborts_decoder = msgspec.msgpack.Decoder(list[Abort])
call_decoder = msgspec.msgpack.Decoder(Call)


_ERRORS: dict[str, type[Exception]] = {
    "AdapterError": AdapterError,
    "RequestValidationError": RequestValidationError,
    "EngineOverloadedError": EngineOverloadedError,
}


def request_error(out: EngineOutput) -> Exception:
    """The exception an error output stands for, on the API side."""
    if out.status == 429:
        return EngineOverloadedError(out.error or "Model is overloaded")
    if out.status == 422:
        return RequestValidationError("inputs", out.error or "")
    if 400 <= out.status < 500:
        return AdapterError(out.error or "", out.status)
    return GenerationError(out.error or "request failed")


def call_error(reply: Reply) -> Exception:
    """The exception a failed utility call raised in the engine, on the API side."""
    kind = _ERRORS.get(reply.error_type or "")
    if kind is AdapterError:
        return AdapterError(reply.error or "", reply.status)
    if kind is RequestValidationError:
        return RequestValidationError(reply.field or "adapter_id", reply.error or "")
    if kind is not None:
        return kind(reply.error)
    return GenerationError(reply.error or "engine call failed")
