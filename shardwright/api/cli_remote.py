"""CLI commands that talk to a running server: submit, status, watch, cancel, deployments, logs,
cluster, health, and `generate --deployment`. Jobs are named by id or by name. The server address
comes from --address (default SHARDWRIGHT_ADDRESS or 127.0.0.1:50051) and the token from
SHARDWRIGHT_TOKEN, which is sent without TLS (no --ca-cert) only to a loopback address unless
--insecure is given."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from shardwright.config import JobState, Settings
from shardwright.scheduler import jobs

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
    job = {**job, "state": _state_label(job, job.get("state", ""))}
    shape = "x".join(str(layout.get(k, 1)) for k in ("tp", "pp", "cp", "dp"))
    if layout.get("ep", 1) > 1:
        shape += f" ep={layout['ep']}"
    progress = f"step={job.get('step', 0)} " if job.get("kind") == "training" else ""  # deployments have no step
    return (f"{job['job_id']:<14} {job.get('name', ''):<20} {job.get('kind', ''):<9} {job.get('state', ''):<11} "
            f"tp.pp.cp.dp={shape:<8} {progress}{job.get('message', '')}").rstrip()


TERMINAL = {state.value for state in jobs.TERMINAL}  # the wire carries the values


def _all_jobs(c, **filters) -> list[dict]:
    jobs, token = c.list(page_size=500, **filters)
    while token:
        more, token = c.list(page_size=500, page_token=token, **filters)
        jobs += more
    return jobs


def resolve_job(c, ref: str) -> dict:
    """The caller's job with id `ref`, else its newest job named `ref` (a deployment's or a
    training job's name): jobs and deployments are addressed by id or by name everywhere."""
    from shardwright.api.client import ShardwrightError

    try:
        return c.get(ref)
    except ShardwrightError as err:
        if not err.bad_input:
            raise
    named = [j for j in _all_jobs(c) if j.get("name") == ref]
    live = [j for j in named if j.get("state") not in TERMINAL] or named
    if not live:
        import grpc

        raise ShardwrightError(grpc.StatusCode.NOT_FOUND, f"no job or deployment has the id or name {ref!r}: "
                               "`shardwright status` lists yours")
    return max(live, key=lambda j: j.get("submitted_at_s", 0))


def _state_label(job: dict, state: str) -> str:
    """A running deployment is `ready` (it answers requests); other states as they are."""
    return "ready" if state == JobState.RUNNING and job.get("kind") == "inference" else state


def cmd_submit(args) -> int:
    text = Path(args.job_file).read_text()
    with client_from(args) as c:
        job = c.submit(text, idempotency_key=args.idempotency_key)
    _emit(job, args.json, f"submitted {_job_line(job)}")
    return 0


def cmd_status(args) -> int:
    with client_from(args) as c:
        if args.job_id:
            job = resolve_job(c, args.job_id)
            _emit(job, args.json, _job_line(job))
            return 0
        jobs, token = c.list(page_size=args.limit, state=args.state or "", kind=args.kind or "")
    _emit({"jobs": jobs, "next_page_token": token}, args.json,
          "\n".join(_job_line(j) for j in jobs) or "no jobs")
    return 0


def cmd_watch(args) -> int:
    """Events until the job ends, or until it reaches `--until` (ready: a deployment serving)."""
    last = None
    with client_from(args) as c:
        job = resolve_job(c, args.job_id)
        for event in c.watch(job["job_id"]):
            last = event
            label = _state_label(job, event["state"])
            if not args.json:
                metrics = " ".join(f"{k}={v:.4g}" for k, v in event.get("metrics", {}).items())
                print(f"[{event['sequence']}] {label:<11} {event.get('message', '')} {metrics}".rstrip(), flush=True)
            if args.until is not None and args.until in (label, event["state"]):
                break
    if args.json:
        print(json.dumps({"job_id": job["job_id"], "last_event": last}))
    return 0 if last is None or last.get("state") != JobState.FAILED else 1


def _event_line(event: dict, label: str | None = None) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.get("time_s", 0)))
    metrics = " ".join(f"{k}={v:.4g}" for k, v in event.get("metrics", {}).items())
    return f"{when} [{event['sequence']}] {label or event['state']:<11} {event.get('message', '')} {metrics}".rstrip()


def cmd_logs(args) -> int:
    """A job's events from the first; with -f, and then new ones until the job ends."""
    with client_from(args) as c:
        job = resolve_job(c, args.job_id)
        stored, printed = job.get("num_events", 0), []
        if not args.follow and stored == 0:
            return 0
        for event in c.watch(job["job_id"]):
            printed.append(event)
            if not args.json:
                print(_event_line(event, _state_label(job, event["state"])), flush=True)
            if not args.follow and event["sequence"] >= stored - 1:
                break
    if args.json:
        print(json.dumps({"job_id": job["job_id"], "events": printed}))
    return 0


def cmd_cancel(args) -> int:
    with client_from(args) as c:
        job = c.cancel(resolve_job(c, args.job_id)["job_id"])
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


def cmd_deployments(args) -> int:
    """The caller's deployments that are not over: name, id, state, layout and how to reach them."""
    with client_from(args) as c:
        jobs = [j for j in _all_jobs(c, kind="inference") if j.get("state") not in TERMINAL or args.all]
        address = c.address
    rows = [{"name": j["name"], "job_id": j["job_id"], "state": _state_label(j, j["state"]),
             "layout": {k: j.get("layout", {}).get(k, 1) for k in ("tp", "pp", "cp", "ep")},
             "endpoint": f"generate --deployment {j['name']} --address {address} | HTTP model {j['name']!r}",
             "message": j.get("message", "")} for j in jobs]
    human = "\n".join(f"{r['name']:<20} {r['job_id']:<14} {r['state']:<10} "
                      f"tp={r['layout']['tp']} pp={r['layout']['pp']} cp={r['layout']['cp']}"
                      + (f" ep={r['layout']['ep']}" if r['layout']['ep'] > 1 else "") + f"  {r['endpoint']}"
                      for r in rows) or "no deployments"
    _emit({"deployments": rows}, args.json, human)
    return 0


def cmd_health(args) -> int:
    with client_from(args) as c:
        status = c.health()
    _emit({"status": status}, args.json, status)
    return 0 if status == "SERVING" else 1


def cmd_generate_remote(args) -> int:
    """`generate --deployment`: the text streams to stdout as it comes; then the same stats line
    or JSON keys as a local `generate` (api/cli.py `generation_result`)."""
    from shardwright.api.cli import _parse_prompt_ids, generation_result, print_generation

    prompt = _parse_prompt_ids(args.prompt_ids) if args.prompt_ids else args.prompt
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "stop": args.stop or []}
    if args.seed is not None:
        params["seed"] = args.seed
    tokens, text, reason, prompt_tokens = [], [], "", 0
    start = time.perf_counter()
    with client_from(args) as c:
        for msg in c.generate_stream(args.deployment, prompt, **params):
            if msg.get("token_id", -1) >= 0:
                tokens.append(msg["token_id"])
            text.append(msg.get("text", ""))
            reason = msg.get("finish_reason") or reason
            prompt_tokens = msg.get("prompt_tokens") or prompt_tokens
            if not args.json:
                sys.stdout.write(msg.get("text", ""))
                sys.stdout.flush()
    if not args.json:
        print()
    result = generation_result(tokens, "".join(text), prompt_tokens, reason, start, deployment=args.deployment)
    print_generation(result, args.json, f"through deployment {args.deployment!r} at {c.address}")
    return 0


def add_remote_commands(sub) -> None:
    """Register the client commands on the CLI's subparsers."""
    def common(p) -> None:
        p.add_argument("--address", default=os.environ.get("SHARDWRIGHT_ADDRESS", DEFAULT_ADDRESS),
                       help=f"server host[:port] (port 50051 when omitted; default SHARDWRIGHT_ADDRESS or "
                            f"{DEFAULT_ADDRESS})")
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
    p.add_argument("job_id", nargs="?", help="a job id or a job's or deployment's name; omit to list")
    p.add_argument("--state", help="filter the list by state")
    p.add_argument("--kind", choices=["training", "inference"], help="filter the list by kind")
    p.add_argument("--limit", type=int, default=50, help="jobs per page (default 50)")
    common(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("watch", help="stream a job's events until it ends (or reaches --until)")
    p.add_argument("job_id", help="a job id, or the name of a job or deployment")
    p.add_argument("--until", metavar="STATE",
                   help="return once the job reaches STATE (ready: a deployment is serving; or running, ...)")
    common(p)
    p.set_defaults(func=cmd_watch)
    p = sub.add_parser("logs", help="a job's events (state changes, progress, errors); -f follows")
    p.add_argument("job_id", help="a job id, or the name of a job or deployment")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until the job ends")
    common(p)
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("cancel", help="cancel a job or stop a deployment")
    p.add_argument("job_id", help="a job id, or the name of a job or deployment")
    common(p)
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("deployments", help="your deployments: name, id, state, layout, endpoint")
    p.add_argument("--all", action="store_true", help="also those that have ended")
    common(p)
    p.set_defaults(func=cmd_deployments)
    for name, fn, text in (("cluster", cmd_cluster, "nodes, GPUs, free memory and running gangs"),
                           ("health", cmd_health, "the server's standard health check (exit 0 when SERVING)")):
        p = sub.add_parser(name, help=text)
        common(p)
        p.set_defaults(func=fn)
