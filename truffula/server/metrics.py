"""HTTP metrics of one API process (requests by route and status); ``/metrics`` serves them
after the engine's own (``truffula.engine.stats``), fetched from the engine process."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from truffula.engine.stats import registry_snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "truffula_requests",
            "HTTP requests by route and status (499: the client went away)",
            ["route", "status"],
            registry=self.registry,
        )

    def observe_http(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def snapshot(self) -> dict[str, Any]:
        return registry_snapshot(self.registry)
