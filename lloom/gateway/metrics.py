"""Prometheus metrics of the gateway."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters and histograms, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lloom_gateway_requests_total",
            "Requests received",
            ["endpoint"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lloom_gateway_errors_total",
            "Requests that failed, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lloom_gateway_request_seconds",
            "Time to the complete answer",
            ["endpoint"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "lloom_gateway_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["endpoint"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.executors = Gauge(
            "lloom_gateway_executors_known",
            "Executors announcing themselves",
            registry=self.registry,
        )
        self.key_requests = Counter(
            "lloom_gateway_key_requests_total",
            "Completed requests per API key",
            ["key"],
            registry=self.registry,
        )
        self.key_tokens = Counter(
            "lloom_gateway_key_tokens_total",
            "Tokens per API key, by kind (prompt, completion)",
            ["key", "kind"],
            registry=self.registry,
        )
        self.refused = Counter(
            "lloom_gateway_refused_total",
            "Requests refused before reaching the network, by reason",
            ["reason"],
            registry=self.registry,
        )
