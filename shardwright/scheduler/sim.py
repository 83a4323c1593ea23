"""Trace-driven discrete-event simulator for the scheduling policies.

It runs the same policy and placement objects as the live scheduler against a simulated cluster.
Events are arrivals, completions and policy reviews (`SchedulingPolicy.next_review_s`); all events at
one instant are applied (completions first, then arrivals) and then one scheduling pass runs, whose
decisions are applied in order (preemptions, then starts). Deterministic: no clocks, no randomness;
ties break by event kind, then insertion order.

Preemption model (stated, configurable in `SimOptions`): a preempted training job keeps all progress
up to its last checkpoint. With `checkpoint_interval_s == 0` (the default) it checkpoints on demand
when preempted and loses no work; otherwise progress since the last multiple of the interval (counted
from its restart) is lost. Every restart after a preemption first spends `restart_overhead_s` (default
30 s) reloading before progress resumes. A job's first start has no overhead.

Metrics: JCT = end - submit; queueing delay = first start - submit; wait = JCT - duration (all time
not spent on the job's own work: queueing, requeues after preemption, restarts, lost work);
makespan = stop - first submit;
utilization = useful GPU-seconds (progress kept) / (GPUs x makespan), `allocated_utilization` counts
lost work and restart overhead too. Jobs that can never run are rejected at arrival, not simulated.

Run: `python -m shardwright.scheduler.sim --trace CSV --nodes N --gpus-per-node G --policy las --json`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from shardwright.scheduler.model import ClusterInventory, Job, RunningJob
from shardwright.scheduler.policies import (
    POLICY_NAMES,
    PreemptJob,
    ReserveJob,
    SchedulingPolicy,
    StartJob,
    make_policy,
)
from shardwright.scheduler.traces import TRACE_FORMATS, load_trace

_COMPLETE, _ARRIVE, _REVIEW = 0, 1, 2


@dataclass(frozen=True)
class SimOptions:
    """Preemption cost model and an optional stop time (`horizon_s`, absolute simulated seconds)."""

    checkpoint_interval_s: float = 0.0
    restart_overhead_s: float = 30.0
    horizon_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("checkpoint_interval_s", "restart_overhead_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number of seconds >= 0")


@dataclass
class SimOutcome:
    """What happened to one job in a simulated run (the live scheduler's stored job is
    scheduler.jobs.JobRecord). Times are simulated seconds."""

    job: Job
    first_start_s: float | None = None
    end_s: float | None = None
    work_done_s: float = 0.0
    num_preemptions: int = 0
    first_reservation_s: float | None = None
    rejected: str | None = None


@dataclass(frozen=True)
class SimReport:
    """Figures of one run; `to_json` drops the per-job records."""

    policy: str
    num_gpus: int
    num_jobs: int
    num_completed: int
    num_rejected: int
    num_unfinished: int
    avg_jct_s: float
    p50_jct_s: float
    p99_jct_s: float
    avg_queue_s: float
    avg_wait_s: float
    makespan_s: float
    utilization: float
    allocated_utilization: float
    num_preemptions: int
    lost_gpu_s: float
    num_passes: int
    fairness_jain_gpu_s: float
    fairness_jain_slowdown: float
    tenant_gpu_s: dict[str, float]
    records: dict[str, SimOutcome] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, object]:
        figures = asdict(self)
        figures.pop("records")
        return figures


@dataclass
class _Run:
    running: RunningJob
    overhead_s: float
    generation: int


class Simulator:
    """Replays jobs against `cluster` with `policy`. One `Simulator` runs one trace once."""

    def __init__(
        self, policy: SchedulingPolicy, cluster: ClusterInventory, options: SimOptions | None = None
    ):
        self.policy, self.options = policy, options or SimOptions()
        self.inventory = cluster.copy()
        self.queue: dict[str, Job] = {}
        self.running: dict[str, _Run] = {}
        self.records: dict[str, SimOutcome] = {}
        self._events: list[tuple[float, int, int, str, int]] = []
        self._seq = 0
        self._review_s: float | None = None
        self._allocated_gpu_s: Counter[str] = Counter()
        self._lost_gpu_s = 0.0
        self._passes = 0

    def run(self, jobs: Sequence[Job]) -> SimReport:
        """Simulate until every job has ended (or `horizon_s`) and report."""
        for job in jobs:
            if job.job_id in self.records:
                raise ValueError(f"job_id {job.job_id!r} appears twice in the trace; job ids must be unique")
            self.records[job.job_id] = SimOutcome(job)
            self._push(job.submit_time_s, _ARRIVE, job.job_id, 0)
        last_change_s = 0.0
        horizon = self.options.horizon_s
        while self._events and (horizon is None or self._events[0][0] <= horizon):
            now_s = self._events[0][0]
            if self._apply_events_at(now_s):
                last_change_s = now_s
                self._schedule(now_s)
        stop_s = horizon if horizon is not None and (self._events or self.running) else last_change_s
        self._account_unfinished(stop_s)
        return self._report(stop_s)

    def _push(self, time_s: float, kind: int, job_id: str, generation: int) -> None:
        heapq.heappush(self._events, (time_s, kind, self._seq, job_id, generation))
        self._seq += 1

    def _apply_events_at(self, now_s: float) -> bool:
        """Apply every event at `now_s`; True if any changed state or asked for a pass."""
        changed = False
        while self._events and self._events[0][0] == now_s:
            _, kind, _, job_id, generation = heapq.heappop(self._events)
            if kind == _COMPLETE:
                run = self.running.get(job_id)
                if run is not None and run.generation == generation:
                    self._complete(job_id, now_s)
                    changed = True
            elif kind == _ARRIVE:
                self._arrive(self.records[job_id].job)
                changed = True
            elif self._review_s == now_s:
                changed = True
        return changed

    def _arrive(self, job: Job) -> None:
        try:
            self.policy.check_submission(job, self.inventory)
        except ValueError as err:
            self.records[job.job_id].rejected = str(err)
            return
        self.queue[job.job_id] = job

    def _schedule(self, now_s: float) -> None:
        self._passes += 1
        running = [run.running for run in self.running.values()]
        for decision in self.policy.schedule(list(self.queue.values()), running, self.inventory, now_s):
            if isinstance(decision, PreemptJob):
                self._preempt(decision.job_id, now_s)
            elif isinstance(decision, StartJob):
                self._start(decision, now_s)
            elif isinstance(decision, ReserveJob):
                record = self.records[decision.job_id]
                if record.first_reservation_s is None:
                    record.first_reservation_s = decision.start_time_s
        review_s = self.policy.next_review_s(
            list(self.queue.values()), [run.running for run in self.running.values()], now_s
        )
        self._review_s = review_s if review_s is not None and review_s > now_s else None
        if self._review_s is not None:
            self._push(self._review_s, _REVIEW, "", 0)

    def _start(self, decision: StartJob, now_s: float) -> None:
        job = self.queue.pop(decision.job_id)
        record = self.records[job.job_id]
        gpus_by_node = decision.placement.gpus_by_node
        self.inventory.allocate(gpus_by_node)
        overhead_s = self.options.restart_overhead_s if record.num_preemptions else 0.0
        end_s = now_s + overhead_s + (job.duration_s or math.inf) - record.work_done_s
        generation = record.num_preemptions
        self.running[job.job_id] = _Run(RunningJob(job, gpus_by_node, now_s, end_s), overhead_s, generation)
        if record.first_start_s is None:
            record.first_start_s = now_s
        if math.isfinite(end_s):
            self._push(end_s, _COMPLETE, job.job_id, generation)

    def _stop(self, job_id: str, now_s: float) -> tuple[_Run, float]:
        """Release a running job's GPUs; returns the run and its elapsed seconds."""
        run = self.running.pop(job_id)
        self.inventory.release(run.running.gpus_by_node)
        elapsed_s = now_s - run.running.start_time_s
        self._allocated_gpu_s[run.running.job.tenant] += run.running.job.num_gpus * elapsed_s
        return run, elapsed_s

    def _complete(self, job_id: str, now_s: float) -> None:
        run, _ = self._stop(job_id, now_s)
        record = self.records[job_id]
        record.work_done_s = run.running.job.duration_s or record.work_done_s
        record.end_s = now_s

    def _preempt(self, job_id: str, now_s: float) -> None:
        run = self.running.get(job_id)
        if run is None or not run.running.job.preemptible:
            raise RuntimeError(
                f"policy {self.policy.name} preempted {job_id}, which is not a running training job"
            )
        run, elapsed_s = self._stop(job_id, now_s)
        progress_s = max(0.0, elapsed_s - run.overhead_s)
        interval = self.options.checkpoint_interval_s
        saved_s = math.floor(progress_s / interval) * interval if interval > 0 else progress_s
        job = run.running.job
        record = self.records[job_id]
        record.work_done_s += saved_s
        record.num_preemptions += 1
        self._lost_gpu_s += job.num_gpus * (elapsed_s - saved_s)
        attained = job.attained_service_gpu_s + job.num_gpus * elapsed_s
        self.queue[job_id] = replace(job, attained_service_gpu_s=attained, queued_since_s=now_s)

    def _account_unfinished(self, stop_s: float) -> None:
        """Count GPU time of jobs still running at the stop (horizon) as allocated, progress as done."""
        for job_id in list(self.running):
            run, elapsed_s = self._stop(job_id, stop_s)
            self.records[job_id].work_done_s += max(0.0, elapsed_s - run.overhead_s)

    def _report(self, stop_s: float) -> SimReport:
        records = self.records
        done = [r for r in records.values() if r.end_s is not None]
        jcts = sorted(r.end_s - r.job.submit_time_s for r in done)  # type: ignore[operator]
        started = [r.first_start_s - r.job.submit_time_s for r in done if r.first_start_s is not None]
        waits = [r.end_s - r.job.submit_time_s - r.job.duration_s for r in done]  # type: ignore[operator]
        origin_s = min((r.job.submit_time_s for r in records.values() if r.rejected is None), default=stop_s)
        makespan_s = max(0.0, stop_s - origin_s)
        capacity_gpu_s = self.inventory.num_gpus * makespan_s
        useful = sum(r.work_done_s * r.job.num_gpus for r in records.values())
        allocated = sum(self._allocated_gpu_s.values())
        tenants = sorted({r.job.tenant for r in records.values() if r.rejected is None})
        tenant_gpu_s = {t: round(self._allocated_gpu_s[t], 3) for t in tenants}
        return SimReport(
            policy=self.policy.name,
            num_gpus=self.inventory.num_gpus,
            num_jobs=len(records),
            num_completed=len(done),
            num_rejected=sum(r.rejected is not None for r in records.values()),
            num_unfinished=sum(r.end_s is None and r.rejected is None for r in records.values()),
            avg_jct_s=_mean(jcts),
            p50_jct_s=percentile(jcts, 50),
            p99_jct_s=percentile(jcts, 99),
            avg_queue_s=_mean(started),
            avg_wait_s=_mean(waits),
            makespan_s=makespan_s,
            utilization=useful / capacity_gpu_s if capacity_gpu_s else 0.0,
            allocated_utilization=allocated / capacity_gpu_s if capacity_gpu_s else 0.0,
            num_preemptions=sum(r.num_preemptions for r in records.values()),
            lost_gpu_s=self._lost_gpu_s,
            num_passes=self._passes,
            fairness_jain_gpu_s=jain_index(list(tenant_gpu_s.values())),
            fairness_jain_slowdown=jain_index(_tenant_slowdowns(done)),
            tenant_gpu_s=tenant_gpu_s,
            records=records,
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values; 0.0 if empty."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1.0 when all equal, 1/n when one gets all."""
    squares = sum(v * v for v in values)
    return (sum(values) ** 2) / (len(values) * squares) if squares else 1.0


def _tenant_slowdowns(done: Sequence[SimOutcome]) -> list[float]:
    """Mean slowdown (JCT / duration) per tenant over completed jobs."""
    by_tenant: dict[str, list[float]] = {}
    for r in done:
        by_tenant.setdefault(r.job.tenant, []).append((r.end_s - r.job.submit_time_s) / r.job.duration_s)  # type: ignore[operator]
    return [_mean(v) for _, v in sorted(by_tenant.items())]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see `shardwright sim --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardwright sim", description="Replay a job trace in the scheduler simulator.")
    parser.add_argument("--trace", required=True, help="CSV trace (Philly, Alibaba openb or generic)")
    parser.add_argument("--nodes", type=int, required=True, help="number of simulated nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    parser.add_argument("--policy", required=True, help=f"one of {', '.join(POLICY_NAMES)}")
    parser.add_argument("--format", choices=TRACE_FORMATS, help="trace format (default: from the header)")
    parser.add_argument("--limit", type=int, help="replay only the first N jobs")
    parser.add_argument("--quota", action="append", default=[], metavar="TENANT=GPUS", help="fairshare quota")
    parser.add_argument(
        "--checkpoint-interval-s", type=float, default=0.0, help="0: checkpoint on preemption"
    )
    parser.add_argument("--restart-overhead-s", type=float, default=30.0, help="cost of each restart")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def _policy_from(args: argparse.Namespace) -> SchedulingPolicy:
    if not args.quota:
        return make_policy(args.policy)
    if args.policy != "fairshare":
        raise ValueError(f"--quota applies to the fairshare policy only, not {args.policy!r}")
    quotas = {}
    for item in args.quota:
        tenant, _, gpus = item.partition("=")
        if not tenant or not gpus.isdigit():
            raise ValueError(f"--quota {item!r} must look like TENANT=GPUS, e.g. --quota 6214e9=64")
        quotas[tenant] = int(gpus)
    return make_policy("fairshare", quotas_gpus=quotas)


def print_table(report: SimReport) -> None:
    """Human-readable summary of one run."""
    counts = f"{report.num_completed} / {report.num_rejected} / {report.num_unfinished}"
    rows = [("jobs (completed / rejected / unfinished)", counts)]
    for name in ("avg_jct_s", "p50_jct_s", "p99_jct_s", "avg_queue_s", "avg_wait_s", "makespan_s"):
        rows.append((name, f"{getattr(report, name):,.1f}"))
    rows += [
        ("utilization", f"{report.utilization:.3f}"),
        ("preemptions", str(report.num_preemptions)),
        ("fairness (Jain, slowdown)", f"{report.fairness_jain_slowdown:.3f}"),
    ]
    print(f"policy {report.policy} on {report.num_gpus} GPUs")
    for label, value in rows:
        print(f"  {label:<42} {value:>16}")
    rejected = [r.rejected for r in report.records.values() if r.rejected]
    if rejected:
        print(f"  rejected at submission, e.g.: {rejected[0]}")


def main(argv: list[str] | None = None) -> int:
    """`shardwright sim`: 0 on success, 2 (one line on stderr) on bad arguments or inputs."""
    try:
        args = build_parser().parse_args(argv)
        policy = _policy_from(args)
        cluster = ClusterInventory.uniform(args.nodes, args.gpus_per_node)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit} must be >= 1")
        trace = load_trace(args.trace, args.format, gpus_per_node=args.gpus_per_node, limit=args.limit)
        options = SimOptions(args.checkpoint_interval_s, args.restart_overhead_s)
        report = Simulator(policy, cluster, options).run(trace.jobs)
    except (_UsageError, ValueError) as err:
        print(f"shardwright sim: error: {err}", file=sys.stderr)
        return 2
    print_table(report)
    if args.json:
        print(json.dumps({**report.to_json(), "trace": trace.source, "skipped_rows": trace.skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
