"""The Serve application: one router deployment in front of N replicas.

The router is the HTTP ingress: it reads the body, finds the adapter key (``routing.py``) and
calls a replica through a ``DeploymentHandle`` with ``multiplexed_model_id`` set to it, so Serve
sends it to a replica that already holds that adapter (another one only when those are at
``max_ongoing_requests``); base-model requests go to the less loaded of two replicas. The
replica's answer streams back chunk by chunk. A replica that dies before it answers gives a 503
in the route's dialect; one that dies mid-stream ends the stream (SSE: with an error event).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from truffula.cluster.replica import Call, Head, Replica
from truffula.cluster.routing import adapter_of
from truffula.config import EngineConfig
from truffula.server import errors
from truffula.server.settings import ServerSettings

APP_NAME = "truffula"
CONSTRUCTOR_RETRIES = 2
"""Starts of a replica that fails to start before the deploy fails with its error."""


@dataclass(frozen=True)
class Scale:
    """How many replicas: fixed (``replicas``) or autoscaled between ``min``/``max``."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    max_ongoing_requests: int = 64
    """Requests one replica is sent at once; more wait in the router (and count as load)."""
    target_ongoing_requests: float = 16.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.max_ongoing_requests < 1:
            raise ValueError("--max-ongoing-requests must be at least 1")
        lo, hi = self.min_replicas, self.max_replicas
        if (lo is None) != (hi is None):
            raise ValueError("--min-replicas and --max-replicas go together")
        if lo is not None and hi is not None and not 0 <= lo <= hi >= 1:
            raise ValueError("need 0 <= --min-replicas <= --max-replicas, --max-replicas >= 1")

    def options(self) -> dict[str, Any]:
        """``serve.deployment`` options of the replicas."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "health_check_period_s": 5.0,
            "graceful_shutdown_timeout_s": 15.0,
            "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        }
        lo, hi = self.min_replicas, self.max_replicas
        if lo is None or hi is None:
            opts["num_replicas"] = self.replicas
        else:
            opts["autoscaling_config"] = {
                "min_replicas": lo,
                "initial_replicas": min(max(self.replicas, lo), hi),
                "max_replicas": hi,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        return opts


class Router:
    """The ingress deployment: HTTP in, a replica call out."""

    def __init__(self, replicas: DeploymentHandle, base_model_id: str) -> None:
        self.replicas = replicas.options(method_name="handle", stream=True)
        self.base_model_id = base_model_id

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        adapter = adapter_of(path, body, self.base_model_id)
        client = request.client
        call = Call(
            method=request.method,
            path=path,
            query_string=request.scope.get("query_string", b""),
            headers=[(bytes(k), bytes(v)) for k, v in request.scope["headers"]],
            body=body,
            client=(client.host, client.port) if client else None,
            adapter=adapter,
        )
        handle = self.replicas
        if adapter is not None:
            handle = handle.options(multiplexed_model_id=adapter)
        stream = cast(DeploymentResponseGenerator[Any], handle.remote(call))
        try:
            head = await stream.__anext__()
        except Exception as exc:
            return _unavailable(path, exc)
        assert isinstance(head, Head)
        sse = any(k == b"content-type" and b"event-stream" in v for k, v in head.headers)
        response = StreamingResponse(_rest(stream, sse), status_code=head.status)
        # Serve's proxy adds the request id (the same one: the app read it from the request)
        response.raw_headers = [(k, v) for k, v in head.headers if k != b"x-request-id"]
        return response


async def _rest(stream: Any, sse: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except Exception as exc:
        if sse:
            event = {"error": f"the replica serving this stream failed: {exc}"[:500]}
            event["error_type"] = "replica_failed"
            yield f"data: {json.dumps(event)}\n\n".encode()


def _unavailable(path: str, exc: Exception) -> JSONResponse:
    message = f"no replica could answer: {type(exc).__name__}: {exc}"[:1000]
    body = errors.dialect(path, 503, {"error": message, "error_type": "replica_failed"})
    return JSONResponse(body, status_code=503)


def build(settings: ServerSettings, config: EngineConfig, scale: Scale) -> Any:
    """The Serve application: the router bound to the replicas."""
    options = scale.options()
    # --drain-timeout: a replica being stopped finishes its requests for that long
    options["graceful_shutdown_timeout_s"] = settings.drain_timeout + 5.0
    replica = serve.deployment(name="TruffulaReplica", **options)(Replica)
    router = serve.deployment(
        name="TruffulaRouter", max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0}
    )(Router)
    return router.bind(replica.bind(settings, config), settings.model_id)
