"""GET /metrics: the engine's `Metrics` as Prometheus text, in a registry of this app's own.

Latency histograms are fed by `Metrics.listeners` (called on the engine thread for every first
token and every later token); gauges and counters are read from the engine when scraped. HTTP
request counts by route and status come from `MetricsMiddleware`.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 0.75, 1, 2.5)


class _EngineCollector:
    """Reads the engine's state at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        m = e.metrics
        with m.lock:
            prompt, cached, generated = m.prompt_tokens, m.cached_prompt_tokens, m.generation_tokens
            finished = dict(m.requests_finished)
        pages = e.scheduler.allocator
        gauges = [
            ("dsserve_num_running_requests", "requests decoding or prefilling", m.num_running),
            ("dsserve_num_queued_requests", "requests waiting to run", e.queue_depth()),
            ("dsserve_kv_cache_usage", "fraction of KV cache pages held by requests", m.kv_usage),
            # read as the engine thread left them: with no request running, what is taken is all the
            # prefix cache's (more would be a leak)
            ("dsserve_kv_pages_used", "KV cache pages taken, by requests or the prefix cache",
             pages.num_pages - 1 - pages.num_free),
            ("dsserve_prefix_cache_pages", "KV cache pages the prefix cache holds", e.tree.cached_pages),
            ("dsserve_prefix_cache_hit_rate", "cached prompt tokens / prompt tokens, over finished requests",
             m.prefix_hit_rate),
            ("dsserve_spec_accept_length", "speculative decoding: tokens a request commits per verify pass "
             "(1 + accepted drafts), on average", m.spec_accept_length),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
        for name, doc, value in [
            ("dsserve_prompt_tokens", "prompt tokens of finished requests", prompt),
            ("dsserve_cached_prompt_tokens", "prompt tokens served from the prefix cache", cached),
            ("dsserve_generation_tokens", "generated tokens of finished requests", generated),
            ("dsserve_retractions", "requests retracted to free KV cache", m.retractions),
            ("dsserve_spec_verifications", "speculative decoding: verify passes of a request with drafts",
             m.spec_verifications),
            ("dsserve_spec_verified_tokens", "speculative decoding: tokens those verify passes committed",
             m.spec_verified_tokens),
        ]:
            yield CounterMetricFamily(name, doc, value=float(value))
        by_reason = CounterMetricFamily("dsserve_requests_finished", "finished requests by finish reason",
                                        labels=["reason"])
        for reason, count in sorted(finished.items()):
            by_reason.add_metric([reason], float(count))
        yield by_reason


class PrometheusExporter:
    def __init__(self, engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.ttft = Histogram("dsserve_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("dsserve_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.http = Counter("dsserve_http_requests", "HTTP requests by route and status",
                            ["method", "route", "status"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        engine.metrics.listeners.append(self._listen)

    def _listen(self, name: str, value: float) -> None:
        if name == "ttft":
            self.ttft.observe(value)
        elif name == "itl":
            self.itl.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        try:
            self.engine.metrics.listeners.remove(self._listen)
        except ValueError:
            pass
