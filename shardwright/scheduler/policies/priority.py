"""Strict priority with preemption.

Jobs are taken by priority class (higher first), then submit time. A job that does not fit may
preempt running *training* jobs of a strictly lower class: the fewest needed, lowest class first and,
within a class, the most recently started (least work lost). Inference jobs are never preempted, so
training never preempts inference. Strict: the first job that cannot start even with preemption
blocks every job after it (no skipping ahead within or below its class).

At most `max_preemptions_per_pass` jobs are preempted per pass (default 64): each preemption costs
a checkpoint, and the bound keeps one pass cheap; blocked jobs preempt more at the next pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwright.scheduler.model import ClusterInventory, Job, RunningJob
from shardwright.scheduler.policies.base import (
    Decision,
    PassPlanner,
    SchedulingPolicy,
    VictimList,
    check_max_preemptions,
    submit_order,
)


class PriorityPolicy(SchedulingPolicy):
    """Strict priority classes, FIFO inside a class, preemption of lower-class training jobs."""

    name = "priority"

    def __init__(self, max_preemptions_per_pass: int | None = 64) -> None:
        self.max_preemptions_per_pass = check_max_preemptions(max_preemptions_per_pass)

    def schedule(
        self, queue: Sequence[Job], running: Sequence[RunningJob], cluster: ClusterInventory, now_s: float
    ) -> list[Decision]:
        planner = PassPlanner(cluster, running, self.max_preemptions_per_pass)
        lowest_victim = min((r.job.priority for r in running if r.job.preemptible), default=None)
        pool: list[RunningJob] | None = None  # sorted on first use: most passes never preempt
        victims_by_class: dict[int, VictimList] = {}
        for job in submit_order(queue):
            if planner.try_start(job, now_s):
                continue
            if lowest_victim is None or job.priority <= lowest_victim:
                break
            if pool is None:
                pool = sorted(
                    (r for r in running if r.job.preemptible), key=lambda r: (r.job.priority, -r.start_time_s)
                )
            if job.priority not in victims_by_class:
                victims_by_class[job.priority] = VictimList(r for r in pool if r.job.priority < job.priority)
            victims = victims_by_class[job.priority]
            reason = f"priority class {job.priority} job {job.job_id} needs GPUs"
            if not victims or not planner.try_preempt_for(job, victims, now_s, reason, job.priority):
                break
        return planner.decisions()
