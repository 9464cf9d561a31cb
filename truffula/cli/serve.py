"""``truffula serve``: the flags become one ``ServerSettings`` and one ``EngineConfig``."""

from __future__ import annotations

import argparse

from truffula.cli.args import add_engine_args, default_of, engine_config
from truffula.config import parse_size
from truffula.server.settings import (
    ADAPTER_SOURCES,
    LOG_FORMATS,
    ServerSettings,
    model_id_of,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    S = ServerSettings
    srv = sub.add_parser("serve", help="run the HTTP server (LoRAX, TGI and OpenAI APIs)")
    srv.add_argument("--host", default=default_of(S, "host"))
    srv.add_argument("--port", type=int, default=default_of(S, "port"))
    srv.add_argument(
        "--api-key",
        default=default_of(S, "api_key"),
        help="require 'Authorization: Bearer KEY' on every route but /health",
    )
    srv.add_argument(
        "--preload-adapter",
        action="append",
        default=list(default_of(S, "preload_adapters")),
        help="adapter id to load at start-up (repeatable)",
    )
    srv.add_argument(
        "--adapter-source",
        default=default_of(S, "default_adapter_source"),
        choices=ADAPTER_SOURCES,
        help="default adapter_source (unset: a folder under --adapter-root, else the HF cache)",
    )
    srv.add_argument(
        "--drain-timeout",
        type=float,
        default=default_of(S, "drain_timeout"),
        help="seconds to finish requests on shutdown",
    )
    srv.add_argument("--log-level", default=default_of(S, "log_level"))
    srv.add_argument(
        "--log-format",
        default=default_of(S, "log_format"),
        choices=LOG_FORMATS,
        help="json: one JSON object a line, with the request id (x-request-id) of each request",
    )
    srv.add_argument(
        "--strict-params",
        action="store_true",
        default=default_of(S, "strict_params"),
        help="answer 422 naming any unknown field of a request body (default: ignored, as LoRAX)",
    )
    srv.add_argument(
        "--otlp-endpoint",
        default=default_of(S, "otlp_endpoint"),
        help="export OpenTelemetry traces over OTLP/HTTP to this URL, e.g. "
        "http://localhost:4318 (needs pip install 'truffula[tracing]')",
    )
    srv.add_argument(
        "--otlp-service-name",
        default=default_of(S, "otlp_service_name"),
        help="service.name of the exported spans",
    )
    srv.add_argument(
        "--api-server-count",
        type=int,
        default=default_of(S, "api_server_count"),
        help="HTTP server processes in front of the one engine process (share the port)",
    )
    limit = default_of(S, "max_request_bytes")
    srv.add_argument(
        "--max-request-bytes",
        type=parse_size,
        default=limit,
        help=f"largest request body, e.g. 4MiB (default {limit / 2**20:g} MiB); larger ones are "
        "answered 413 before they are read",
    )
    add_engine_args(srv)
    srv.set_defaults(func=run)


def server_settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model_id=model_id_of(args.model),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        preload_adapters=tuple(args.preload_adapter),
        default_adapter_source=args.adapter_source,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
        log_format=args.log_format,
        strict_params=args.strict_params,
        otlp_endpoint=args.otlp_endpoint,
        otlp_service_name=args.otlp_service_name,
        api_server_count=args.api_server_count,
        max_request_bytes=args.max_request_bytes,
    )


def run(args: argparse.Namespace) -> int:
    from truffula.server.launch import serve

    return serve(server_settings(args), engine_config(args))
