"""The scheduler's plain view of jobs and of the cluster.

Everything here is plain Python (no Ray, gRPC, Redis or torch) so that the same objects drive the
trace-driven simulator and, later, the Ray-backed controller.

- `GangShape` is a job's parallel layout: `tp * pp * cp * dp` ranks, one GPU each, laid out as a
  dp x pp x cp x tp mesh with tp varying fastest (as `shardwright.config.ParallelLayout`), so a TP
  group is a run of `tp` consecutive ranks and must sit inside one node.
- `Job` is immutable; a requeued job is a `dataclasses.replace` copy with more attained service.
- `ClusterInventory` is mutable: node id -> total and free GPUs, with nodes bucketed by their free
  GPU count so that placement never scans every node.

Every constructor validates its inputs and raises `ValueError` naming the field and the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

from shardwright.config import PRIORITY_ORDER

JobKind = Literal["training", "inference"]
JOB_KINDS: tuple[JobKind, ...] = ("training", "inference")


class PriorityClass(IntEnum):
    """The job files' priority classes (`config.PRIORITY_ORDER`: low, batch, serving, high) as the
    policies rank them, higher value = more important; `PriorityClass[name.upper()]` of a job file's
    class. BEST_EFFORT, TRAINING, INFERENCE and CRITICAL are the older names of the same four, still
    read in simulator traces.

    Guarantee kept by every policy: only `training` jobs are ever preempted (so training never
    preempts inference, whatever the classes), and never by a job of a lower class. `priority`
    preempts only strictly lower classes; `las` also preempts, within one class, jobs that have
    received more service.
    """

    LOW = 0
    BATCH = 1
    SERVING = 2
    HIGH = 3
    BEST_EFFORT = 0  # aliases: the names traces used before
    TRAINING = 1
    INFERENCE = 2
    CRITICAL = 3


if tuple(p.name.lower() for p in PriorityClass) != PRIORITY_ORDER:  # one order of the priority classes
    raise ImportError(f"PriorityClass {list(PriorityClass)} does not follow config.PRIORITY_ORDER {PRIORITY_ORDER}")

DEFAULT_PRIORITY: dict[str, PriorityClass] = {
    "training": PriorityClass.BATCH,
    "inference": PriorityClass.SERVING,
}


class UnplaceableJobError(ValueError):
    """The job can never run on this cluster (raised at submission, not after waiting)."""


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_time(name: str, value: object, allow_zero: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be {bound} seconds")


@dataclass(frozen=True, slots=True)
class GangShape:
    """A gang of `tp * pp * cp * dp * ep` ranks, one GPU per rank; rank order is dp, pp, cp, ep, tp (tp fastest).

    `from_layout` accepts any object with integer `tp`, `pp`, `cp`, `dp` (and `ep`) attributes, such as
    `shardwright.config.ParallelLayout`.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1  # expert parallel: ep TP groups per (dp, pp, cp) position, placed like the others
    peers: int = 0  # memory peers of an inference gang: one GPU each, on any node (after the ranks)
    num_gpus: int = field(init=False, repr=False, compare=False)  # tp * pp * cp * dp * ep + peers
    num_tp_groups: int = field(init=False, repr=False, compare=False)  # pp * cp * dp * ep, each on one node

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp", "ep"):
            _check_positive_int(name, getattr(self, name))
        if isinstance(self.peers, bool) or not isinstance(self.peers, int) or self.peers < 0:
            raise ValueError(f"peers={self.peers!r} must be a non-negative integer")
        object.__setattr__(self, "num_tp_groups", self.pp * self.cp * self.dp * self.ep)
        object.__setattr__(self, "num_gpus", self.tp * self.num_tp_groups + self.peers)

    @classmethod
    def from_layout(cls, layout: object) -> GangShape:
        """Shape of a `ParallelLayout`-like object (attributes tp, pp, cp, dp)."""
        return cls(*(getattr(layout, name, 1) for name in ("tp", "pp", "cp", "dp", "ep")))


@dataclass(frozen=True, slots=True)
class Job:
    """One job as the scheduler sees it. Immutable; update with `dataclasses.replace`.

    `priority=None` takes the kind's default (`DEFAULT_PRIORITY`: inference above training).
    `duration_s` is the job's work (run time without interruptions): the simulator uses it as the
    truth and the backfill policy as the estimate; a live job may leave it `None`.
    `attained_service_gpu_s` is GPU-seconds already received (before any preemption), and
    `queued_since_s` when the job last entered the queue (None: its submit time).
    """

    job_id: str
    tenant: str
    kind: JobKind
    shape: GangShape
    submit_time_s: float
    priority: int | None = None
    deadline_s: float | None = None
    duration_s: float | None = None
    attained_service_gpu_s: float = 0.0
    queued_since_s: float | None = None
    num_gpus: int = field(init=False, repr=False, compare=False)  # shape.num_gpus

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not self.job_id:
            raise ValueError(f"job_id={self.job_id!r} must be a non-empty string")
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError(f"job {self.job_id}: tenant={self.tenant!r} must be a non-empty string")
        if self.kind not in JOB_KINDS:
            raise ValueError(f"job {self.job_id}: kind={self.kind!r} must be one of {JOB_KINDS}")
        if not isinstance(self.shape, GangShape):
            raise ValueError(f"job {self.job_id}: shape={self.shape!r} must be a GangShape")
        self._check_times()
        object.__setattr__(self, "num_gpus", self.shape.num_gpus)
        if self.priority is None:
            object.__setattr__(self, "priority", int(DEFAULT_PRIORITY[self.kind]))
        elif isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"job {self.job_id}: priority={self.priority!r} must be an integer class")

    def _check_times(self) -> None:
        _check_time("submit_time_s", self.submit_time_s)
        if self.deadline_s is not None:
            _check_time("deadline_s", self.deadline_s)
            if self.deadline_s < self.submit_time_s:
                raise ValueError(
                    f"job {self.job_id}: deadline_s={self.deadline_s} is before "
                    f"submit_time_s={self.submit_time_s}"
                )
        if self.duration_s is not None:
            _check_time("duration_s", self.duration_s, allow_zero=False)
        _check_time("attained_service_gpu_s", self.attained_service_gpu_s)
        if self.queued_since_s is not None:
            _check_time("queued_since_s", self.queued_since_s)

    @property
    def waiting_since_s(self) -> float:
        """When the job last entered the queue."""
        return self.submit_time_s if self.queued_since_s is None else self.queued_since_s

    @property
    def preemptible(self) -> bool:
        """Only training jobs can be checkpointed and requeued; inference is never preempted."""
        return self.kind == "training"


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job holding GPUs: its placement (`gpus_by_node`), when it (re)started, and when it is
    expected to end (`None` if unknown; backfill then treats it as running forever)."""

    job: Job
    gpus_by_node: Mapping[str, int]
    start_time_s: float
    expected_end_s: float | None = None

    def attained_service_gpu_s(self, now_s: float) -> float:
        """GPU-seconds received so far, including the current run up to `now_s`."""
        ran_s = max(0.0, now_s - self.start_time_s)
        return self.job.attained_service_gpu_s + self.job.num_gpus * ran_s


@dataclass(slots=True)
class ClusterInventory:
    """Node id -> total and free GPUs, nodes bucketed by free count (bucket order is insertion order).

    Invariants: 0 <= free <= total for every node; `num_free_gpus` is the sum of free GPUs;
    `buckets[f]` holds exactly the nodes with f free GPUs. Mutated only by `allocate` / `release`.
    """

    total_by_node: dict[str, int]
    free_by_node: dict[str, int]
    buckets: list[dict[str, None]] = field(default_factory=list)
    num_free_gpus: int = 0

    @classmethod
    def from_nodes(
        cls, total_by_node: Mapping[str, int], free_by_node: Mapping[str, int] | None = None
    ) -> ClusterInventory:
        """Build from node id -> total GPUs (and optionally free GPUs; default all free)."""
        if not total_by_node:
            raise ValueError("a cluster needs at least one node; got an empty node list")
        totals = dict(total_by_node)
        frees = dict(free_by_node) if free_by_node is not None else dict(totals)
        for node, total in totals.items():
            _check_positive_int(f"GPUs of node {node!r}", total)
            free = frees.get(node)
            if isinstance(free, bool) or not isinstance(free, int) or not 0 <= free <= total:
                raise ValueError(f"free GPUs of node {node!r} = {free!r} must be an integer in [0, {total}]")
        unknown = set(frees) - set(totals)
        if unknown:
            raise ValueError(f"free GPUs given for unknown nodes {sorted(unknown)}")
        buckets: list[dict[str, None]] = [{} for _ in range(max(totals.values()) + 1)]
        for node in totals:
            buckets[frees[node]][node] = None
        return cls(totals, frees, buckets, sum(frees.values()))

    @classmethod
    def uniform(cls, num_nodes: int, gpus_per_node: int, prefix: str = "node") -> ClusterInventory:
        """`num_nodes` identical nodes named `{prefix}-0000`, ... with all GPUs free."""
        _check_positive_int("num_nodes", num_nodes)
        _check_positive_int("gpus_per_node", gpus_per_node)
        return cls.from_nodes({f"{prefix}-{i:04d}": gpus_per_node for i in range(num_nodes)})

    def copy(self) -> ClusterInventory:
        """An independent copy (O(nodes)); policies plan on copies and never mutate their input."""
        return ClusterInventory(
            dict(self.total_by_node),
            dict(self.free_by_node),
            [dict(b) for b in self.buckets],
            self.num_free_gpus,
        )

    @property
    def num_gpus(self) -> int:
        return sum(self.total_by_node.values())

    @property
    def max_node_gpus(self) -> int:
        return len(self.buckets) - 1

    def group_capacity(self, tp: int) -> int:
        """How many TP groups of size `tp` fit in the free GPUs now (O(max GPUs per node))."""
        return sum(len(nodes) * (free // tp) for free, nodes in enumerate(self.buckets) if free >= tp)

    def allocate(self, gpus_by_node: Mapping[str, int]) -> None:
        """Take GPUs; raises ValueError (and changes nothing) if any node lacks them."""
        for node, count in gpus_by_node.items():
            if not 0 < count <= self.free_by_node.get(node, -1):
                raise ValueError(
                    f"cannot take {count} GPUs on node {node!r}: {self.free_by_node.get(node)} free"
                )
        for node, count in gpus_by_node.items():
            self._move(node, self.free_by_node[node] - count)

    def release(self, gpus_by_node: Mapping[str, int]) -> None:
        """Give GPUs back; raises ValueError (and changes nothing) if that would exceed a node's total."""
        for node, count in gpus_by_node.items():
            total = self.total_by_node.get(node, -1)
            if count < 1 or self.free_by_node.get(node, total) + count > total:
                raise ValueError(f"cannot release {count} GPUs on node {node!r}: over its total of {total}")
        for node, count in gpus_by_node.items():
            self._move(node, self.free_by_node[node] + count)

    def _move(self, node: str, new_free: int) -> None:
        old_free = self.free_by_node[node]
        del self.buckets[old_free][node]
        self.buckets[new_free][node] = None
        self.free_by_node[node] = new_free
        self.num_free_gpus += new_free - old_free

    def check_fits_ever(self, job: Job) -> None:
        """Raise `UnplaceableJobError` if `job` could not run even on this cluster when empty."""
        shape, total = job.shape, self.num_gpus
        if job.num_gpus > total:
            raise UnplaceableJobError(
                f"job {job.job_id} asks for {job.num_gpus} GPUs (tp={shape.tp} pp={shape.pp} cp={shape.cp} "
                f"dp={shape.dp}), larger than the whole cluster ({total} GPUs on {len(self.total_by_node)} "
                "nodes); shrink the gang or add nodes"
            )
        if shape.tp > self.max_node_gpus:
            raise UnplaceableJobError(
                f"job {job.job_id} cannot ever be placed: tp={shape.tp} is larger than any node "
                f"(largest has {self.max_node_gpus} GPUs) and a TP group must sit inside one node; "
                f"choose tp <= {self.max_node_gpus}"
            )
        groups = sum(t // shape.tp for t in self.total_by_node.values())
        if groups < shape.num_tp_groups:
            raise UnplaceableJobError(
                f"job {job.job_id} cannot ever be placed: it needs {shape.num_tp_groups} TP groups of "
                f"tp={shape.tp} GPUs on single nodes, and the nodes can hold only {groups}; "
                "pick a tp that divides the GPUs per node"
            )
