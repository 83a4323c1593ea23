"""Prometheus metrics of one server (gRPC and HTTP alike), and one structured log line per
finished generation.

Served as text at `GET /metrics` on the HTTP port, or on `serve --metrics-port P` when only gRPC
runs; no token is needed (like health checks), so that a scraper holds no tenant's credentials.
Each server has its own registry, so that several servers in one process do not collide.

- `shardwright_http_requests_total{tenant, endpoint, code}`: finished HTTP requests by status
  code (tenant "unauthenticated" when the token was missing or wrong);
- per deployment, measured where the API hands tokens to the client (so the figures include
  the engine's queue, the step and the hop to the API): `shardwright_time_to_first_token_seconds`
  (from queueing to the first token), `shardwright_inter_token_latency_seconds` (between two
  tokens of one request), `shardwright_request_latency_seconds` (queueing to the end; label
  `finish_reason`), `shardwright_prompt_tokens_total`, `shardwright_generation_tokens_total`,
  `shardwright_requests_total{deployment, finish_reason}` (`failed` when the request failed),
  `shardwright_requests_in_flight{deployment}`;
- per deployment this server's scheduler runs, as its engine last reported it (every reconcile
  pass): `shardwright_engine_requests{tenant, deployment, state=running|waiting}` and
  `shardwright_kv_blocks{tenant, deployment, state=used|total}`,
  `shardwright_prefix_cache{tenant, deployment, quantity=cached_blocks|prefill_tokens_saved|
  hit_sequences|evictions}` (the last three counted since the engine started). Requests are never preempted
  (admission reserves every KV block a request can need), so there is no request-preemption series;
  jobs are, see below;
- the control plane: `shardwright_jobs{state, priority, kind}` (unfinished jobs, from the store),
  `shardwright_gpus{state=total|free|held}`, `shardwright_state_store_up`,
  `shardwright_job_transitions_total{state, kind}` (the transitions this server wrote: preemptions
  are `state="preempting"`) and `shardwright_placement_wait_seconds` (queued to placed);
- per training job this server's scheduler runs, its last step: `shardwright_training_step`,
  `shardwright_training_loss`, `shardwright_training_step_seconds`,
  `shardwright_training_tokens_per_second`, `shardwright_training_mfu` (labels tenant, job).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from shardwright.serving.requests import RequestFailed
from shardwright.api.auth import Authenticator

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PLACEMENT_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# A training step's metric -> its series (name, help).
TRAINING_SERIES = {"step": ("shardwright_training_step", "The training job's last step"),
                   "loss": ("shardwright_training_loss", "Mean loss of the last step"),
                   "step_time_s": ("shardwright_training_step_seconds", "Seconds the last step took"),
                   "tokens_per_s": ("shardwright_training_tokens_per_second", "Tokens per second of the last step"),
                   "mfu": ("shardwright_training_mfu", "Model FLOPs utilisation of the last step (0-1)")}
request_log = logging.getLogger("shardwright.requests")


class ServiceMetrics:
    """The server's counters and histograms in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, control_plane=None) -> None:
        """`control_plane`: an object with `metrics_snapshot()` (scheduler.service.SchedulerService);
        its jobs, GPUs, engines and training jobs are read at each scrape."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("shardwright_http_requests", "HTTP API requests by tenant, endpoint and status code",
                                ["tenant", "endpoint", "code"], registry=r)
        self.ttft = Histogram("shardwright_time_to_first_token_seconds",
                              "Seconds from queueing a generation to its first token", ["deployment"],
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.itl = Histogram("shardwright_inter_token_latency_seconds", "Seconds between two tokens of one request",
                             ["deployment"], buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("shardwright_request_latency_seconds", "Seconds from queueing a generation to its end",
                             ["deployment", "finish_reason"], buckets=E2E_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("shardwright_prompt_tokens", "Prompt tokens of finished generations",
                                     ["deployment"], registry=r)
        self.generation_tokens = Counter("shardwright_generation_tokens", "Tokens generated", ["deployment"],
                                         registry=r)
        self.finished = Counter("shardwright_requests", "Finished generations by finish reason",
                                ["deployment", "finish_reason"], registry=r)
        self.in_flight = Gauge("shardwright_requests_in_flight", "Generations queued or running, through this server",
                               ["deployment"], registry=r)
        self.transitions = Counter("shardwright_job_transitions", "Job state transitions this server wrote",
                                   ["state", "kind"], registry=r)
        self.placement_wait = Histogram("shardwright_placement_wait_seconds", "Seconds from queued to placed",
                                        buckets=PLACEMENT_BUCKETS_S, registry=r)
        self._transition_handler = _TransitionCounter(self)
        jobs_log = logging.getLogger("shardwright.jobs")
        if jobs_log.getEffectiveLevel() > logging.INFO:  # the counter needs the INFO lines, logged or not
            jobs_log.setLevel(logging.INFO)
        jobs_log.addHandler(self._transition_handler)
        if control_plane is not None:
            r.register(ControlPlaneCollector(control_plane))

    def close(self) -> None:
        """Stop counting job transitions (they are counted from the transition log)."""
        logging.getLogger("shardwright.jobs").removeHandler(self._transition_handler)

    def request_done(self, tenant: str | None, endpoint: str, code: int) -> None:
        self.requests.labels(tenant or "unauthenticated", endpoint, str(code)).inc()

    def observe(self, stream, tenant: str, deployment: str, api: str) -> ObservedStream:
        """`stream` (a RequestStream) as seen by its client, recording this request's figures."""
        return ObservedStream(stream, self, tenant, deployment, api)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class ObservedStream:
    """A RequestStream whose consumer side (`events()`, `result()`) records the request's time to
    first token, inter-token gaps and end (once, however it ends), and logs one line at the end.
    Everything else is the stream's own."""

    def __init__(self, stream, metrics: ServiceMetrics, tenant: str, deployment: str, api: str) -> None:
        self._stream, self._metrics = stream, metrics
        self._tenant, self._deployment, self._api = tenant, deployment, api
        self._queued = self._last = time.monotonic()
        self._first_seen = False
        self._ended = threading.Lock()
        self._open = True
        metrics.in_flight.labels(deployment).inc()

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _token(self) -> None:
        now = time.monotonic()
        if not self._first_seen:
            self._first_seen = True
            self._metrics.ttft.labels(self._deployment).observe(now - self._queued)
        else:
            self._metrics.itl.labels(self._deployment).observe(now - self._last)
        self._last = now

    def end(self, status: str = "ok") -> None:
        """Record the end (the first call counts; later ones, e.g. a cancel after the end, do not)."""
        with self._ended:
            if not self._open:
                return
            self._open = False
        out = self._stream.output
        reason = out.finish_reason or ("failed" if status != "ok" else "cancelled")
        latency = time.monotonic() - self._queued
        m, d = self._metrics, self._deployment
        m.in_flight.labels(d).dec()
        m.e2e.labels(d, reason).observe(latency)
        m.prompt_tokens.labels(d).inc(len(out.prompt_ids))
        m.generation_tokens.labels(d).inc(len(out.token_ids))
        m.finished.labels(d, reason).inc()
        request_log.info("request finished", extra={"fields": {
            "request_id": out.request_id, "tenant": self._tenant, "deployment": d, "api": self._api,
            "prompt_tokens": len(out.prompt_ids), "generated_tokens": len(out.token_ids),
            "latency_s": round(latency, 4), "finish_reason": reason, "status": status}})

    def events(self, timeout_s: float | None = None):
        try:
            for item in self._stream.events(timeout_s):
                if item[0] is not None:
                    self._token()
                yield item
        except RequestFailed:
            self.end("failed")
            raise
        except TimeoutError:
            raise
        except GeneratorExit:
            self.end("client-gone")
            raise
        self.end()

    def next_event(self, timeout_s: float | None = None):
        """RequestStream.next_event, observed: a token counts, the end (None) is recorded."""
        try:
            item = self._stream.next_event(timeout_s)
        except RequestFailed:
            self.end("failed")
            raise
        if item is None:
            self.end()
        elif item[0] is not None:
            self._token()
        return item

    def take(self, timeout_s: float | None = None):
        """RequestStream.take, observed: each token counts, the end is recorded (failed or ok)."""
        items, done = self._stream.take(timeout_s)
        for token, _ in items:
            if token is not None:
                self._token()
        if done:
            self.end("failed" if self._stream.error is not None else "ok")
        return items, done

    def result(self, timeout_s: float | None = None):
        try:
            out = self._stream.result(timeout_s)
        except RequestFailed:
            self.end("failed")
            raise
        except TimeoutError:
            self.end("deadline")
            raise
        self.end()
        return out


class CountRequests:
    """ASGI middleware counting finished HTTP requests by tenant, endpoint and status code (plain
    ASGI, not BaseHTTPMiddleware, so that streaming and disconnects pass through untouched)."""

    ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions"}

    def __init__(self, app, metrics: ServiceMetrics, auth: Authenticator) -> None:
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


class LogFormatter(logging.Formatter):
    """`serve --log-format`: text (`time level logger message key=value ...`) or one JSON object
    a line (time, level, logger, message and the record's `fields`)."""

    def __init__(self, style: str = "text") -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.json:
            body = {"time": when, "level": record.levelname.lower(), "logger": record.name,
                    "message": record.getMessage(), **fields}
            if record.exc_info:
                body["error"] = self.formatException(record.exc_info).splitlines()[-1]
            return json.dumps(body, default=str)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{when} {record.levelname} {record.name}: {record.getMessage()}" + (f" {extra}" if extra else "")
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def configure_logging(style: str, level: int = logging.INFO) -> None:
    """One stderr handler with LogFormatter(style) on the `shardwright` loggers."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(style))
    root = logging.getLogger("shardwright")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _TransitionCounter(logging.Handler):
    """Counts the transition log's lines (scheduler.job_store writes one per job state change)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        super().__init__(level=logging.INFO)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        if "state" in fields:
            self.metrics.transitions.labels(fields["state"], fields.get("kind", "")).inc()
        if fields.get("waited_s") is not None:
            self.metrics.placement_wait.observe(float(fields["waited_s"]))


class ControlPlaneCollector:
    """Gauges read from the control plane at scrape time (`metrics_snapshot()`, no Ray calls)."""

    SERIES = ("shardwright_state_store_up", "shardwright_jobs", "shardwright_gpus", "shardwright_engine_requests",
              "shardwright_kv_blocks", "shardwright_prefix_cache", *(name for name, _ in TRAINING_SERIES.values()))

    def __init__(self, control_plane) -> None:
        self.control_plane = control_plane

    def describe(self):
        return []  # the series depend on what runs: collected at scrape only

    def collect(self):
        try:
            snap = self.control_plane.metrics_snapshot()
        except Exception as err:  # a scrape must not fail the server; say why the gauges are missing
            logging.getLogger(__name__).warning("control-plane metrics unavailable: %s", err)
            return
        up = GaugeMetricFamily("shardwright_state_store_up", "1 while the state store (Redis) answers")
        up.add_metric([], 1.0 if snap.get("store_up") else 0.0)
        yield up
        if "jobs" in snap:
            jobs = GaugeMetricFamily("shardwright_jobs", "Unfinished jobs by state, priority class and kind",
                                     labels=["state", "priority", "kind"])
            for (state, priority, kind), n in sorted(snap["jobs"].items()):
                jobs.add_metric([state, priority, kind], n)
            yield jobs
        gpus = GaugeMetricFamily("shardwright_gpus", "GPUs of the live nodes (total, free) and held by jobs",
                                 labels=["state"])
        for state in ("total", "free", "held"):
            if f"gpus_{state}" in snap:
                gpus.add_metric([state], float(snap[f"gpus_{state}"]))
        yield gpus
        requests = GaugeMetricFamily("shardwright_engine_requests", "Requests in the engine, by state",
                                     labels=["tenant", "deployment", "state"])
        blocks = GaugeMetricFamily("shardwright_kv_blocks", "KV cache blocks of the engine, used and total",
                                   labels=["tenant", "deployment", "state"])
        for tenant, name, stats in snap.get("deployments", []):
            for state in ("running", "waiting"):
                if state in stats:
                    requests.add_metric([tenant, name, state], float(stats[state]))
            for state, key in (("used", "blocks_in_use"), ("total", "blocks_total")):
                if key in stats:
                    blocks.add_metric([tenant, name, state], float(stats[key]))
        prefix = GaugeMetricFamily("shardwright_prefix_cache", "The engine's prefix cache: blocks cached, and since "
                                   "start prefill tokens saved, requests that hit, blocks evicted",
                                   labels=["tenant", "deployment", "quantity"])
        for tenant, name, stats in snap.get("deployments", []):
            for quantity in ("cached_blocks", "prefill_tokens_saved", "hit_sequences", "evictions"):
                if f"prefix_{quantity}" in stats:
                    prefix.add_metric([tenant, name, quantity], float(stats[f"prefix_{quantity}"]))
        yield requests
        yield blocks
        yield prefix
        families = {key: GaugeMetricFamily(name, text, labels=["tenant", "job"])
                    for key, (name, text) in TRAINING_SERIES.items()}
        for tenant, name, stats in snap.get("training", []):
            for key, family in families.items():
                if stats.get(key) is not None:
                    family.add_metric([tenant, name], float(stats[key]))
        yield from families.values()
