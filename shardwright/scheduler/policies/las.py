"""Least attained service for training, Tiresias-style (discretised 2D-LAS).

A job's attained service is GPU-seconds received (GPUs x time run, the "2D" of Tiresias). Service is
discretised into queues by `thresholds_gpu_s`: queue 0 holds jobs below the first threshold, and so
on. Jobs are taken by priority class (higher first), then queue (less service first), then submit
time (FIFO inside a queue, as Tiresias does). A job that fits starts; one that does not may preempt
running training jobs of a lower class or, in its own class, of a strictly higher queue (most
service first, then most recently started), else it is skipped so smaller jobs can still start.

Only training jobs are preempted; inference jobs sort above training by class and never move. Since a
job only preempts jobs in a strictly higher queue, two jobs never preempt each other back and forth
within one queue. `next_review_s` asks for a pass when a running job crosses into a lower-priority
queue while someone waits, because that is when it may become preemptible.

Starvation guard (Tiresias' STARVELIMIT, default 2): a waiting job that has waited longer than
`starve_limit` x the time it has run is promoted to queue 0. Promotion resets the service LAS counts
for that run: once restarted, the job is ranked by the service received since the restart, so it is
not preempted straight back by the jobs it displaced. At most `max_preemptions_per_pass` jobs are
preempted per pass (default 64): each preemption costs a checkpoint, and the bound keeps a pass cheap.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from shardwright.scheduler.model import ClusterInventory, Job, RunningJob
from shardwright.scheduler.policies.base import (
    Decision,
    PassPlanner,
    SchedulingPolicy,
    VictimList,
    check_max_preemptions,
)

DEFAULT_THRESHOLDS_GPU_S = (3_600.0, 36_000.0, 360_000.0)


class LasPolicy(SchedulingPolicy):
    """Discretised 2D least-attained-service with preemption of higher-service training jobs."""

    name = "las"

    def __init__(
        self,
        thresholds_gpu_s: Sequence[float] = DEFAULT_THRESHOLDS_GPU_S,
        starve_limit: float | None = 2.0,
        max_preemptions_per_pass: int | None = 64,
    ) -> None:
        self.max_preemptions_per_pass = check_max_preemptions(max_preemptions_per_pass)
        if starve_limit is not None and not (isinstance(starve_limit, (int, float)) and starve_limit > 0):
            raise ValueError(f"starve_limit={starve_limit!r} must be > 0 (or None to disable promotion)")
        self.starve_limit = starve_limit
        values = list(thresholds_gpu_s)
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"thresholds_gpu_s={values!r} must be finite GPU-seconds > 0")
        if values != sorted(set(values)):
            raise ValueError(f"thresholds_gpu_s={values!r} must be strictly increasing")
        self.thresholds_gpu_s = tuple(float(v) for v in values)

    def queue_of(self, attained_gpu_s: float) -> int:
        """Index of the LAS queue for this much attained service (0 = least service)."""
        return bisect_right(self.thresholds_gpu_s, attained_gpu_s)

    def _promoted(self, job: Job, at_s: float) -> bool:
        """Starvation guard: `job` has waited (as of `at_s`) longer than `starve_limit` x its run time."""
        if self.starve_limit is None or job.attained_service_gpu_s == 0:
            return False
        ran_s = job.attained_service_gpu_s / job.num_gpus
        return at_s - job.waiting_since_s > self.starve_limit * ran_s

    def waiting_queue(self, job: Job, now_s: float) -> int:
        """Queue of a waiting job: by attained service, or 0 once promoted by the starvation guard."""
        if job.attained_service_gpu_s == 0 or self._promoted(job, now_s):
            return 0
        return self.queue_of(job.attained_service_gpu_s)

    def _counted_base_gpu_s(self, run: RunningJob) -> float:
        """Service counted before this run: none for a job promoted when it (re)started."""
        return 0.0 if self._promoted(run.job, run.start_time_s) else run.job.attained_service_gpu_s

    def running_queue(self, run: RunningJob, now_s: float) -> int:
        """Queue of a running job: by service received, counted from its restart if it was promoted."""
        return self.queue_of(self._counted_base_gpu_s(run) + run.job.num_gpus * (now_s - run.start_time_s))

    def schedule(
        self, queue: Sequence[Job], running: Sequence[RunningJob], cluster: ClusterInventory, now_s: float
    ) -> list[Decision]:
        planner = PassPlanner(cluster, running, self.max_preemptions_per_pass)
        level = {r.job.job_id: self.running_queue(r, now_s) for r in running if r.job.preemptible}
        pool = sorted(
            (r for r in running if r.job.preemptible),
            key=lambda r: (r.job.priority, -level[r.job.job_id], -r.start_time_s),
        )
        order = sorted(queue, key=lambda j: self._order_key(j, now_s))
        victims_by_class: dict[tuple[int, int], VictimList] = {}
        for job in order:
            if planner.try_start(job, now_s):
                continue
            if not pool or planner.preemptions_exhausted:
                if planner.full:
                    break
                continue
            job_class = (job.priority, self.waiting_queue(job, now_s))
            if planner.preempt_known_to_fail(job, job_class):
                continue
            if job_class not in victims_by_class:
                victims_by_class[job_class] = VictimList(
                    r for r in pool if _outranks(job_class, r, level[r.job.job_id])
                )
            reason = f"job {job.job_id} in LAS queue {job_class[1]} outranks jobs with more service"
            if victims_by_class[job_class]:
                planner.try_preempt_for(job, victims_by_class[job_class], now_s, reason, job_class)
        return planner.decisions()

    def _order_key(self, job: Job, now_s: float) -> tuple[int, int, float]:
        if job.attained_service_gpu_s == 0:  # most waiting jobs: skip the queue lookup
            return (-job.priority, 0, job.submit_time_s)
        return (-job.priority, self.waiting_queue(job, now_s), job.submit_time_s)

    def next_review_s(
        self, queue: Sequence[Job], running: Sequence[RunningJob], now_s: float
    ) -> float | None:
        """Earliest time a running training job crosses into a queue above some waiting job's queue
        (a running job in queue l moving to l + 1 matters only if someone waits in a queue <= l)."""
        waiting = [self.waiting_queue(j, now_s) for j in queue if j.kind == "training"]
        if not waiting:
            return None
        lowest = min(waiting)
        crossings = []
        for run in running:
            if not run.job.preemptible:
                continue
            level = self.running_queue(run, now_s)
            if lowest <= level < len(self.thresholds_gpu_s):
                missing = self.thresholds_gpu_s[level] - self._counted_base_gpu_s(run)
                # +1 microsecond so that rounding cannot leave the job just below the threshold
                crossings.append(max(now_s, run.start_time_s + missing / run.job.num_gpus) + 1e-6)
        return min(crossings, default=None)


def _outranks(job_class: tuple[int, int], run: RunningJob, run_level: int) -> bool:
    """A waiting job (priority, queue) may preempt `run`: lower class, or same class and higher queue."""
    priority, job_level = job_class
    if run.job.priority != priority:
        return run.job.priority < priority
    return run_level > job_level
