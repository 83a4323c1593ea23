"""Fair share across tenants, with per-tenant GPU quotas.

Dominant-resource fairness with a single resource (GPUs) is max-min fairness on GPU shares: each
step of a pass offers GPUs to the tenant with the smallest `running GPUs / weight` (ties: the tenant
whose next job has waited longest), which starts its first queued job (priority class, then submit
time) that fits and keeps it within quota. A tenant whose remaining jobs cannot start in this pass
drops out of the pass.

Large gangs are protected: when a tenant below its fair share (cluster GPUs x its weight / the
weights of tenants with queued or running jobs) cannot start its first job, that job gets a backfill
reservation (`reservation.py`), and the rest of the pass starts only jobs that cannot delay it. If no
reservation can be computed (unknown run times), tenants at or above their share wait instead. So
tenants above their share cannot keep taking freed GPUs with small jobs while an under-served
tenant's gang waits for room. Otherwise the pass is work conserving (tenants skip to jobs that fit).

Quotas are hard caps: a tenant never holds more than `quotas_gpus[tenant]` GPUs, even on an idle
cluster, so a tenant over quota waits while others run. A job larger than its tenant's quota is
rejected at submission. No preemption: shares converge as jobs end.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping, Sequence

from shardwright.scheduler.model import ClusterInventory, Job, RunningJob, UnplaceableJobError
from shardwright.scheduler.policies.base import Decision, PassPlanner, SchedulingPolicy, submit_order
from shardwright.scheduler.policies.reservation import HeadReservation


class FairSharePolicy(SchedulingPolicy):
    """Max-min fair GPU shares across tenants (DRF on one resource) with hard per-tenant quotas."""

    name = "fairshare"

    def __init__(
        self, quotas_gpus: Mapping[str, int] | None = None, weights: Mapping[str, float] | None = None
    ) -> None:
        self.quotas_gpus = dict(quotas_gpus or {})
        self.weights = dict(weights or {})
        for tenant, quota in self.quotas_gpus.items():
            if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
                raise ValueError(f"quota of tenant {tenant!r} = {quota!r} must be a GPU count >= 0")
        for tenant, weight in self.weights.items():
            if not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"weight of tenant {tenant!r} = {weight!r} must be > 0")

    def check_submission(self, job: Job, cluster: ClusterInventory) -> None:
        """Also reject a job that is larger than its tenant's quota (it could never start)."""
        super().check_submission(job, cluster)
        quota = self.quotas_gpus.get(job.tenant)
        if quota is not None and job.num_gpus > quota:
            raise UnplaceableJobError(
                f"job {job.job_id} asks for {job.num_gpus} GPUs but tenant {job.tenant!r} has a quota of "
                f"{quota} GPUs; raise the quota or shrink the gang"
            )

    def schedule(
        self, queue: Sequence[Job], running: Sequence[RunningJob], cluster: ClusterInventory, now_s: float
    ) -> list[Decision]:
        planner = PassPlanner(cluster, running)
        used: Counter[str] = Counter()
        for run in running:
            used[run.job.tenant] += run.job.num_gpus
        by_tenant: dict[str, list[Job]] = {}
        for job in submit_order(queue):
            by_tenant.setdefault(job.tenant, []).append(job)
        cursor = dict.fromkeys(by_tenant, 0)
        fair = self._fair_gpus(set(by_tenant) | set(used), cluster.num_gpus)
        heap = [(self._share(t, used[t]), jobs[0].submit_time_s, t) for t, jobs in by_tenant.items()]
        heapq.heapify(heap)
        gate = _Gate(planner, now_s)
        while heap and not planner.full:
            _, _, tenant = heapq.heappop(heap)
            below_fair = used[tenant] < fair[tenant]
            if gate.closed and not below_fair:
                continue
            job, blocked_head = self._start_next(tenant, by_tenant[tenant], cursor, used, gate, below_fair)
            if blocked_head is not None:  # protect it, then let the tenant start what cannot delay it
                gate.protect(blocked_head)
                job, _ = self._start_next(tenant, by_tenant[tenant], cursor, used, gate, below_fair)
            if job is None:
                continue
            used[tenant] += job.num_gpus
            if cursor[tenant] < len(by_tenant[tenant]):
                head_s = by_tenant[tenant][cursor[tenant]].submit_time_s
                heapq.heappush(heap, (self._share(tenant, used[tenant]), head_s, tenant))
        return planner.decisions()

    def _share(self, tenant: str, gpus: int) -> float:
        return gpus / self.weights.get(tenant, 1.0)

    def _fair_gpus(self, active: set[str], num_gpus: int) -> dict[str, float]:
        """Each active tenant's fair share of the cluster's GPUs, proportional to its weight."""
        total_weight = sum(self.weights.get(t, 1.0) for t in active) or 1.0
        return {t: num_gpus * self.weights.get(t, 1.0) / total_weight for t in active}

    def _start_next(
        self,
        tenant: str,
        jobs: list[Job],
        cursor: dict[str, int],
        used: Counter[str],
        gate: _Gate,
        below_fair: bool,
    ) -> tuple[Job | None, Job | None]:
        """Start the tenant's first job that fits and respects its quota: (started job, None).

        A tenant below its fair share waits for its first job within quota while no job is protected
        yet: (None, that job) if it does not fit. Otherwise jobs that do not fit are skipped; they
        cannot start later in this pass (free GPUs and quota headroom only shrink), so the cursor
        moves past them.
        """
        quota = self.quotas_gpus.get(tenant)
        headroom = None if quota is None else quota - used[tenant]
        for index in range(cursor[tenant], len(jobs)):
            job = jobs[index]
            if headroom is not None and job.num_gpus > headroom:
                continue
            if gate.try_start(job):
                cursor[tenant] = index + 1
                return job, None
            if below_fair and not gate.protecting:
                return None, job
        cursor[tenant] = len(jobs)
        return None, None


class _Gate:
    """Starts jobs for one pass; once an under-served tenant's job is protected, only starts that
    cannot delay it (through its reservation), or none from tenants at their share (no estimate)."""

    def __init__(self, planner: PassPlanner, now_s: float) -> None:
        self.planner, self.now_s = planner, now_s
        self.reservation: HeadReservation | None = None
        self.closed = False

    @property
    def protecting(self) -> bool:
        return self.closed or self.reservation is not None

    def protect(self, job: Job) -> None:
        if self.protecting:
            return
        self.reservation = HeadReservation.make(job, self.planner, self.now_s)
        if self.reservation is None:
            self.closed = True
        else:
            self.planner.reserve(self.reservation.decision)

    def try_start(self, job: Job) -> bool:
        if self.reservation is not None:
            return self.reservation.try_start(job, self.now_s)
        return self.planner.try_start(job, self.now_s)
