"""`shardwright serve`: the control plane (scheduler on Ray, state in Redis) behind gRPC.

Prints one JSON line `{"address": "HOST:PORT", ...}` once it is serving (so scripts and tests
can wait for it), then serves until SIGTERM/SIGINT, which drains calls for up to --grace-s
seconds. Each job's controller runs in a detached Ray actor on a Ray cluster that outlives the
server: the one joined by address, else the local head of the state dir (cluster/local_head.py),
started by the first `serve` as a process of its own (progress lines in the log) and joined by the
later ones. So the jobs keep running after the server ends, cleanly or killed, and the next `serve`
on the store adopts them; `shardwright stop` ends the local head (api/stop.py).
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
    from shardwright.api.limits import FLAGS, MIB, CallLimits
    from shardwright.api.server import ServerOptions, ShardwrightServer, check_listen
    from shardwright.cluster.ray_connect import connect_serving
    from shardwright.scheduler.service import SchedulerConfig, SchedulerService

    from shardwright.api.metrics import configure_logging

    configure_logging(args.log_format)
    settings = Settings.from_env()
    limits = CallLimits(**{name: getattr(args, name) for name in FLAGS})
    options = ServerOptions(host=args.host, port=args.port, health_port=args.health_port,
                            health_host=args.health_host, grace_s=args.grace_s,
                            max_message_bytes=int(args.max_request_mib * MIB), limits=limits,
                            reflection=args.reflection, insecure=args.insecure, settings=settings)
    # Refuse a listen address that would leak tokens before anything is started (Ray, Redis).
    check_listen(args.host, authenticated=settings.tokens_file is not None,
                 tls=settings.tls_cert is not None or settings.tls_key is not None, insecure=args.insecure)
    connect_serving(settings, num_gpus=args.num_gpus, num_cpus=args.num_cpus)  # progress lines in the log
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
    metrics_host = args.metrics_host or args.host
    metrics_port = _start_metrics(server, args.metrics_port, metrics_host, service)
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
                      **({"http_address": f"{args.host}:{http.port}"} if http else {}),
                      **({"metrics_address": f"{metrics_host}:{metrics_port}"} if metrics_port else {})}), flush=True)
    server.wait()
    # The Ray cluster outlives this server (joined by address, or the local head): the jobs'
    # controller actors keep running and the next `serve` adopts them.
    service.close(keep_jobs=True)
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


def _start_metrics(server, port: int | None, host: str, service) -> int | None:
    """Prometheus text on its own port (--metrics-port), for servers without the HTTP API."""
    if port is None:
        return None
    from prometheus_client import start_http_server

    try:
        httpd, _ = start_http_server(port, addr=host, registry=server.metrics.registry)
    except OSError as err:
        server.stop()
        service.close()
        raise OSError(f"cannot bind the metrics port {host}:{port} ({err.strerror}); choose another "
                      "--metrics-port") from err
    return httpd.server_address[1]


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _add_limit_flags(p) -> None:
    """The overload limits (api/limits.py CallLimits); defaults from there."""
    from shardwright.api.limits import FLAGS, CallLimits

    d = CallLimits()
    helps = {
        "max_workers": f"threads for short calls (everything but streams and Generate); default {d.max_workers}",
        "max_concurrent_rpcs": "calls in flight beyond which gRPC answers RESOURCE_EXHAUSTED at once; "
                               f"default {d.max_concurrent_rpcs}",
        "max_streams": "streams and Generate calls open at once, all callers together (each holds a thread of "
                       f"its own, beyond --max-workers); default {d.max_streams}",
        "max_streams_per_tenant": f"streams and Generate calls one tenant may hold open; default "
                                  f"{d.max_streams_per_tenant}",
        "max_streams_per_peer": "streams (health Watch, reflection) one IP address without a token may hold "
                                f"open; default {d.max_streams_per_peer}",
        "generate_default_deadline_s": "deadline of a Generate/GenerateStream call that sets none; default "
                                       f"{d.generate_default_deadline_s:g} s",
        "generate_max_deadline_s": "longest a Generate/GenerateStream call may run, whatever its deadline; "
                                   f"default {d.generate_max_deadline_s:g} s",
        "watch_max_age_s": "a WatchJob stream ends after this long with the sequence to resume from (the "
                           f"client reconnects); default {d.watch_max_age_s:g} s",
    }
    for name, flag in FLAGS.items():
        kind = _seconds if name.endswith("_s") else _positive_int
        p.add_argument(flag, dest=name, type=kind, default=getattr(d, name), help=helps[name])


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (scheduler + engines on Ray, state in Redis)",
                       description="Serve JobService, InferenceService and ClusterService. Joins the Ray "
                                   "cluster in SHARDWRIGHT_RAY_ADDRESS/RAY_ADDRESS, else the local Ray head of "
                                   "the state dir, started as a process of its own if none runs (it outlives "
                                   "serve, and its jobs with it; `shardwright stop` ends it); "
                                   "state in embedded Redis under SHARDWRIGHT_STATE_DIR unless "
                                   "SHARDWRIGHT_REDIS_URL is set; tokens from SHARDWRIGHT_TOKENS_FILE; TLS from "
                                   "SHARDWRIGHT_TLS_CERT/KEY (and _CLIENT_CA for mutual TLS).")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (0 picks a free one; default 50051)")
    p.add_argument("--health-port", type=int, default=None, help="extra plaintext port serving only health")
    p.add_argument("--health-host", default=None,
                   help="listen address of the health port (default: --host); health needs no token")
    p.add_argument("--num-gpus", type=_positive_int, default=None,
                   help="GPUs of the local Ray head when serve starts it (default: the CUDA devices, else 4 "
                        "logical ones); not for a cluster joined by address")
    p.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="CPUs of the local Ray head when serve starts it (default: Ray's count)")
    p.add_argument("--policy", default="priority", choices=["fifo", "priority", "fairshare", "backfill", "las"],
                   help="scheduling policy (default priority)")
    p.add_argument("--grace-s", type=float, default=10.0, help="drain time on shutdown (default 10 s)")
    p.add_argument("--max-request-mib", type=_positive, default=4.0,
                   help="largest request accepted, in MiB; larger ones get RESOURCE_EXHAUSTED (default 4)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                        "/v1/chat/completions) on this port, same host, tokens and TLS (0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at /metrics on this port, same host, no token (0 picks a free "
                        "one); with --http-port they are also at its /metrics")
    p.add_argument("--metrics-host", default=None,
                   help="listen address of --metrics-port (default: --host); the metrics carry tenant and "
                        "deployment names and counts, no token or request content")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines on stderr: text (default) or one JSON object a line; one line per finished "
                        "request and per job transition")
    p.add_argument("--reflection", action="store_true",
                   help="serve gRPC server reflection (behind the token when SHARDWRIGHT_TOKENS_FILE is set)")
    p.add_argument("--insecure", action="store_true",
                   help="allow bearer tokens over plaintext on a non-loopback --host (logged as a warning); "
                        "without it such a server needs SHARDWRIGHT_TLS_CERT and SHARDWRIGHT_TLS_KEY")
    _add_limit_flags(p)
    p.set_defaults(func=cmd_serve)
