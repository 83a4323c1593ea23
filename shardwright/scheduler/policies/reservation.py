"""A reservation for one blocked job, and the rule for starting others without delaying it (EASY).

`HeadReservation.make` finds the earliest time `start_s` at which, with running jobs ending at their
expected ends, the blocked job can be placed, and the placement it would get then. `try_start` then
starts another job only if it fits now and either

- is expected to end by `start_s` (its GPUs are free again when the reserved job starts), or
- uses only GPUs that the reservation leaves spare at `start_s`, node by node.

So no job started through `try_start` delays the reservation: at `start_s` every node still has the
GPUs the reserved placement needs. Expected ends come from `duration_s` minus the service already
received; a job with no estimate counts as running forever.
"""

from __future__ import annotations

from collections.abc import Mapping

from shardwright.scheduler.model import ClusterInventory, Job
from shardwright.scheduler.placement import place
from shardwright.scheduler.policies.base import Fitter, PassPlanner, ReserveJob, expected_end_s


class HeadReservation:
    """The reserved start of one job and a fitter limited to GPUs that keep it (see module docstring)."""

    def __init__(self, decision: ReserveJob, spare_at_start: ClusterInventory, planner: PassPlanner) -> None:
        self.decision = decision
        now_inv = planner.inventory
        free = {n: min(f, spare_at_start.free_by_node[n]) for n, f in now_inv.free_by_node.items()}
        self._limited = Fitter(ClusterInventory.from_nodes(now_inv.total_by_node, free))
        self._planner = planner

    @classmethod
    def make(cls, head: Job, planner: PassPlanner, now_s: float) -> HeadReservation | None:
        """Reserve for `head` given the planner's running and started jobs; None if no known end frees
        enough GPUs (some running job has no expected end)."""
        inventory = planner.inventory
        tp, groups, gpus = head.shape.tp, head.shape.num_tp_groups, head.num_gpus
        free = dict(inventory.free_by_node)
        capacity, num_free = inventory.group_capacity(tp), inventory.num_free_gpus
        runs = [r for r in planner.running if r.job.job_id not in planner.preempted] + planner.started
        for run in sorted((r for r in runs if r.expected_end_s is not None), key=lambda r: r.expected_end_s):
            for node, count in run.gpus_by_node.items():
                before = free[node]
                free[node] = before + count
                capacity += (before + count) // tp - before // tp
            num_free += run.job.num_gpus
            if capacity >= groups and num_free >= gpus:
                return cls._at(head, free, max(now_s, run.expected_end_s or now_s), planner)
        return None

    @classmethod
    def _at(cls, head: Job, free: dict[str, int], start_s: float, planner: PassPlanner) -> HeadReservation:
        at_start = ClusterInventory.from_nodes(planner.inventory.total_by_node, free)
        placement = place(head.shape, at_start)
        if placement is None:  # cannot happen: TP-group capacity is an exact fit test
            raise RuntimeError(f"reservation for {head.job_id} inconsistent with capacity")
        at_start.allocate(placement.gpus_by_node)
        return cls(ReserveJob(head.job_id, start_s, placement), at_start, planner)

    def try_start(self, job: Job, now_s: float) -> bool:
        """Start `job` now if that cannot delay the reservation."""
        planner = self._planner
        end_s = expected_end_s(job, now_s)
        if end_s is not None and end_s <= self.decision.start_time_s:
            if not planner.try_start(job, now_s):
                return False
            _clip(self._limited.inventory, planner.inventory, planner.started[-1].gpus_by_node)
            return True
        placement = self._limited.fit(job)
        if placement is None:
            return False
        self._limited.inventory.allocate(placement.gpus_by_node)
        planner.commit_start(job, placement, now_s)
        return True


def _clip(limited: ClusterInventory, now_inv: ClusterInventory, nodes: Mapping[str, int]) -> None:
    """Keep limited free <= free now on `nodes` after a short job took GPUs there."""
    for node in nodes:
        excess = limited.free_by_node[node] - now_inv.free_by_node[node]
        if excess > 0:
            limited.allocate({node: excess})
