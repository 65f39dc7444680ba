"""``/metrics`` in the Prometheus text format (``prometheus_client``): queued and running rows, generated tokens
(a counter, and tokens/s over the last steps), request latency histograms and request counts by endpoint and
status. One registry per app, so that several servers in one process (tests) do not collide."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        Gauge("megannm_queue_rows", "Rows waiting for a decoder slot", registry=r).set_function(
            lambda: engine.queued)
        Gauge("megannm_running_rows", "Rows decoding now", registry=r).set_function(lambda: engine.running)
        Gauge("megannm_tokens_per_second", "Generated tokens per second over the last steps",
              registry=r).set_function(engine.tokens_per_second)
        Gauge("megannm_cancelled_rows", "Rows cancelled since start (their clients went away)",
              registry=r).set_function(lambda: engine.decoder.cancelled_rows)
        Counter("megannm_generated_tokens", "Tokens generated since start", registry=r)  # see render
        self._tokens = r._names_to_collectors["megannm_generated_tokens_total"]
        self._engine, self._seen = engine, 0
        self.latency = Histogram("megannm_request_latency_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=_BUCKETS, registry=r)
        self.requests = Counter("megannm_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=r)

    def request(self, path: str, status: int, seconds: float) -> None:
        self.latency.labels(path).observe(seconds)
        self.requests.labels(path, str(status)).inc()

    def render(self) -> bytes:
        total = self._engine.decoder.tokens_generated
        self._tokens.inc(max(0, total - self._seen))
        self._seen = total
        return generate_latest(self.registry)
