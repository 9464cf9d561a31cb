"""Operations routes: health, info, Prometheus metrics, tokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from truffula.server.protocol import TokenizeRequest
from truffula.server.state import invalid, state_of

router = APIRouter(tags=["Operations"])


@router.get("/health", summary="200 when the engine is serving")
async def health(request: Request) -> Response:
    state = state_of(request)
    if not state.engine.healthy:
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
    return Response(status_code=200)


@router.get("/ping", include_in_schema=False)
async def ping(request: Request) -> Response:
    return await health(request)


@router.get("/info", summary="Model, device and limits")
async def info(request: Request) -> JSONResponse:
    state = state_of(request)
    core = state.core
    cfg = core.config
    body: dict[str, Any] = {
        "model_id": state.settings.model_id,
        "model_sha": None,
        "model_dtype": str(core.dtype).removeprefix("torch."),
        "model_device_type": core.device.type,
        "model_pipeline_tag": "text-generation",
        "architecture": core.architecture,
        "serving_path": getattr(core, "serving_path", "native"),
        "max_concurrent_requests": cfg.scheduler.max_queued_requests,
        "max_best_of": state.settings.max_best_of,
        "max_stop_sequences": cfg.limits.max_stop_sequences,
        "max_input_length": core.max_len - 1,
        "max_total_tokens": core.max_len,
        "max_batch_total_tokens": cfg.scheduler.max_num_batched_tokens,
        "max_running_requests": cfg.scheduler.max_num_seqs,
        "max_k_alternatives": cfg.limits.max_k_alternatives,
        "logprobs_modes": ["processed", "raw"],
        "kv_cache_blocks": core.pool.capacity,
        "kv_block_size": cfg.cache.block_size,
        "eager_prefill": False,
        "version": state.settings.version,
        "sha": None,
        "docker_label": None,
        "request_logger_url": None,
    }
    body.update(state.adapter_info())
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    if (
        "application/json" in request.headers.get("accept", "")
        or request.query_params.get("format") == "json"
    ):
        return JSONResponse(state.metrics.snapshot())
    data, content_type = state.metrics.render()
    return Response(data, media_type=content_type)


@router.post("/tokenize", summary="Tokenize a text: [{id, text, start, stop}]")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    if not body.inputs:
        raise invalid("inputs", "`inputs` cannot be empty")
    tok = state.core.tokenizer
    add = True if body.add_special_tokens is None else body.add_special_tokens
    strings = state.core.table.strings
    return JSONResponse(
        [
            {"id": i, "text": strings[i] if i < len(strings) else "", "start": a, "stop": b}
            for i, a, b in tok.offsets(body.inputs, add_special_tokens=add)
        ]
    )
