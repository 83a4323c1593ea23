"""Scheduler benchmark: every policy on the Philly trace, side by side with FIFO, plus pass latency.

Run: `shardwright bench scheduler [--quick] [--json]`, or `python benchmarks/scheduler.py [--quick]`
(always prints the JSON). Through `benchmarks/runner.py`: a human table, notes on the targets, then
one JSON line whose last key is `results`. `--quick` takes about 10 s on one core, the full run ~3 min.

Trace slice. Microsoft Philly (Jeon et al., USENIX ATC 2019; the Pollux-derived file in
`shared/traces/philly`): the jobs submitted 2017-09-24 10:30 to 2017-10-01 10:30 (days 20-27 after
the file's first timestamp, the first week with steady arrivals: 5,729 jobs of 1 to 32 GPUs, up to
30 days long). `--quick` replays that week only; the full run adds the two following weeks (11,006
and 13,144 jobs) as robustness checks. All Philly jobs are training jobs of one class, so `priority`
behaves exactly like FIFO here; its preemption is exercised by the unit tests and the Alibaba trace.

Cluster size: 32 nodes x 8 GPUs (256 GPUs). Had every job of the week started on arrival, the work
falling inside the week would keep about 360 GPUs busy on average (575 GPUs counting the multi-week
tails), so at 256 GPUs FIFO keeps a queue for days: contended. It is not hopeless: the cluster drains
the backlog within the tail of the longest jobs, so a policy can cut JCT by ordering work, not only
by waiting. Fewer nodes make every policy's JCT a function of backlog alone; at 64 nodes the queue
is nearly empty (the trace README suggests 32 to 64 nodes x 8 GPUs for a week).

Utilisation is useful GPU-seconds / (GPUs x makespan); on a slice whose makespan is set by a few
month-long jobs, it mostly measures when the longest jobs started.

Pass latency: one `schedule` call per policy at 1,000 nodes x 8 GPUs with 10,000 queued jobs (gang
sizes drawn from Philly's distribution, 15 tenants, 10% inference) in two states: `busy` (about 97%
of GPUs held by running jobs, the steady state of a contended cluster) and `draining` (a quarter of
the GPUs free, so the pass starts many jobs). Median wall and CPU milliseconds of several calls
(CPU time is the same call without waiting for a core on a shared machine); target < 50 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

from shardwright.config import ParallelLayout
from shardwright.scheduler.model import ClusterInventory, GangShape, Job, RunningJob
from shardwright.scheduler.placement import place_and_allocate
from shardwright.scheduler.policies import POLICY_NAMES, make_policy
from shardwright.scheduler.sim import SimReport, Simulator
from shardwright.scheduler.traces import load_philly



def _shared_dir(root: Path) -> Path:
    """shared/ in or beside the checkout, or beside a folder above it (a git worktree in a subfolder)."""
    for folder in (root, *root.parents):
        if (folder / "shared" / "traces").is_dir():
            return folder / "shared"
    return root.parent / "shared"


PHILLY = _shared_dir(Path(__file__).resolve().parents[1]) / "traces" / "philly" / "philly_jobs_2017-09-04_to_2017-10-31.csv"
DAY_S = 86_400.0
FIRST_WEEK_DAY = 20
NUM_NODES, GPUS_PER_NODE = 32, 8
COLUMNS = [
    "slice",
    "policy",
    "avg_jct_s",
    "p99_jct_s",
    "avg_wait_s",
    "utilization",
    "jct_vs_fifo",
    "util_vs_fifo",
    "preemptions",
    "pass_busy_ms",
    "pass_draining_ms",
]
PHILLY_SIZES = {1: 76_627, 2: 1_818, 4: 1_870, 8: 1_643, 16: 199, 32: 67}


def run_trace(since_day: float, days: float) -> list[dict[str, object]]:
    """One row per policy on one Philly slice, FIFO (the baseline) first; ratios are policy / FIFO."""
    trace = load_philly(PHILLY, GPUS_PER_NODE, since_s=since_day * DAY_S, window_s=days * DAY_S)
    from benchmarks.runner import measure_point

    label = f"days {since_day:g}-{since_day + days:g} ({len(trace.jobs)} jobs)"
    rows, fifo = [], None
    for name in POLICY_NAMES:
        start = time.perf_counter()
        report = measure_point({"slice": label, "policy": name}, _simulate, name, trace.jobs)
        if report is None:
            continue
        if name == "fifo":
            fifo = report
        row = {"slice": label, "policy": name, **_figures(report, fifo)}
        rows.append({**row, "sim_wall_s": round(time.perf_counter() - start, 2)})
    return rows


def _simulate(policy: str, jobs: list[Job]) -> SimReport:
    return Simulator(make_policy(policy), ClusterInventory.uniform(NUM_NODES, GPUS_PER_NODE)).run(jobs)


def _figures(rep: SimReport, fifo: SimReport | None) -> dict[str, object]:
    """The report's figures; the ratios to FIFO are None when FIFO's point failed."""
    keys = ("avg_jct_s", "p50_jct_s", "p99_jct_s", "avg_queue_s", "avg_wait_s", "makespan_s")
    return {
        **{k: round(getattr(rep, k), 1) for k in keys},
        "utilization": round(rep.utilization, 4),
        "jct_vs_fifo": None if fifo is None else round(rep.avg_jct_s / fifo.avg_jct_s, 4),
        "util_vs_fifo": None if fifo is None else round(rep.utilization / fifo.utilization, 4),
        "preemptions": rep.num_preemptions,
        "fairness_jain_slowdown": round(rep.fairness_jain_slowdown, 4),
    }


def _random_job(rng: random.Random, index: int, now_s: float) -> Job:
    gpus = rng.choices(list(PHILLY_SIZES), weights=list(PHILLY_SIZES.values()))[0]
    shape = (
        GangShape(ParallelLayout(tp=gpus)) if gpus <= GPUS_PER_NODE else GangShape(ParallelLayout(tp=GPUS_PER_NODE, pp=gpus // GPUS_PER_NODE))
    )
    kind = "inference" if rng.random() < 0.1 else "training"
    return Job(
        f"j{index}",
        f"tenant-{rng.randrange(15)}",
        kind,
        shape,
        now_s - rng.uniform(0, 86_400),
        duration_s=rng.uniform(60, 200_000),
        attained_service_gpu_s=rng.choice([0.0, 0.0, 5_000.0, 50_000.0]),
    )


def _scenario(free_fraction: float, seed: int = 0) -> tuple[list[Job], list[RunningJob], ClusterInventory]:
    rng = random.Random(seed)
    now_s = 1_000_000.0
    cluster = ClusterInventory.uniform(1_000, GPUS_PER_NODE)
    running, index = [], 0
    while cluster.num_free_gpus > free_fraction * cluster.num_gpus:
        job = _random_job(rng, index, now_s)
        index += 1
        placement = place_and_allocate(job.shape, cluster)
        if placement is not None:
            start_s = now_s - rng.uniform(0, 50_000)
            running.append(RunningJob(job, placement.gpus_by_node, start_s, start_s + job.duration_s))
    queue = [_random_job(rng, index + i, now_s) for i in range(10_000)]
    queue.sort(key=lambda job: job.submit_time_s)
    return queue, running, cluster


def time_passes(repeats: int) -> list[dict[str, object]]:
    """One row per policy: median wall and CPU milliseconds of one pass in each scenario."""
    from benchmarks.runner import measure_point

    rows = {name: {"slice": "one pass, 1000x8 GPUs, 10k queued", "policy": name} for name in POLICY_NAMES}
    for label, free_fraction in (("busy", 0.03), ("draining", 0.25)):
        queue, running, cluster = _scenario(free_fraction)
        for name in POLICY_NAMES:
            got = measure_point({"pass": label, "policy": name}, _time_pass, name, queue, running, cluster, repeats)
            if got is not None:
                rows[name][f"pass_{label}_ms"], rows[name][f"pass_{label}_cpu_ms"] = got
    return list(rows.values())


def _time_pass(policy_name: str, queue: list[Job], running: list[RunningJob], cluster: ClusterInventory,
               repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of one `schedule` call."""
    policy, wall, cpu = make_policy(policy_name), [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        policy.schedule(queue, running, cluster, 1_000_000.0)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return round(statistics.median(wall), 2), round(statistics.median(cpu), 2)


def _target_notes(rows: list[dict[str, object]]) -> list[str]:
    """Per slice: the best policy by average JCT and whether it meets JCT <= 0.5x FIFO with
    utilisation >= FIFO's; which policies meet both."""
    notes = []
    for label in dict.fromkeys(r["slice"] for r in rows if r.get("jct_vs_fifo") is not None):
        mine = [r for r in rows if r["slice"] == label and r["policy"] != "fifo"]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["avg_jct_s"])
        meets = [r["policy"] for r in mine if r["jct_vs_fifo"] <= 0.5 and r["util_vs_fifo"] >= 1]
        notes.append(
            f"{label}: best {best['policy']} JCT {best['jct_vs_fifo']:.3f}x FIFO, utilisation "
            f"{best['util_vs_fifo']:.3f}x FIFO; meeting both targets: {', '.join(meets) or 'none'}"
        )
    return notes


def run(quick: bool) -> dict[str, object]:
    """Figures for `benchmarks.runner`: rows per (slice, policy) with FIFO's row as the baseline,
    then one row per policy with the pass latency; `results` is the last key."""
    if not PHILLY.is_file():
        raise FileNotFoundError(f"Philly trace not found at {PHILLY}; the benchmark needs shared/traces")
    start = time.perf_counter()
    weeks = [FIRST_WEEK_DAY] if quick else [FIRST_WEEK_DAY, FIRST_WEEK_DAY + 7, FIRST_WEEK_DAY + 14]
    rows = [row for day in weeks for row in run_trace(day, 7)]
    passes = time_passes(repeats=5 if quick else 9)
    worst_ms = max((r[k] for r in passes for k in ("pass_busy_ms", "pass_draining_ms") if k in r), default=None)
    worst_cpu_ms = max((r[k] for r in passes for k in ("pass_busy_cpu_ms", "pass_draining_cpu_ms") if k in r),
                       default=None)
    notes = [
        *_target_notes(rows),
        f"one pass at 1,000 nodes x 8 GPUs, 10,000 queued: worst median {_ms(worst_ms)} ms wall, "
        f"{_ms(worst_cpu_ms)} ms CPU (target < 50 ms; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs while timing)",
    ]
    return {
        "benchmark": "scheduler",
        "quick": quick,
        "wall_s": round(time.perf_counter() - start, 1),
        "cluster": f"{NUM_NODES}x{GPUS_PER_NODE}",
        "pass_ms_worst": worst_ms,
        "pass_cpu_ms_worst": worst_cpu_ms,
        "pass_target_ms": 50.0,
        "notes": notes,
        "results": rows + passes,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/scheduler.py [--quick]`: the shared runner's table, notes, then the JSON line."""
    parser = argparse.ArgumentParser(prog="benchmarks/scheduler.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one week of the trace, fewer timing repeats")
    args = parser.parse_args(argv)
    if not PHILLY.is_file():
        print(f"benchmarks/scheduler.py: error: Philly trace not found at {PHILLY}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.runner import main as run_benchmark

    return run_benchmark("scheduler", quick=args.quick, as_json=True)


if __name__ == "__main__":
    sys.exit(main())
