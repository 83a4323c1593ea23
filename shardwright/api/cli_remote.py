"""CLI commands that talk to a running server: submit, status, watch, cancel, cluster, health,
and `generate --deployment`. The server address comes from --address (default
SHARDWRIGHT_ADDRESS or 127.0.0.1:50051) and the token from SHARDWRIGHT_TOKEN, which is sent
without TLS (no --ca-cert) only to a loopback address unless --insecure is given."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shardwright.config import Settings

DEFAULT_ADDRESS = "127.0.0.1:50051"


def client_from(args: argparse.Namespace):
    from shardwright.api.client import Client

    settings = Settings.from_env()
    return Client(args.address, token=settings.token, ca_cert=getattr(args, "ca_cert", None),
                  client_cert=getattr(args, "client_cert", None), client_key=getattr(args, "client_key", None),
                  insecure=getattr(args, "insecure", False))


def _emit(result, as_json: bool, human: str) -> None:
    print(json.dumps(result) if as_json else human)


def _job_line(job: dict) -> str:
    layout = job.get("layout", {})
    shape = "x".join(str(layout.get(k, 1)) for k in ("tp", "pp", "cp", "dp"))
    return (f"{job['job_id']:<14} {job.get('name', ''):<20} {job.get('kind', ''):<9} {job.get('state', ''):<11} "
            f"tp.pp.cp.dp={shape:<8} step={job.get('step', 0)} {job.get('message', '')}")


def cmd_submit(args) -> int:
    text = Path(args.job_file).read_text()
    with client_from(args) as c:
        job = c.submit(text, idempotency_key=args.idempotency_key)
    _emit(job, args.json, f"submitted {_job_line(job)}")
    return 0


def cmd_status(args) -> int:
    with client_from(args) as c:
        if args.job_id:
            job = c.get(args.job_id)
            _emit(job, args.json, _job_line(job))
            return 0
        jobs, token = c.list(page_size=args.limit, state=args.state or "", kind=args.kind or "")
    _emit({"jobs": jobs, "next_page_token": token}, args.json,
          "\n".join(_job_line(j) for j in jobs) or "no jobs")
    return 0


def cmd_watch(args) -> int:
    last = None
    with client_from(args) as c:
        for event in c.watch(args.job_id):
            last = event
            if not args.json:
                metrics = " ".join(f"{k}={v:.4g}" for k, v in event.get("metrics", {}).items())
                print(f"[{event['sequence']}] {event['state']:<11} {event.get('message', '')} {metrics}".rstrip())
    if args.json:
        print(json.dumps({"job_id": args.job_id, "last_event": last}))
    return 0 if last is None or last.get("state") != "failed" else 1


def cmd_cancel(args) -> int:
    with client_from(args) as c:
        job = c.cancel(args.job_id)
    _emit(job, args.json, f"cancelled {_job_line(job)}")
    return 0


def cmd_cluster(args) -> int:
    with client_from(args) as c:
        info = c.cluster()
    lines = [f"{n['node_id'][:12]} {n['address']:<15} GPUs {n['gpus_free']:g}/{n['gpus_total']:g} free "
             f"mem {int(n['memory_free_bytes']) / 2**30:.1f} GiB free" for n in info.get("nodes", [])]
    for g in info.get("gangs", []):
        lines.append(f"gang {g['job_id']} ({g['kind']}): {', '.join(g.get('workers', []))}")
        if g.get("memory_budget_bytes"):
            lines.append(f"  memory budget {g['memory_budget_bytes']} bytes per worker, "
                         f"{g.get('memory_peers', 0)} memory peers")
        lines += [f"  {line}" for line in g.get("memory_plan", [])]
    _emit(info, args.json, "\n".join(lines))
    return 0


def cmd_health(args) -> int:
    with client_from(args) as c:
        status = c.health()
    _emit({"status": status}, args.json, status)
    return 0 if status == "SERVING" else 1


def cmd_generate_remote(args) -> int:
    prompt = [int(x) for x in args.prompt_ids.split(",")] if args.prompt_ids else args.prompt
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p}
    if args.seed is not None:
        params["seed"] = args.seed
    tokens, text, reason = [], [], ""
    with client_from(args) as c:
        for msg in c.generate_stream(args.deployment, prompt, **params):
            if msg.get("token_id", -1) >= 0:
                tokens.append(msg["token_id"])
            text.append(msg.get("text", ""))
            reason = msg.get("finish_reason") or reason
            if not args.json:
                sys.stdout.write(msg.get("text", ""))
                sys.stdout.flush()
    if args.json:
        print(json.dumps({"tokens": tokens, "text": "".join(text), "finish_reason": reason}))
    else:
        print()
    return 0


def add_remote_commands(sub) -> None:
    """Register the client commands on the CLI's subparsers."""
    def common(p) -> None:
        p.add_argument("--address", default=os.environ.get("SHARDWRIGHT_ADDRESS", DEFAULT_ADDRESS),
                       help=f"server host:port (default SHARDWRIGHT_ADDRESS or {DEFAULT_ADDRESS})")
        p.add_argument("--ca-cert", type=Path, help="CA certificate to verify a TLS server")
        p.add_argument("--client-cert", type=Path, help="client certificate for mutual TLS")
        p.add_argument("--client-key", type=Path, help="client key for mutual TLS")
        p.add_argument("--insecure", action="store_true",
                       help="send the token (SHARDWRIGHT_TOKEN) without TLS to a non-loopback address; refused otherwise")
        p.add_argument("--json", action="store_true", help="print one JSON object last")

    p = sub.add_parser("submit", help="submit a job file to the server")
    p.add_argument("job_file", help="YAML job file (kind: training | inference)")
    p.add_argument("--idempotency-key", help="submitting again with the same key returns the same job")
    common(p)
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("status", help="show one job, or list jobs")
    p.add_argument("job_id", nargs="?", help="a job id; omit to list")
    p.add_argument("--state", help="filter the list by state")
    p.add_argument("--kind", choices=["training", "inference"], help="filter the list by kind")
    p.add_argument("--limit", type=int, default=50, help="jobs per page (default 50)")
    common(p)
    p.set_defaults(func=cmd_status)
    for name, fn, text in (("watch", cmd_watch, "stream a job's events until it ends"),
                           ("cancel", cmd_cancel, "cancel a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        common(p)
        p.set_defaults(func=fn)
    for name, fn, text in (("cluster", cmd_cluster, "nodes, GPUs, free memory and running gangs"),
                           ("health", cmd_health, "the server's standard health check (exit 0 when SERVING)")):
        p = sub.add_parser(name, help=text)
        common(p)
        p.set_defaults(func=fn)
