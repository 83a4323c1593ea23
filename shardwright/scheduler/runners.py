"""Runners: what the scheduler starts, polls, preempts and stops for one job.

A runner lives in the scheduler's process (the Ray driver) and owns the job's controller
(InferenceEngine or TrainingController), whose gang of workers is pinned rank by rank to the nodes
of the scheduler's placement (`bundle_nodes`). Because the workers are owned by this process, they
end with it: a scheduler that dies takes its jobs' gangs with it (see `service.py` on recovery).

Contract of every runner (`JobRunner`):
- `start(resume_from_checkpoint)` returns once the gang is up (or raises, naming the phase/rank);
- `progress()` is cheap and never raises: state 'running' | 'succeeded' | 'failed', step, error,
  checkpoint (latest, or None);
- `checkpoint_and_stop(timeout_s)` leaves no worker behind and returns the checkpoint written (None
  for jobs that have no state to keep);
- `stop()` is idempotent and releases the gang;
- `worker_nodes()` is the Ray node id of each rank's worker, as running.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Protocol, TypedDict

from shardwright.config import InferenceDeployment, TrainingJob

log = logging.getLogger(__name__)

RunnerState = Literal["running", "succeeded", "failed"]


class Progress(TypedDict):
    state: RunnerState
    step: int
    error: str | None
    checkpoint: str | None
    loss: float | None


class JobRunner(Protocol):
    def start(self, resume_from_checkpoint: str | None) -> None: ...

    def progress(self) -> Progress: ...

    def checkpoint_and_stop(self, timeout_s: float) -> str | None: ...

    def stop(self) -> None: ...

    def worker_nodes(self) -> list[str]: ...


class InferenceRunner:
    """An InferenceEngine serving the deployment; it runs until stopped (never 'succeeds')."""

    def __init__(self, spec: InferenceDeployment, bundle_nodes: tuple[str, ...] | None) -> None:
        self.spec, self.bundle_nodes = spec, bundle_nodes
        self.engine = None

    def start(self, resume_from_checkpoint: str | None = None) -> None:
        from shardwright.actors.engine import EngineConfig, InferenceEngine

        s, e = self.spec, self.spec.engine
        config = EngineConfig(model_dir=s.model, layout=s.layout, dtype=s.dtype, block_size=e.block_size,
                              num_blocks=e.num_blocks, max_running=e.max_running,
                              max_tokens_per_step=e.max_tokens_per_step, bundle_nodes=self.bundle_nodes,
                              pool=e.pool, quant=e.quant, group_size=e.group_size)
        self.engine = InferenceEngine(config).start()

    def progress(self) -> Progress:
        if self.engine is None:
            return Progress(state="failed", step=0, error="the engine was never started", checkpoint=None,
                            loss=None)
        health = self.engine.health(probe=False)
        return Progress(state="running", step=int(health["steps"]), error=health["last_error"],
                        checkpoint=None, loss=None)

    def checkpoint_and_stop(self, timeout_s: float) -> str | None:
        """Serving keeps no state worth a checkpoint: just stop."""
        self.stop()
        return None

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def worker_nodes(self) -> list[str]:
        gang = getattr(self.engine, "_gang", None)  # the engine exposes no public accessor yet
        return [node["node_id"] for node in gang.nodes] if gang is not None else []


class TrainingRunner:
    """A TrainingController: trains in the background, checkpoints on preemption, resumes from one."""

    def __init__(self, spec: TrainingJob, bundle_nodes: tuple[str, ...] | None, checkpoint_dir: Path) -> None:
        self.spec, self.bundle_nodes, self.checkpoint_dir = spec, bundle_nodes, checkpoint_dir
        self.controller = None

    def start(self, resume_from_checkpoint: str | None) -> None:
        from shardwright.actors.training import TrainingController

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.controller = TrainingController(self.spec, checkpoint_dir=self.checkpoint_dir,
                                             bundle_nodes=self.bundle_nodes)
        self.controller.start(resume_from=resume_from_checkpoint)

    def progress(self) -> Progress:
        if self.controller is None:
            return Progress(state="failed", step=0, error="the controller was never started", checkpoint=None,
                            loss=None)
        try:
            raw: dict[str, Any] = self.controller.progress()
        except Exception as err:  # progress must not raise: report it as the job's failure
            return Progress(state="failed", step=0, error=f"progress() failed: {err}", checkpoint=None, loss=None)
        state = raw.get("state", "running")
        return Progress(state=state if state in ("succeeded", "failed") else "running",
                        step=int(raw.get("step") or 0), error=raw.get("error"),
                        checkpoint=_path_or_none(raw.get("checkpoint")), loss=raw.get("loss"))

    def checkpoint_and_stop(self, timeout_s: float) -> str | None:
        if self.controller is None:
            return None
        return _path_or_none(self.controller.checkpoint_and_stop(timeout_s))

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()

    def worker_nodes(self) -> list[str]:
        """The planned node of each rank (the gang is pinned to them)."""
        return list(self.bundle_nodes or ())


def _path_or_none(value: object) -> str | None:
    return str(value) if value else None


def make_runner(spec: TrainingJob | InferenceDeployment, *, bundle_nodes: tuple[str, ...] | None,
                checkpoint_dir: Path) -> JobRunner:
    """The runner for a job spec (the scheduler's default runner factory)."""
    if isinstance(spec, InferenceDeployment):
        return InferenceRunner(spec, bundle_nodes)
    return TrainingRunner(spec, bundle_nodes, checkpoint_dir)
