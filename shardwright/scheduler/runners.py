"""Runners: the scheduler's handle on one job's controller, which runs in a detached Ray actor.

Each job's controller (InferenceEngine for a deployment, TrainingController for a training job) runs
in its own named, detached Ray actor (shardwright.actors.controllers), which owns the job's gang and
placement group, pinned rank by rank to the nodes of the scheduler's placement (`bundle_nodes`).
The scheduler process only holds a handle: killing it kills no controller and no worker, and a
scheduler that starts later adopts the controller by its name (`ControllerRunner.adopt`).

Contract of every runner (`JobRunner`):
- `start(resume_from_checkpoint)` returns once the gang is up (or raises, naming the phase/rank);
- `progress()` is cheap and never raises: state (a JobState: RUNNING, or how the job ended by itself,
  SUCCEEDED or FAILED), step, error,
  checkpoint (latest, or None); a controller actor that died is 'failed', naming that;
- `checkpoint_and_stop(timeout_s)` leaves no worker behind and returns the checkpoint written (None
  for jobs that have no state to keep);
- `stop()` is idempotent and releases the gang (the controller actor ends, and its workers with it);
- `worker_nodes()` is the Ray node id of each rank's worker, as running.

The scheduler reaches the cluster through two seams, so that its reconcile logic runs on plain
fakes too: `Controllers` (create, adopt, list and stop the controllers of a store's jobs; here
`RayControllers`) and a `nodes()` callable (cluster.inventory.list_nodes on Ray).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, TypedDict

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from shardwright.actors.controllers import (DeploymentClient, cause_of, controller_names, create_controller,
                                            find_controller)
from shardwright.config import InferenceDeployment, JobState, TrainingJob
from shardwright.scheduler.jobs import ENDED

log = logging.getLogger(__name__)

PROGRESS_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0


class Progress(TypedDict):
    state: JobState  # RUNNING, or one of ENDED (SUCCEEDED, FAILED)
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


class ControllerRunner:
    """A job's controller actor, seen from the scheduler (deployments and training alike)."""

    def __init__(self, job_id: str, spec: TrainingJob | InferenceDeployment, *, name: str,
                 bundle_nodes: tuple[str, ...] | None, checkpoint_dir: Path, actor=None) -> None:
        self.job_id, self.spec, self.name = job_id, spec, name
        self.bundle_nodes, self.checkpoint_dir = bundle_nodes, checkpoint_dir
        self.actor = actor
        self._last: Progress = Progress(state=JobState.RUNNING, step=0, error=None, checkpoint=None, loss=None)
        self._client: DeploymentClient | None = None
        self._stopped = False
        self.stats: dict[str, float] = {}

    @classmethod
    def adopt(cls, job_id: str, spec: TrainingJob | InferenceDeployment, *, name: str,
              bundle_nodes: tuple[str, ...] | None, checkpoint_dir: Path) -> ControllerRunner | None:
        """The runner of a live, answering controller actor named `name`, or None (no such actor,
        or it does not answer: the caller stops it and requeues the job)."""
        actor = find_controller(name)
        if actor is None:
            return None
        runner = cls(job_id, spec, name=name, bundle_nodes=bundle_nodes, checkpoint_dir=checkpoint_dir, actor=actor)
        try:
            ray.get(actor.progress.remote(), timeout=PROGRESS_TIMEOUT_S)
        except Exception as err:  # dead or hung: not adoptable
            log.warning("controller %s of job %s does not answer (%s): not adopted", name, job_id, cause_of(err))
            runner.stop()
            return None
        return runner

    def start(self, resume_from_checkpoint: str | None = None) -> None:
        near = self.bundle_nodes[0] if self.bundle_nodes else None
        if isinstance(self.spec, InferenceDeployment):
            args = (self.job_id, _engine_config(self.spec, self.bundle_nodes))
        else:
            args = (self.job_id, self.spec.model_dump(mode="json"), str(self.checkpoint_dir), self.bundle_nodes)
        self.actor = create_controller(self.spec.kind, self.name, near, *args)
        try:
            step = ray.get(self.actor.start.remote(resume_from_checkpoint))
        except Exception as err:
            self.stop()
            raise RuntimeError(cause_of(err)) from err
        self._last = Progress(state=JobState.RUNNING, step=int(step), error=None, checkpoint=resume_from_checkpoint,
                              loss=None)

    def progress(self) -> Progress:
        if self.actor is None:  # stopped: what it last reported
            return self._last if self._stopped else Progress(
                state=JobState.FAILED, step=0, error="the controller was never started", checkpoint=None, loss=None)
        try:
            raw = ray.get(self.actor.progress.remote(), timeout=PROGRESS_TIMEOUT_S)
        except GetTimeoutError:  # busy, not dead: report what we last knew
            return self._last
        except RayActorError as err:
            return Progress(state=JobState.FAILED, step=self._last["step"], error=f"the controller actor {self.name} "
                            f"died ({type(err).__name__})", checkpoint=self._last["checkpoint"], loss=None)
        except Exception as err:  # progress must not raise: report it as the job's failure
            return Progress(state=JobState.FAILED, step=self._last["step"], error=f"progress() failed: {cause_of(err)}",
                            checkpoint=self._last["checkpoint"], loss=None)
        state = JobState(raw.get("state", JobState.RUNNING))
        # the engine's load (running, waiting, KV blocks) or the last training step's metrics, for /metrics
        self.stats = dict(raw.get("stats") or raw.get("metrics") or {})
        self._last = Progress(state=state if state in ENDED else JobState.RUNNING,
                              step=int(raw.get("step") or 0), error=raw.get("error"),
                              checkpoint=_path_or_none(raw.get("checkpoint")), loss=raw.get("loss"))
        return self._last

    def checkpoint_and_stop(self, timeout_s: float) -> str | None:
        """Training: finish the step, checkpoint, stop; serving keeps no state worth one: just stop."""
        if self.actor is None or isinstance(self.spec, InferenceDeployment):
            self.stop()
            return None
        try:
            path = ray.get(self.actor.checkpoint_and_stop.remote(timeout_s), timeout=timeout_s + 30)
            self._last = Progress(**{**self._last, "checkpoint": _path_or_none(path)})
            self.progress()  # the step it stopped at
            return _path_or_none(path)
        except Exception as err:
            raise RuntimeError(cause_of(err)) from err
        finally:
            self.stop()

    def stop(self) -> None:
        actor, self.actor = self.actor, None
        if actor is None:
            return
        self._stopped = True
        try:
            ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT_S)
        except Exception as err:  # dead already, or stuck: the kill below ends it either way
            log.info("controller %s did not stop cleanly: %s", self.name, cause_of(err))
        ray.kill(actor, no_restart=True)
        self._client = None

    def describe(self) -> dict:
        """The controller's pid and its workers (node_id, ip, pid per rank); {} if it does not answer."""
        if self.actor is None:
            return {}
        try:
            return ray.get(self.actor.describe.remote(), timeout=PROGRESS_TIMEOUT_S)
        except Exception:
            return {}

    def worker_nodes(self) -> list[str]:
        """Each rank's node as running (the memory peers after the compute ranks), else as planned."""
        return [w["node_id"] for w in self.describe().get("workers") or []] or list(self.bundle_nodes or ())

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.describe().get("workers") or []]

    def client(self) -> DeploymentClient | None:
        """How callers reach the deployment (None for training, or once stopped)."""
        if self._client is None and self.actor is not None and isinstance(self.spec, InferenceDeployment):
            self._client = DeploymentClient(self.job_id, self.actor, str(self.spec.model))
        return self._client


def _engine_config(spec: InferenceDeployment, bundle_nodes: tuple[str, ...] | None) -> dict:
    """The EngineConfig of a deployment (as plain data for the controller actor): every serving option
    of its job file as it is (EngineConfig extends EngineOptions), plus model, layout and placement."""
    return {**spec.engine.model_dump(mode="json"), "model_dir": str(spec.model),
            "layout": spec.layout.model_dump(), "dtype": spec.dtype,
            "bundle_nodes": list(bundle_nodes) if bundle_nodes is not None else None}


def _path_or_none(value: object) -> str | None:
    return str(value) if value else None


class Controllers(Protocol):
    """The job controllers of the cluster, as the scheduler drives them (`RayControllers` on Ray)."""

    def create(self, spec: TrainingJob | InferenceDeployment, *, job_id: str, name: str,
               bundle_nodes: tuple[str, ...] | None, checkpoint_dir: Path) -> JobRunner:
        """A runner for a job that is not started yet (its `start` starts the controller)."""

    def adopt(self, spec: TrainingJob | InferenceDeployment, *, job_id: str, name: str,
              bundle_nodes: tuple[str, ...] | None, checkpoint_dir: Path) -> JobRunner | None:
        """The runner of the live, answering controller named `name`, or None."""

    def names(self, store_id: str) -> list[str]:
        """Names of the live controllers of the store `store_id`."""

    def stop(self, name: str) -> None:
        """End the controller named `name` (and its gang), if it lives."""


class RayControllers:
    """The controllers as detached Ray actors (shardwright.actors.controllers)."""

    def create(self, spec, *, job_id, name, bundle_nodes, checkpoint_dir) -> ControllerRunner:
        return ControllerRunner(job_id, spec, name=name, bundle_nodes=bundle_nodes, checkpoint_dir=checkpoint_dir)

    def adopt(self, spec, *, job_id, name, bundle_nodes, checkpoint_dir) -> ControllerRunner | None:
        return ControllerRunner.adopt(job_id, spec, name=name, bundle_nodes=bundle_nodes,
                                      checkpoint_dir=checkpoint_dir)

    def names(self, store_id: str) -> list[str]:
        return controller_names(store_id)

    def stop(self, name: str) -> None:
        actor = find_controller(name)
        if actor is not None:
            ray.kill(actor, no_restart=True)
