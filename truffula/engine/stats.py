"""Engine metrics, kept where the requests live (the engine process): token counts, finish
reasons, latency histograms (time to first token, time per output token, end to end), queue and
batch sizes, KV blocks and adapters. API processes fetch them as Prometheus text (``render``)
or a flat dict (``snapshot``) and add their own HTTP counters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from truffula.engine.core import EngineCore
    from truffula.engine.request import Request

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class EngineMetrics:
    """Bound to one engine core: it samples gauges at scrape time and receives request timings
    (the core's ``MetricsSink``)."""

    def __init__(self, core: EngineCore) -> None:
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter(
            "truffula_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter("truffula_generated_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "truffula_requests_finished", "Requests finished by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "truffula_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "truffula_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.e2e = Histogram(
            "truffula_request_latency_seconds",
            "Arrival to last token",
            buckets=_LATENCY,
            registry=r,
        )
        sched, pool = core.scheduler, core.pool
        gauges = {
            "truffula_queue_depth": (
                "Requests waiting to be scheduled",
                lambda: len(sched.waiting),
            ),
            "truffula_running_batch_size": (
                "Requests in the running batch",
                lambda: len(sched.running),
            ),
            "truffula_kv_blocks_used": ("KV-cache blocks in use", lambda: pool.num_used),
            "truffula_kv_blocks_total": ("KV-cache blocks in the pool", lambda: pool.capacity),
        }
        adapters = core.adapters
        gauges["truffula_active_adapters"] = (
            "Adapters resident in device slots",
            lambda: adapters.num_active,
        )
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)
        self.adapter_loads = Counter(
            "truffula_adapter_loads", "Adapters loaded to a device slot", registry=r
        )
        self.adapter_evictions = Counter(
            "truffula_adapter_evictions", "Adapters evicted from a device slot", registry=r
        )
        adapters.on_load = self.adapter_loads.inc
        r.register(_PrefixCacheCounters(core))
        if core.drafter is not None:
            r.register(_SpeculativeCounters(core))
        adapters.on_evict = self.adapter_evictions.inc
        core.metrics = self

    # MetricsSink ------------------------------------------------------------------------
    def first_token(self, req: Request) -> None:
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.arrival)

    def request_finished(self, req: Request, reason: str) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(len(req.prompt_ids))
        n = len(req.output_ids)
        self.generated_tokens.inc(n)
        if req.finished_at is not None and reason != "abort":
            self.e2e.observe(req.finished_at - req.arrival)
            if n > 1 and req.first_token_at is not None:
                self.tpot.observe((req.finished_at - req.first_token_at) / (n - 1))

    # Reading ----------------------------------------------------------------------------
    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def snapshot(self) -> dict[str, Any]:
        return registry_snapshot(self.registry)


class _PrefixCacheCounters(Collector):
    """``truffula_prefix_cache_queries_total`` and ``..._hits_total``: prompt tokens of admitted
    requests looked up in the prefix cache, and those served from it (read at scrape time)."""

    def __init__(self, core: EngineCore) -> None:
        self.cache = core.prompts.cache

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = self.cache
        yield CounterMetricFamily(
            "truffula_prefix_cache_queries",
            "Tokens of admitted requests looked up in the prefix cache",
            value=c.queries if c is not None else 0,
        )
        yield CounterMetricFamily(
            "truffula_prefix_cache_hits",
            "Tokens served from the prefix cache",
            value=c.hits if c is not None else 0,
        )


class _SpeculativeCounters(Collector):
    """``truffula_spec_decode_num_draft_tokens_total`` and ``..._num_accepted_tokens_total``
    (vLLM's names), and the acceptance rate, read at scrape time."""

    def __init__(self, core: EngineCore) -> None:
        assert core.drafter is not None
        self.drafter = core.drafter

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        d = self.drafter
        method = d.config.method
        drafted = CounterMetricFamily(
            "truffula_spec_decode_num_draft_tokens", "Tokens drafted", labels=["method"]
        )
        drafted.add_metric([method], d.drafted)
        accepted = CounterMetricFamily(
            "truffula_spec_decode_num_accepted_tokens",
            "Drafted tokens the target model confirmed",
            labels=["method"],
        )
        accepted.add_metric([method], d.accepted)
        rate = GaugeMetricFamily(
            "truffula_spec_decode_acceptance_rate",
            "Accepted over drafted tokens since start-up",
            labels=["method"],
        )
        rate.add_metric([method], d.acceptance_rate)
        yield from (drafted, accepted, rate)


def registry_snapshot(registry: CollectorRegistry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            key = sample.name + (str(sorted(sample.labels.items())) if sample.labels else "")
            out[key] = sample.value
    return out
