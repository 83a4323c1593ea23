"""Pluggable scheduling policies behind one interface (`SchedulingPolicy.schedule`).

Names used on the command line: `fifo`, `priority`, `fairshare`, `backfill`, `las`.
`make_policy(name, **options)` builds one; see each module for its guarantees.
"""

from __future__ import annotations

from typing import Any

from shardwright.scheduler.policies.backfill import BackfillPolicy
from shardwright.scheduler.policies.base import Decision, PreemptJob, ReserveJob, SchedulingPolicy, StartJob
from shardwright.scheduler.policies.fairshare import FairSharePolicy
from shardwright.scheduler.policies.fifo import FifoPolicy
from shardwright.scheduler.policies.las import LasPolicy
from shardwright.scheduler.policies.priority import PriorityPolicy

POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fifo": FifoPolicy,
    "priority": PriorityPolicy,
    "fairshare": FairSharePolicy,
    "backfill": BackfillPolicy,
    "las": LasPolicy,
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def make_policy(name: str, **options: Any) -> SchedulingPolicy:
    """Build the policy called `name` with its keyword options (e.g. `quotas_gpus` for fairshare)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return cls(**options)


__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "BackfillPolicy",
    "Decision",
    "FairSharePolicy",
    "FifoPolicy",
    "LasPolicy",
    "PreemptJob",
    "PriorityPolicy",
    "ReserveJob",
    "SchedulingPolicy",
    "StartJob",
    "make_policy",
]
