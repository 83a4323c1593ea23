"""`shardwright stop`: end what `serve` leaves running for a state dir, on purpose.

`serve` without a Ray address starts a local Ray head of its own that outlives it (the jobs keep
running on it; the next `serve` adopts them), and its embedded Redis outlives a `serve` killed with
SIGKILL. `stop` ends both: first it checkpoints and stops every job on the head, each recorded
`preempted` (SchedulerService.drain: training keeps the step it reached, and the next `serve`
resumes it from that checkpoint), then it ends the head and the Redis server, whose data stays in
the state dir. It refuses while `serve` processes still use the embedded Redis, unless
`--force` (exit status 2). Idempotent: with nothing running it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from shardwright.config import Settings

log = logging.getLogger(__name__)


def cmd_stop(args: argparse.Namespace) -> int:
    from shardwright.cluster.local_head import find_head, stop_head
    from shardwright.cluster.redis_server import embedded_server, stop_embedded

    state_dir = Path(args.state_dir) if args.state_dir else Settings.from_env().state_dir
    try:
        redis_server = embedded_server(state_dir)
    except ConnectionError as err:
        if not args.force:
            raise ValueError(f"{err}; pass --force to stop it and the Ray head anyway") from err
        redis_server = None
    if redis_server is not None and redis_server[1] > 0 and not args.force:
        raise ValueError(f"{redis_server[1]} connections of other processes still use the embedded Redis of "
                         f"{state_dir} (pid {redis_server[0]}), `serve` replicas most likely: stop them first "
                         "(SIGTERM; their jobs keep running), or pass --force to end the Ray head and Redis under them")
    drained = _drain(state_dir) if find_head(state_dir) is not None else []
    head = stop_head(state_dir)
    # draining opened the store: closing it may have stopped the embedded Redis already (saving)
    redis_pid = stop_embedded(state_dir) or (redis_server[0] if redis_server else None)
    result = {"state_dir": str(state_dir),
              "ray_head": {"pid": head.pid, "address": head.address} if head else None,
              "redis_pid": redis_pid, "checkpointed_jobs": drained or []}
    if args.json:
        print(json.dumps(result))
        return 0
    if head is None and redis_pid is None:
        print(f"nothing to stop: no local Ray head or embedded Redis runs for {state_dir}")
    if drained:
        print(f"checkpointed and stopped {len(drained)} jobs, recorded preempted: {', '.join(drained)}")
    if head is not None:
        print(f"stopped the local Ray head at {head.address} (pid {head.pid}) of {state_dir}, and with it the "
              "jobs on it: the next `serve` requeues them (training resumes from its last checkpoint)")
    if redis_pid is not None:
        print(f"stopped the embedded Redis (pid {redis_pid}); its data stays in {state_dir / 'redis'}")
    return 0


def _drain(state_dir: Path) -> list[str] | None:
    """Checkpoint and stop the jobs of the state dir's head (SchedulerService.drain); their ids, or
    None when that could not be done (the head then ends them anyway: the next `serve` requeues them
    from their last recorded checkpoints)."""
    import ray

    from shardwright.cluster.ray_connect import connect_serving
    from shardwright.scheduler.service import SchedulerService

    settings = Settings.from_env().model_copy(update={"state_dir": state_dir, "ray_address": None})
    try:
        connect_serving(settings)
        service = SchedulerService(settings)
        try:
            return service.drain("`shardwright stop` ends the Ray head")
        finally:
            service.close()
    except Exception as err:  # a broken head or store: stopping must go on
        log.warning("could not checkpoint the jobs before stopping: %s", err)
        return None
    finally:
        ray.shutdown()


def add_stop_command(sub) -> None:
    p = sub.add_parser("stop", help="end the local Ray head (and embedded Redis) that serve left running",
                       description="End the local Ray head that `serve` started for a state dir (it outlives "
                                   "`serve`, keeping the jobs running) and the embedded Redis if it still runs. "
                                   "The jobs on the head end; the job records stay, and the next `serve` "
                                   "requeues them. Does nothing, successfully, when nothing runs.")
    p.add_argument("--state-dir", default=None,
                   help="the state dir `serve` used (default SHARDWRIGHT_STATE_DIR, else ~/.shardwright)")
    p.add_argument("--force", action="store_true",
                   help="stop even while `serve` processes still use the state dir (they lose their Ray cluster)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: state_dir, ray_head (pid, address, or null), redis_pid (or null), "
                        "checkpointed_jobs (the ids of the jobs checkpointed and stopped first)")
    p.set_defaults(func=cmd_stop)
