"""Operations routes: health, info, Prometheus metrics (the tokenizer routes: ``tokens``). Every GET route also answers
HEAD (the middleware serves it as GET without the body)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from truffula.server.metrics import CONTENT_TYPE
from truffula.server.protocol import ErrorResponse, error_responses
from truffula.server.responses import JSON
from truffula.server.state import state_of

router = APIRouter(tags=["Operations"])


@router.get(
    "/health",
    summary="200 (empty body) when the engine is serving; no API key needed; HEAD too",
    response_class=Response,
    responses={
        200: {"description": "the engine is serving", "content": {}},
        503: {"model": ErrorResponse, "description": "the engine process is gone"},
    },
)
async def health(request: Request) -> Response:
    state = state_of(request)
    if not state.engine.healthy:
        return JSON({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
    return Response(status_code=200)


@router.get("/ping", include_in_schema=False)
async def ping(request: Request) -> Response:
    return await health(request)


@router.get("/info", summary="Model, device and limits", responses=error_responses(401, 503))
async def info(request: Request) -> JSON:
    state = state_of(request)
    info = state.engine.info
    cfg = state.engine.config
    adapters = await state.adapters()
    stats = await state.engine.call("stats")
    queries = stats.get("truffula_prefix_cache_queries_total", 0.0)
    hits = stats.get("truffula_prefix_cache_hits_total", 0.0)
    kv_tokens = info.kv_blocks * info.kv_block_size
    body: dict[str, Any] = {
        "model_id": state.settings.model_id,
        "model_sha": None,
        "model_dtype": info.dtype,
        "model_device_type": info.device,
        "model_pipeline_tag": "text-generation",
        "architecture": info.architecture,
        "serving_path": info.serving_path,
        "max_concurrent_requests": cfg.scheduler.max_queued_requests,
        "max_best_of": state.settings.max_best_of,
        "max_stop_sequences": cfg.limits.max_stop_sequences,
        "max_input_length": info.max_len - 1,
        "max_total_tokens": info.max_len,
        "max_batch_total_tokens": kv_tokens,
        "max_batch_prefill_tokens": info.sizing.get(
            "max_num_batched_tokens", cfg.scheduler.max_num_batched_tokens
        ),
        "max_running_requests": info.sizing.get("max_num_seqs", cfg.scheduler.max_num_seqs),
        "max_k_alternatives": cfg.limits.max_k_alternatives,
        "max_request_bytes": state.settings.max_request_bytes,
        "logprobs_modes": ["processed", "raw"],
        "kv_cache_blocks": info.kv_blocks,
        "kv_block_size": info.kv_block_size,
        "prefix_caching": cfg.cache.enable_prefix_caching,
        "prefix_cache_queries": int(queries),
        "prefix_cache_hits": int(hits),
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "sizing": info.sizing,
        "api_servers": state.settings.api_server_count,
        "eager_prefill": False,
        "version": state.settings.version,
        "sha": None,
        "docker_label": None,
        "request_logger_url": None,
    }
    body.update(adapters["info"])
    return JSON(body)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text; JSON with `Accept: application/json`",
            "content": {"text/plain": {"schema": {"type": "string"}}, "application/json": {}},
        },
        **error_responses(401, 503),
    },
)
async def metrics(request: Request) -> Response:
    """The engine's metrics (tokens, latencies, queue, KV blocks, adapters; one engine for all
    API processes) followed by this API process's HTTP counters."""
    state = state_of(request)
    if (
        "application/json" in request.headers.get("accept", "")
        or request.query_params.get("format") == "json"
    ):
        return JSON({**(await state.engine.call("stats")), **state.metrics.snapshot()})
    text = await state.engine.call("metrics") + state.metrics.render()
    return Response(text, media_type=CONTENT_TYPE)
