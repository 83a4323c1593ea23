"""Prometheus metrics of the HTTP API, served as text at `GET /metrics` (no token needed, like
health checks, so that a scraper needs no tenant's credentials).

- `shardwright_http_requests_total{tenant, endpoint, code}`: finished HTTP requests by status code
  (tenant "unauthenticated" when the token was missing or wrong);
- `shardwright_time_to_first_token_seconds{deployment}`: from queueing a generation to its first
  token (histogram).

Each application has its own registry, so that several servers in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from shardwright.api.auth import Authenticator

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HttpMetrics:
    """The HTTP API's counters and histograms in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("shardwright_http_requests", "HTTP API requests by tenant, endpoint and status code",
                                ["tenant", "endpoint", "code"], registry=self.registry)
        self.ttft = Histogram("shardwright_time_to_first_token_seconds",
                              "Seconds from queueing a generation to its first token", ["deployment"],
                              buckets=TTFT_BUCKETS_S, registry=self.registry)

    def request_done(self, tenant: str | None, endpoint: str, code: int) -> None:
        self.requests.labels(tenant or "unauthenticated", endpoint, str(code)).inc()

    def first_token(self, deployment: str, seconds: float) -> None:
        self.ttft.labels(deployment).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware counting finished requests by tenant, endpoint and status code (plain ASGI,
    not BaseHTTPMiddleware, so that streaming and disconnects pass through untouched)."""

    ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions"}

    def __init__(self, app, metrics: HttpMetrics, auth: Authenticator) -> None:
        self.app, self.metrics, self.auth = app, metrics, auth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        status = [500]

        async def record_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            endpoint = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
            self.metrics.request_done(self.auth.tenant(headers), endpoint, status[0])
