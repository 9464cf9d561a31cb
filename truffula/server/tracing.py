"""OpenTelemetry traces: a server span per HTTP request (its parent taken from a W3C
``traceparent`` header), and under it, for each engine request the HTTP request started, the
spans ``queue`` (arrival to admission), ``prefill`` (admission to first token) and ``decode``
(first token to end), timed by the engine process; streamed answers add a ``stream`` span
(first byte to last). Exported over OTLP/HTTP with ``--otlp-endpoint``.

Without ``--otlp-endpoint`` nothing is recorded and no SDK is needed (``opentelemetry-api``
alone). The SDK and the exporter come with ``pip install 'truffula[tracing]'``.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_TRACER: dict[str, Any] = {"tracer": None, "provider": None}
_PROPAGATOR = TraceContextTextMapPropagator()
TRACES_PATH = "/v1/traces"


def otlp_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``--otlp-endpoint`` (``/v1/traces`` added to a bare host)."""
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    scheme, _, rest = endpoint.partition("://")
    return endpoint if "/" in rest.strip("/") else f"{scheme}://{rest.rstrip('/')}{TRACES_PATH}"


def setup(endpoint: str | None, service_name: str, exporter: Any = None) -> None:
    """Record and export spans: over OTLP/HTTP to ``endpoint``, or to ``exporter`` (an SDK
    ``SpanExporter``, e.g. the in-memory one of the tests), synchronously."""
    if endpoint is None and exporter is None:
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise SystemExit(
            "truffula: error: --otlp-endpoint needs the OpenTelemetry SDK and OTLP exporter: "
            "pip install 'truffula[tracing]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise SystemExit(
                "truffula: error: --otlp-endpoint needs the OTLP exporter: "
                "pip install 'truffula[tracing]'"
            ) from exc
        assert endpoint is not None
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_url(endpoint)))
        )
    _TRACER["provider"] = provider
    _TRACER["tracer"] = provider.get_tracer("truffula")


def shutdown() -> None:
    """Export what is left (the batch processor's queue)."""
    provider = _TRACER["provider"]
    if provider is not None:
        provider.shutdown()
    _TRACER["provider"] = _TRACER["tracer"] = None


def enabled() -> bool:
    return _TRACER["tracer"] is not None


def _epoch_ns(monotonic: float, now_mono: float, now_ns: int) -> int:
    return now_ns - int((now_mono - monotonic) * 1e9)


class RequestTrace:
    """The spans of one HTTP request (made only while tracing is on)."""

    def __init__(self, scope: dict[str, Any], request_id: str) -> None:
        tracer = _TRACER["tracer"]
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k in (b"traceparent", b"tracestate")
        }
        parent = _PROPAGATOR.extract(headers)
        self.span = tracer.start_span(
            f"{scope['method']} {scope['path']}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": scope["method"],
                "url.path": scope["path"],
                "truffula.request_id": request_id,
            },
        )
        self.context = trace.set_span_in_context(self.span, parent)
        self.stream_span: Any = None

    def response_started(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR))
        if any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers):
            self.stream_span = _TRACER["tracer"].start_span("stream", context=self.context)

    def end(self, streams: list[Any]) -> None:
        """End the spans; ``streams``: the engine requests (``RequestStream``) it started."""
        now_mono, now_ns = time.monotonic(), time.time_ns()
        for stream in streams:
            self._engine_spans(stream, now_mono, now_ns)
        if self.stream_span is not None:
            self.stream_span.end()
        self.span.end()

    def _engine_spans(self, stream: Any, now_mono: float, now_ns: int) -> None:
        times = stream.timings
        if not times:
            return
        arrival = stream.request.arrival
        end = times[2] if len(times) > 2 else (stream.ended_at or now_mono)
        tracer = _TRACER["tracer"]
        attrs = {
            "truffula.engine_request_id": stream.request_id,
            "truffula.prompt_tokens": len(stream.request.prompt_ids),
        }
        for name, a, b in (
            ("queue", arrival, times[0]),
            ("prefill", times[0], times[1]),
            ("decode", times[1], end),
        ):
            span = tracer.start_span(
                name,
                context=self.context,
                start_time=_epoch_ns(a, now_mono, now_ns),
                attributes=attrs,
            )
            span.end(end_time=_epoch_ns(max(a, b), now_mono, now_ns))
