"""`shardwright serve`: the control plane (scheduler on Ray, state in Redis) behind gRPC.

Prints one JSON line `{"address": "HOST:PORT", ...}` once it is serving (so scripts and tests
can wait for it), then serves until SIGTERM/SIGINT, which drains calls for up to --grace-s
seconds. Each job's controller runs in a detached Ray actor: on a Ray cluster joined by address the
jobs keep running after the server ends and the next `serve` adopts them; with the local Ray this
process starts, running training jobs are checkpointed back into the queue.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from shardwright.config import Settings


def _health_watch(server, service, stop: threading.Event, interval_s: float = 5.0) -> None:
    """Keep the standard health status true: NOT_SERVING while Redis or the loop is down (a replica
    whose lease another holds still serves)."""
    while not stop.wait(interval_s):
        try:
            ok = service.health()["loop_running"]
        except Exception:  # a failed Redis round trip is exactly what this reports
            ok = False
        server.set_serving(ok)


def cmd_serve(args: argparse.Namespace) -> int:
    from shardwright.api.limits import MIB
    from shardwright.api.server import ServerOptions, ShardwrightServer
    from shardwright.cluster.ray_connect import connect
    from shardwright.scheduler.service import SchedulerConfig, SchedulerService

    settings = Settings.from_env()
    options = ServerOptions(host=args.host, port=args.port, health_port=args.health_port,
                            health_host=args.health_host, grace_s=args.grace_s,
                            max_message_bytes=int(args.max_request_mib * MIB), settings=settings)
    connect(settings)
    # Several servers may share one store: one holds the scheduler lease, the others serve and
    # stand by to take it over (adopting the running jobs) when it stops renewing it.
    service = SchedulerService(settings, SchedulerConfig(policy=args.policy)).start(standby=True)
    try:
        server = ShardwrightServer(service, options)
        port = server.start()
    except Exception:
        service.close()
        raise
    http = _start_http(server, args.http_port, service)
    stop = threading.Event()
    threading.Thread(target=_health_watch, args=(server, service, stop), daemon=True).start()

    def shutdown(signum, frame) -> None:
        stop.set()
        threading.Thread(target=server.stop, daemon=True).start()
        if http is not None:
            threading.Thread(target=http.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    print(json.dumps({"address": f"{args.host}:{port}", "policy": args.policy,
                      "auth": "tokens" if settings.tokens_file else "open (loopback only)",
                      "tls": bool(settings.tls_cert),
                      **({"http_address": f"{args.host}:{http.port}"} if http else {})}), flush=True)
    server.wait()
    # On a Ray cluster of its own (joined by address), the jobs' controller actors outlive this
    # server and the next `serve` adopts them; a Ray started in this process ends with it, so its
    # jobs are checkpointed back into the queue instead.
    service.close(keep_jobs=bool(settings.ray_address))
    return 0


def _start_http(server, port: int | None, service):
    """The OpenAI-compatible HTTP API beside gRPC (api/http.py) when --http-port is given."""
    if port is None:
        return None
    from shardwright.api.http import start_http

    try:
        return start_http(server, port)
    except Exception:
        server.stop()
        service.close()
        raise


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, got {text}")
    return value


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (scheduler + engines on Ray, state in Redis)",
                       description="Serve JobService, InferenceService and ClusterService. Joins the Ray "
                                   "cluster in SHARDWRIGHT_RAY_ADDRESS/RAY_ADDRESS or starts a local one; "
                                   "state in embedded Redis under SHARDWRIGHT_STATE_DIR unless "
                                   "SHARDWRIGHT_REDIS_URL is set; tokens from SHARDWRIGHT_TOKENS_FILE; TLS from "
                                   "SHARDWRIGHT_TLS_CERT/KEY (and _CLIENT_CA for mutual TLS).")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (0 picks a free one; default 50051)")
    p.add_argument("--health-port", type=int, default=None, help="extra plaintext port serving only health")
    p.add_argument("--health-host", default=None,
                   help="listen address of the health port (default: --host); health needs no token")
    p.add_argument("--policy", default="priority", choices=["fifo", "priority", "fairshare", "backfill", "las"],
                   help="scheduling policy (default priority)")
    p.add_argument("--grace-s", type=float, default=10.0, help="drain time on shutdown (default 10 s)")
    p.add_argument("--max-request-mib", type=_positive, default=4.0,
                   help="largest request accepted, in MiB; larger ones get RESOURCE_EXHAUSTED (default 4)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                        "/v1/chat/completions) on this port, same host, tokens and TLS (0 picks a free one)")
    p.set_defaults(func=cmd_serve)
