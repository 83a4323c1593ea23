"""FIFO: start jobs in submit order; the first job that does not fit blocks every later one.

This is the baseline every other policy is compared with. It never preempts. Priority classes are
ignored (order is submit time only).
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwright.scheduler.model import ClusterInventory, Job, RunningJob
from shardwright.scheduler.policies.base import Decision, PassPlanner, SchedulingPolicy, submit_order


class FifoPolicy(SchedulingPolicy):
    """Strict first-in first-out with head-of-line blocking."""

    name = "fifo"

    def schedule(
        self, queue: Sequence[Job], running: Sequence[RunningJob], cluster: ClusterInventory, now_s: float
    ) -> list[Decision]:
        planner = PassPlanner(cluster, ())
        for job in submit_order(queue, key=lambda job: job.submit_time_s):
            if planner.full or not planner.try_start(job, now_s):
                break
        return planner.decisions()
