"""The job model: its states and the moves between them, the stored record, its events.

Plain pydantic (no Redis, Ray or torch). The states are `shardwright.config.JobState`, the one
vocabulary that controllers report in too; `ALLOWED` is the state machine the job store enforces.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shardwright.config import JobState, ParallelLayout
from shardwright.scheduler.model import JobKind

__all__ = ["ALLOWED", "ENDED", "HOLDING", "TERMINAL", "WAITING", "JobEvent", "JobLimitError", "JobRecord", "JobState",
           "LeaseLostError", "TransitionError"]

WAITING = frozenset({JobState.QUEUED, JobState.PREEMPTED})  # in the queue
HOLDING = frozenset({JobState.PLACED, JobState.RUNNING, JobState.PREEMPTING})  # hold GPUs
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED})  # how a job's controller ends by itself
_ANY_END = {JobState.FAILED, JobState.CANCELLED}
ALLOWED: dict[JobState, frozenset[JobState]] = {  # state -> states it may move to
    JobState.SUBMITTED: frozenset({JobState.QUEUED, *_ANY_END}),
    JobState.QUEUED: frozenset({JobState.PLACED, *_ANY_END}),
    JobState.PREEMPTED: frozenset({JobState.PLACED, *_ANY_END}),
    JobState.PLACED: frozenset({JobState.RUNNING, JobState.QUEUED, *_ANY_END}),
    JobState.RUNNING: frozenset({JobState.PREEMPTING, JobState.QUEUED, JobState.SUCCEEDED, *_ANY_END}),
    JobState.PREEMPTING: frozenset({JobState.PREEMPTED, JobState.QUEUED, *_ANY_END}),
    **{state: frozenset() for state in TERMINAL},
}


class JobRecord(BaseModel):
    """One job as stored: the spec, its state and what the scheduler knows about its run."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(description="Unique id, '<name>-<number>'.")
    name: str = Field(description="The spec's name (unique among a tenant's unfinished jobs).")
    kind: JobKind = Field(description="Job kind.")
    tenant: str = Field(description="Owner.")
    state: JobState = Field(description="Current state.")
    priority: str = Field(description="The spec's priority class name.")
    layout: ParallelLayout = Field(description="How the job's ranks split the model (its gang's GPUs).")
    spec: dict[str, Any] = Field(description="The validated job spec (JSON form).")
    submitted_at_s: float = Field(description="Unix time of submission.")
    updated_at_s: float = Field(description="Unix time of the last write.")
    message: str = Field("", description="The latest event's message.")
    step: int = Field(0, description="Training progress (optimizer steps); engine steps for inference.")
    checkpoint: str | None = Field(None, description="Latest checkpoint path (training resumes from it).")
    placement: list[str] = Field(default_factory=list, description="Ray node id per rank while placed.")
    idempotency_key: str | None = Field(None, description="The client's submission key, if any.")
    attempts: int = Field(0, description="How many times the job was started.")
    attained_service_gpu_s: float = Field(0.0, description="GPU-seconds received in finished runs.")
    queued_since_s: float | None = Field(None, description="When the job last entered the queue.")
    started_at_s: float | None = Field(None, description="When the current run was placed.")
    cancel_requested: bool = Field(False, description="Cancel asked while the job held GPUs.")
    num_events: int = Field(0, description="Events in the log (the next event's sequence number).")
    order: int = Field(0, description="Submission order number (listing order and page tokens).")


class JobEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequence: int = Field(description="0, 1, 2, ... per job, without gaps.")
    job_id: str = Field(description="The job.")
    state: JobState = Field(description="The job's state after the event.")
    message: str = Field(description="What happened, for people.")
    time_s: float = Field(description="Unix time.")
    metrics: dict[str, float] = Field(default_factory=dict, description="e.g. step, loss.")


class TransitionError(ValueError):
    """A state change the job's current state does not allow (the message says which)."""


class LeaseLostError(RuntimeError):
    """A fenced write by a scheduler that no longer holds the lease (nothing was written)."""


class JobLimitError(RuntimeError):
    """The tenant already has as many unfinished jobs as its tenants-file entry allows (max_jobs)."""
