"""The Shardwright gRPC server (`shardwright serve`).

Serves JobService, InferenceService and ClusterService over one control plane, plus the
standard grpc.health.v1 health service and, with `reflection`, server reflection. Guarantees:
- every call but health needs a bearer token when a tokens file is configured (reflection too);
  without one the server runs single-tenant and refuses to listen beyond loopback; with one,
  beyond loopback only over TLS unless `insecure` (a logged warning);
- no caller can stall the others (api/limits.py CallLimits): streams and Generate run on threads
  beyond the short calls' share and are capped per tenant, per unauthenticated peer IP and in
  total (RESOURCE_EXHAUSTED naming the limit and its flag); gRPC refuses calls beyond
  `max_concurrent_rpcs`; generations have a default and a maximum deadline; WatchJob streams
  end after a maximum age with the sequence to resume from (Client.watch reconnects);
- requests larger than `max_message_bytes` are refused with RESOURCE_EXHAUSTED and a message naming
  the limit (api/limits.py), and the server keeps serving;
- a call's deadline bounds its work: a generation still running when it passes is cancelled;
- shutdown (SIGTERM/SIGINT or `stop()`) first reports NOT_SERVING (and keeps reporting it), then
  refuses new calls (UNAVAILABLE) and lets running calls and streams finish for up to `grace_s`
  seconds; WatchJob streams end at once with UNAVAILABLE and the sequence to resume from;
- TLS (and mutual TLS with a client CA) from PEM files; an optional plaintext port serves only
  health checks (Kubernetes' gRPC probes cannot speak TLS), on its own host if given (so that an
  unauthenticated server on loopback can still be probed from outside its pod).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardwright.api.auth import AuthInterceptor, Authenticator, load_tokens
from shardwright.api.limits import CallGuard, CallLimits, StreamSlots, core_limit_bytes
from shardwright.api.metrics import ServiceMetrics
from shardwright.api.gen.shardwright.v1 import cluster_pb2, cluster_pb2_grpc, inference_pb2, inference_pb2_grpc
from shardwright.api.gen.shardwright.v1 import jobs_pb2, jobs_pb2_grpc
from shardwright.api.servicers.inference import InferenceServicer
from shardwright.api.servicers.jobs import ClusterServicer, JobServicer
from shardwright.config import Settings

log = logging.getLogger(__name__)
SERVICES = ("shardwright.v1.JobService", "shardwright.v1.InferenceService", "shardwright.v1.ClusterService")


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    health_port: int | None = None
    health_host: str | None = None  # None: `host`; health needs no token, so it may listen wider
    max_message_bytes: int = 4 * 1024 * 1024
    grace_s: float = 10.0
    limits: CallLimits = field(default_factory=CallLimits)
    reflection: bool = False  # server reflection (behind the token when the server has tokens)
    insecure: bool = False  # allow tokens over plaintext beyond loopback (logged as a warning)
    settings: Settings = field(default_factory=Settings.from_env)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, authenticated: bool, tls: bool = False, insecure: bool = False) -> None:
    """Raise ValueError unless the API may listen on `host`: beyond loopback only with tokens, and
    with tokens only over TLS unless `insecure` (then it logs a warning: tokens travel in cleartext)."""
    if _is_loopback(host):
        return
    if not authenticated:
        raise ValueError(f"refusing to listen on {host} without authentication: set "
                         "SHARDWRIGHT_TOKENS_FILE (token: tenant lines) or listen on 127.0.0.1")
    if not tls and not insecure:
        raise ValueError(f"refusing to listen on {host} with bearer tokens over plaintext: set SHARDWRIGHT_TLS_CERT "
                         "and SHARDWRIGHT_TLS_KEY, listen on 127.0.0.1, or pass --insecure to send tokens in cleartext")
    if not tls:
        log.warning("--insecure: listening on %s with bearer tokens over plaintext; anyone on the network path "
                    "can read them", host)


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both SHARDWRIGHT_TLS_CERT and SHARDWRIGHT_TLS_KEY")
    pair = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    if settings.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=settings.tls_client_ca.read_bytes(),
                                       require_client_auth=True)


class ShardwrightServer:
    """The gRPC front of one control plane."""

    def __init__(self, control, options: ServerOptions) -> None:
        self.control, self.options = control, options
        tokens = load_tokens(options.settings.tokens_file) if options.settings.tokens_file else None
        settings = options.settings
        check_listen(options.host, authenticated=tokens is not None,
                     tls=settings.tls_cert is not None or settings.tls_key is not None, insecure=options.insecure)
        self.auth = Authenticator(tokens)
        # shared with the HTTP API (api/http.py) and --metrics-port
        self.metrics = ServiceMetrics(control if hasattr(control, "metrics_snapshot") else None)
        self.stopping = threading.Event()
        self.health = health.HealthServicer()
        self.server = self._build()
        self.health_server = self._build_health_only() if options.health_port else None
        self.port = 0

    def _build(self) -> grpc.Server:
        limit = self.options.max_message_bytes
        opts = [("grpc.max_receive_message_length", core_limit_bytes(limit)),
                ("grpc.max_send_message_length", limit)]
        limits = self.options.limits
        self.guard = CallGuard(self.auth, limits, limit)
        interceptors = [AuthInterceptor(self.auth), self.guard]  # the first runs first
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.threads, thread_name_prefix="grpc"),
                             interceptors=interceptors, options=opts,
                             maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(self.control, self.auth, self.stopping, max_age_s=limits.watch_max_age_s), server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.control, self.auth, limits, self.metrics), server)
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(ClusterServicer(self.control, self.auth), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
                 inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
                 cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        if self.options.reflection:
            reflection.enable_server_reflection(names, server)
        return server

    def _build_health_only(self) -> grpc.Server:
        """The plaintext health port: its Watch streams are capped like the main port's (per peer
        and in total, on threads beyond the 4 that answer Check)."""
        limits = self.options.limits
        guard = CallGuard(self.auth, limits, 64 * 1024, StreamSlots(limits))
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4 + limits.max_streams), interceptors=[guard],
                             maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    def start(self) -> int:
        """Bind and start; returns the bound port (an OS-chosen one when options.port is 0)."""
        address = f"{self.options.host}:{self.options.port}"
        creds = _credentials(self.options.settings)
        self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}: in use or not permitted; choose another --port")
        if self.health_server is not None:
            health_host = self.options.health_host or self.options.host
            if self.health_server.add_insecure_port(f"{health_host}:{self.options.health_port}") == 0:
                raise OSError(f"cannot bind the health port {health_host}:{self.options.health_port}; "
                              "choose another --health-port")
            self.health_server.start()
        self.server.start()
        self.set_serving(True)
        log.info("shardwright serving on %s:%d (%s)", self.options.host, self.port, "TLS" if creds else "plaintext")
        return self.port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            self.health.set(name, status)

    def stop(self) -> None:
        """Graceful: NOT_SERVING first, then drain calls and streams for up to grace_s."""
        self.health.enter_graceful_shutdown()  # NOT_SERVING everywhere; later set_serving calls are ignored
        self.stopping.set()
        self.server.stop(self.options.grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0)
        self.metrics.close()

    def wait(self) -> None:
        self.server.wait_for_termination()
