"""Prometheus metrics of an executor, served on an optional local HTTP port."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ExecutorMetrics:
    """What an executor counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lloom_executor_requests_total",
            "Requests completed",
            ["model"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lloom_executor_errors_total",
            "Requests answered with an error, by code",
            ["code"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "lloom_executor_tokens_total",
            "Tokens served",
            ["model", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lloom_executor_request_seconds",
            "Request duration",
            ["model"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.settlement_halted = Gauge(
            "lloom_executor_settlement_halted",
            "1 while settlement cannot proceed (chain reset, no contract at the address)",
            registry=self.registry,
        )
        self.active = Gauge(
            "lloom_executor_active_requests", "Requests being served", registry=self.registry
        )

    def app(self) -> Starlette:
        """An ASGI app serving ``GET /metrics``."""

        async def metrics(_: Request) -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
