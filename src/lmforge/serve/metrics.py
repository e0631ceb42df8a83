"""Prometheus metrics for the server (GET /metrics, text format) and one access-log line per
request. Each app owns its registry, so several apps in one process (the tests) never share
counters. Engine-side numbers (queue, running sequences, tokens, cancellations) are read from
the engine when scraped, so they cannot drift from what /health reports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds; a CPU-sized model's first token takes milliseconds to seconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        load = self.engine.load()
        yield GaugeMetricFamily("lmforge_queue_requests", "requests waiting for a batch row",
                                value=self.engine.queued())
        yield GaugeMetricFamily("lmforge_running_sequences", "sequences decoding now", value=load["active"])
        yield CounterMetricFamily("lmforge_generated_tokens", "tokens generated", value=load["tokens_generated"])
        yield CounterMetricFamily("lmforge_cancelled_sequences", "sequences dropped because their client "
                                  "went away", value=load["cancelled"])
        yield CounterMetricFamily("lmforge_dropped_requests", "requests dropped while queued (client gone)",
                                  value=load["dropped"])
        yield CounterMetricFamily("lmforge_aborted_sequences", "sequences ended by a deadline or shutdown",
                                  value=load["aborted"])


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "from admission to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds", "mean gap between a choice's tokens "
                              "after the first", buckets=TPOT_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenClock:
    """Times one request's tokens: the first token's latency and the mean gap after it."""

    def __init__(self, clock):
        self.clock, self.start = clock, clock()
        self.first: float | None = None
        self.last = self.start
        self.tokens = 0

    def tick(self, ev) -> None:
        if ev.token is None:
            return
        now = self.clock()
        if self.first is None:
            self.first = now
        self.last, self.tokens = now, self.tokens + 1

    def observe(self, metrics: Metrics, choices: int) -> None:
        if self.first is None:
            return
        metrics.ttft.observe(self.first - self.start)
        per_choice = self.tokens / max(choices, 1)
        if per_choice > 1:
            metrics.tpot.observe((self.last - self.first) / (per_choice - 1))
