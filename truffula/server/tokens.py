"""Tokenizer routes of two dialects: TGI's ``POST /tokenize`` (``{"inputs"}`` -> ``[{id, text,
start, stop}]``) and vLLM's (``{"prompt"}`` or chat ``{"messages"}`` -> ``{tokens, count,
max_model_len}``), told apart by the body's shape; vLLM's ``POST /detokenize`` and
``GET /tokenizer_info``. Answers are bounded by the body's size (``--max-request-bytes``); long
texts are tokenized in a worker thread."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import Response
from pydantic import Discriminator, Field, Tag

from truffula.server.errors import HTTPError, invalid
from truffula.server.protocol import (
    Bool,
    ChatMessage,
    Int,
    TokenizeRequest,
    _Lenient,
    error_responses,
)
from truffula.server.responses import JSON, json_bytes
from truffula.server.state import ServerState, state_of

router = APIRouter(tags=["Operations"])


class VllmTokenizeRequest(_Lenient):
    """vLLM's completion-style ``/tokenize`` body."""

    model: str | None = None
    prompt: str = Field(..., description="the text to tokenize")
    add_special_tokens: Bool | None = True
    return_token_strs: Bool | None = False


class VllmChatTokenizeRequest(_Lenient):
    """vLLM's chat-style ``/tokenize`` body: the conversation through the chat template."""

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: Bool | None = True
    add_special_tokens: Bool | None = False
    return_token_strs: Bool | None = False


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[Int] = Field(..., description="token ids")


def _dialect(body: Any) -> str:
    if isinstance(body, dict):
        if "inputs" in body:
            return "~tgi"
        if "messages" in body:
            return "~chat"
    return "~vllm"


AnyTokenize = Annotated[
    Annotated[TokenizeRequest, Tag("~tgi")]
    | Annotated[VllmTokenizeRequest, Tag("~vllm")]
    | Annotated[VllmChatTokenizeRequest, Tag("~chat")],
    Discriminator(_dialect),
]


@router.post(
    "/tokenize",
    summary="Tokenize: TGI `{inputs}` -> [{id, text, start, stop}]; vLLM `{prompt}` or "
    "`{messages}` -> {tokens, count, max_model_len}",
    responses=error_responses(401, 413, 422),
)
async def tokenize(body: Annotated[AnyTokenize, Body()], request: Request) -> Response:
    state = state_of(request)
    if isinstance(body, TokenizeRequest):
        if not body.inputs:
            raise invalid("inputs", "`inputs` cannot be empty")
        add = True if body.add_special_tokens is None else body.add_special_tokens
        content = await state.off_loop(len(body.inputs), _tgi_json, state, body.inputs, add)
        return Response(content, media_type="application/json")
    if isinstance(body, VllmChatTokenizeRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        gen = body.add_generation_prompt is not False
        chars = sum(len(m["content"]) for m in messages)
        text = await state.off_loop(chars, _chat_text, state, messages, gen)
        add = bool(body.add_special_tokens)
    else:
        text, add = body.prompt, body.add_special_tokens is not False
    ids = await state.off_loop(len(text), state.tokenizer.encode, text, add)
    out: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": state.engine.info.max_len,
        "tokens": ids,
        "token_strs": _strings(state, ids) if body.return_token_strs else None,
    }
    return JSON(out)


@router.post(
    "/detokenize",
    summary="vLLM: token ids -> {prompt} (their text)",
    responses=error_responses(401, 413, 422),
)
async def detokenize(body: DetokenizeRequest, request: Request) -> JSON:
    state = state_of(request)
    vocab = state.engine.info.vocab_size
    for i, tok in enumerate(body.tokens):
        if not 0 <= tok < vocab:
            raise invalid("tokens", f"`tokens[{i}]` = {tok} is not a token id (0 <= id < {vocab})")
    text = await state.off_loop(len(body.tokens), state.tokenizer.decode, body.tokens, False)
    return JSON({"prompt": text})


@router.get(
    "/tokenizer_info",
    summary="vLLM: the tokenizer's special tokens, chat template and the model's max length",
    responses=error_responses(401),
)
async def tokenizer_info(request: Request) -> JSON:
    state = state_of(request)
    hf = state.tokenizer.hf
    out: dict[str, Any] = {
        "tokenizer_class": type(hf).__name__,
        "model_max_length": state.engine.info.max_len,
        "max_model_len": state.engine.info.max_len,
        "vocab_size": state.engine.info.vocab_size,
        "chat_template": getattr(hf, "chat_template", None),
        "eos_token_ids": sorted(state.tokenizer.eos_ids),
    }
    for name in ("bos", "eos", "pad", "unk"):
        token = getattr(hf, f"{name}_token", None)
        out[f"{name}_token"] = token if isinstance(token, str) else None
        out[f"{name}_token_id"] = getattr(hf, f"{name}_token_id", None)
    return JSON(out)


def _chat_text(state: ServerState, messages: list[dict[str, Any]], generation: bool) -> str:
    tok = state.tokenizer
    if not tok.has_chat_template:
        raise HTTPError(422, "the model has no chat template (`messages`)", "template_error")
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=generation)
    except Exception as exc:  # jinja raises several types for bad conversations
        raise HTTPError(
            422, f"Failed applying chat template to `messages`: {exc}", "template_error"
        ) from exc


def _strings(state: ServerState, ids: list[int]) -> list[str]:
    strings = state.frontend.table.strings
    return [strings[i] if i < len(strings) else "" for i in ids]


def _tgi_json(state: ServerState, text: str, add_special_tokens: bool) -> bytes:
    strings = state.frontend.table.strings
    return json_bytes(
        [
            {"id": i, "text": strings[i] if i < len(strings) else "", "start": a, "stop": b}
            for i, a, b in state.tokenizer.offsets(text, add_special_tokens=add_special_tokens)
        ]
    )
