"""The server's Prometheus metrics (prometheus_client), in a registry of its own so that
several servers in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a few milliseconds (a warm decode step) to minutes (a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """What `/metrics` shows; `running` and `waiting` are read from the engine thread."""

    def __init__(self, engine_thread):
        self.registry = CollectorRegistry()
        r = self.registry
        running = Gauge("lcx_requests_running", "Requests holding an engine slot", registry=r)
        running.set_function(lambda: engine_thread.running)
        waiting = Gauge("lcx_requests_waiting", "Requests waiting for a slot", registry=r)
        waiting.set_function(lambda: engine_thread.waiting)
        self.requests = Counter(
            "lcx_requests",
            "Finished requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("lcx_prompt_tokens", "Prompt tokens served", registry=r)
        self.generated_tokens = Counter("lcx_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "lcx_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "lcx_inter_token_seconds",
            "Between consecutive tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
