"""EASY backfilling with a topology-aware reservation.

Jobs are taken in order (priority class, then submit time) and started while they fit. The first one
that does not fit is the head: it gets a reservation, the earliest time `t*` at which, with running
jobs ending at their expected ends, it can be placed, and the placement it would get then. Later jobs
(at most `max_lookahead` of them) are backfilled only if they fit now and either

- are expected to end by `t*` (their GPUs are free again when the head starts), or
- use only GPUs that the reservation leaves spare at `t*`, node by node.

So a backfilled job never delays the head's reservation: at `t*` every node still has the GPUs the
reserved placement needs. Expected ends come from `duration_s` minus the service already received
(the simulator knows them exactly). If the head cannot be placed even after every running job with a
known end has ended (some end is unknown), no reservation can be promised and fitting jobs are
backfilled freely. Never preempts.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwright.scheduler.model import ClusterInventory, Job, RunningJob
from shardwright.scheduler.policies.base import Decision, PassPlanner, SchedulingPolicy, submit_order
from shardwright.scheduler.policies.reservation import HeadReservation


class BackfillPolicy(SchedulingPolicy):
    """EASY backfill: one reservation for the blocked head job, backfill that never delays it."""

    name = "backfill"

    def __init__(self, max_lookahead: int = 2000) -> None:
        if isinstance(max_lookahead, bool) or not isinstance(max_lookahead, int) or max_lookahead < 0:
            raise ValueError(f"max_lookahead={max_lookahead!r} must be an integer >= 0")
        self.max_lookahead = max_lookahead

    def schedule(
        self, queue: Sequence[Job], running: Sequence[RunningJob], cluster: ClusterInventory, now_s: float
    ) -> list[Decision]:
        planner = PassPlanner(cluster, running)
        order = submit_order(queue)
        head_index = next((i for i, job in enumerate(order) if not planner.try_start(job, now_s)), None)
        if head_index is None:
            return planner.decisions()
        reservation = HeadReservation.make(order[head_index], planner, now_s)
        for job in order[head_index + 1 : head_index + 1 + self.max_lookahead]:
            if planner.full:
                break
            if reservation is None:
                planner.try_start(job, now_s)
            else:
                reservation.try_start(job, now_s)
        if reservation is not None:
            planner.reserve(reservation.decision)
        return planner.decisions()
