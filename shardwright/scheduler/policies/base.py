"""The policy interface, the decisions a policy returns, and the per-pass planner they share.

A policy is called once per scheduling pass with the queue, the running set, the cluster inventory
and `now_s`. It never mutates them: it plans on a copy and returns decisions for a controller (the
simulator, or later the Ray-backed controller) to carry out, in list order:

1. every `PreemptJob` (ask the training job to checkpoint, release its GPUs, requeue it);
2. every `StartJob`, in order; a start lists in `after_preemptions` the jobs that must have released
   their GPUs first (those sharing a node with it), so a live controller can wait on exactly those;
3. at most one `ReserveJob` per pass (backfill's promise for the blocked head job).

Guarantee: applying the preemptions and then the starts in order to the inventory never fails, and
every placement keeps each TP group on one node.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from shardwright.scheduler.model import ClusterInventory, Job, RunningJob
from shardwright.scheduler.placement import Placement, place


@dataclass(frozen=True, slots=True)
class StartJob:
    """Start `job_id` on `placement` once the jobs in `after_preemptions` have released their GPUs."""

    job_id: str
    placement: Placement
    after_preemptions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PreemptJob:
    """Checkpoint and stop training job `job_id`, release its GPUs and requeue it."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReserveJob:
    """Backfill's promise: `job_id` can start at `start_time_s` on `placement` (given expected ends)."""

    job_id: str
    start_time_s: float
    placement: Placement


Decision = StartJob | PreemptJob | ReserveJob


class SchedulingPolicy(ABC):
    """One scheduling policy. Subclasses implement `schedule`; see the module docstring for the contract."""

    name: str = "abstract"

    @abstractmethod
    def schedule(
        self, queue: Sequence[Job], running: Sequence[RunningJob], cluster: ClusterInventory, now_s: float
    ) -> list[Decision]:
        """Decide what to preempt and start now. `queue` holds the waiting jobs, `running` the jobs
        holding GPUs (their GPUs are already taken in `cluster`)."""

    def check_submission(self, job: Job, cluster: ClusterInventory) -> None:
        """Raise ValueError (UnplaceableJobError) if `job` could never run under this policy."""
        cluster.check_fits_ever(job)

    def next_review_s(
        self, queue: Sequence[Job], running: Sequence[RunningJob], now_s: float
    ) -> float | None:
        """When the policy wants another pass even if no job arrives or ends (None: never)."""
        return None


class Fitter:
    """An inventory plus a cache of gang sizes known not to fit, for O(1) rejections.

    While the inventory only shrinks, a gang of (tp, n GPUs) that failed fails again for any larger
    n; `grow` (after releasing GPUs) clears the cache.
    """

    def __init__(self, inventory: ClusterInventory) -> None:
        self.inventory = inventory
        self._smallest_failed: dict[int, int] = {}

    def fit(self, job: Job) -> Placement | None:
        gpus, tp = job.num_gpus, job.shape.tp
        if gpus > self.inventory.num_free_gpus or gpus >= self._smallest_failed.get(tp, gpus + 1):
            return None
        placement = place(job.shape, self.inventory)
        if placement is None:
            self._smallest_failed[tp] = gpus
        return placement

    def grow(self) -> None:
        self._smallest_failed.clear()


class PassPlanner:
    """Plans one pass: a private copy of the inventory, the decisions so far, and preemption search."""

    def __init__(
        self, cluster: ClusterInventory, running: Sequence[RunningJob], max_preemptions: int | None = None
    ) -> None:
        self.fitter = Fitter(cluster.copy())
        self.max_preemptions = max_preemptions
        self.running = list(running)
        self.started: list[RunningJob] = []
        self._preempts: list[PreemptJob] = []
        self._starts: list[StartJob] = []
        self._reserve: list[ReserveJob] = []
        self._released_on: dict[str, list[str]] = {}
        self._preempt_failed: dict[tuple[int, Hashable], int] = {}
        self.preempted: set[str] = set()

    @property
    def inventory(self) -> ClusterInventory:
        return self.fitter.inventory

    @property
    def full(self) -> bool:
        return self.inventory.num_free_gpus == 0

    def try_start(self, job: Job, now_s: float) -> bool:
        """Start `job` if it fits in the free GPUs now."""
        placement = self.fitter.fit(job)
        if placement is None:
            return False
        self.commit_start(job, placement, now_s)
        return True

    def commit_start(self, job: Job, placement: Placement, now_s: float) -> None:
        """Record a start whose placement fits the planner's inventory."""
        gpus_by_node = placement.gpus_by_node
        self.inventory.allocate(gpus_by_node)
        after: tuple[str, ...] = ()
        if self._released_on:
            after = tuple(sorted({v for node in gpus_by_node for v in self._released_on.get(node, ())}))
        self._starts.append(StartJob(job.job_id, placement, after))
        self.started.append(RunningJob(job, gpus_by_node, now_s, expected_end_s(job, now_s)))

    def reserve(self, decision: ReserveJob) -> None:
        self._reserve = [decision]

    def try_preempt_for(
        self, job: Job, victims: VictimList, now_s: float, reason: str, victim_class: Hashable
    ) -> bool:
        """Preempt the fewest of `victims` (taken in order of preference) so that `job` fits, and start it.

        Returns False, changing nothing, if preempting all of them would not make it fit, or once the
        pass has made `max_preemptions` preemptions (checked before each search, so one search may
        exceed it). `victim_class` names the victim set (same class, same victims within a pass) so
        that a failed search is not repeated for larger gangs of the same tp.
        """
        if self.preemptions_exhausted or self.preempt_known_to_fail(job, victim_class):
            return False
        chosen = _choose_victims(job, victims.live(self.preempted), self.inventory)
        if chosen is None:
            self._preempt_failed[(job.shape.tp, victim_class)] = job.num_gpus
            return False
        for victim in chosen:
            self.inventory.release(victim.gpus_by_node)
            for node in victim.gpus_by_node:
                self._released_on.setdefault(node, []).append(victim.job.job_id)
            self._preempts.append(PreemptJob(victim.job.job_id, reason))
            self.preempted.add(victim.job.job_id)
        self.fitter.grow()
        self._preempt_failed.clear()
        placement = place(job.shape, self.inventory)
        if placement is None:  # cannot happen: _choose_victims checked the same state
            raise RuntimeError(f"planner inconsistency placing {job.job_id} after preemption")
        self.commit_start(job, placement, now_s)
        return True

    @property
    def preemptions_exhausted(self) -> bool:
        return self.max_preemptions is not None and len(self.preempted) >= self.max_preemptions

    def preempt_known_to_fail(self, job: Job, victim_class: Hashable) -> bool:
        """True if a no-larger gang of the same tp already failed to fit by preempting this class."""
        failed = self._preempt_failed.get((job.shape.tp, victim_class))
        return failed is not None and job.num_gpus >= failed

    def decisions(self) -> list[Decision]:
        return [*self._preempts, *self._starts, *self._reserve]


def check_max_preemptions(value: object) -> int | None:
    """Validate a policy's `max_preemptions_per_pass` option (None: unbounded)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_preemptions_per_pass={value!r} must be a positive integer or None")
    return value  # type: ignore[return-value]


class VictimList:
    """Running jobs a class of waiting jobs may preempt, in order of preference, with lazy deletion:
    `live(gone)` skips preempted ones and permanently drops those at the front (amortised O(1))."""

    def __init__(self, runs: Iterable[RunningJob]) -> None:
        self._runs = list(runs)
        self._start = 0

    def __bool__(self) -> bool:
        return self._start < len(self._runs)

    def live(self, gone: set[str]) -> Iterator[RunningJob]:
        runs = self._runs
        while self._start < len(runs) and runs[self._start].job.job_id in gone:
            self._start += 1
        return (run for run in itertools.islice(runs, self._start, None) if run.job.job_id not in gone)


class _Overlay:
    """Free GPUs and TP-group capacity of an inventory plus/minus some jobs' GPUs, without copying it."""

    def __init__(self, inventory: ClusterInventory, tp: int) -> None:
        self.inventory, self.tp = inventory, tp
        self.extra: dict[str, int] = {}
        self.num_free = inventory.num_free_gpus
        self.capacity = inventory.group_capacity(tp)

    def shift(self, gpus_by_node: Mapping[str, int], sign: int) -> None:
        for node, count in gpus_by_node.items():
            base = self.inventory.free_by_node[node]
            before = base + self.extra.get(node, 0)
            self.extra[node] = before + sign * count - base
            self.capacity += (before + sign * count) // self.tp - before // self.tp
            self.num_free += sign * count

    def fits(self, job: Job) -> bool:
        return self.num_free >= job.num_gpus and self.capacity >= job.shape.num_tp_groups


def _choose_victims(
    job: Job, victims: Iterable[RunningJob], inventory: ClusterInventory
) -> list[RunningJob] | None:
    """Greedy prefix of `victims` that makes `job` fit, then pruned of victims not needed."""
    overlay = _Overlay(inventory, job.shape.tp)
    chosen: list[RunningJob] = []
    for victim in victims:
        overlay.shift(victim.gpus_by_node, +1)
        chosen.append(victim)
        if overlay.fits(job):
            break
    else:
        return None
    needed = [True] * len(chosen)
    for index in range(len(chosen) - 2, -1, -1):  # most valuable first: keep running who is not needed
        overlay.shift(chosen[index].gpus_by_node, -1)
        if overlay.fits(job):
            needed[index] = False
        else:
            overlay.shift(chosen[index].gpus_by_node, +1)
    return [victim for victim, keep in zip(chosen, needed, strict=True) if keep]


def expected_end_s(job: Job, now_s: float) -> float | None:
    """Estimated end of a job starting now: remaining work = duration minus service already received."""
    if job.duration_s is None:
        return None
    done_s = job.attained_service_gpu_s / job.num_gpus
    return now_s + max(0.0, job.duration_s - done_s)


def submit_order(jobs: Iterable[Job], key: Callable[[Job], object] | None = None) -> list[Job]:
    """Jobs sorted by `key` (default: higher priority class first, then submit time); stable."""
    return sorted(jobs, key=key or (lambda job: (-job.priority, job.submit_time_s)))
