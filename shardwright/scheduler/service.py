"""The live scheduler: a controller that reconciles the jobs stored in Redis with runners on Ray.

API (thread-safe; jobs are returned as JSON-able dicts of `JobRecord` fields, events as dicts of
`JobEvent` fields): `submit`, `submit_text`, `get`, `list`, `cancel`, `events`, `wait_events`,
`cluster_info`, `engine`, `health`. `start()` runs the reconcile loop in a thread; `stop()` ends it.

Guarantees:
- Persisted before acted on. Every state change is one Redis transaction with its event. An action
  is preceded by its intent and followed by its outcome: `placed` (with the placement) before the
  gang is started, then `running`; `preempting` before the checkpoint is asked for, then
  `preempted` (with the checkpoint path, back in the queue); a cancel request (`cancel_requested`
  and an event) before the gang is stopped, then `cancelled`. A job that ends by itself is recorded
  `succeeded`/`failed` before its gang is released, so a crash in between cannot re-run it.
- Idempotent: `submit` with the same (tenant, idempotency key) returns the same job; `cancel` of a
  cancelled or finished job returns it unchanged; `reconcile_once` acts only on stored state, so
  running it again after a crash repeats nothing that was recorded as done.
- One acting scheduler per store: the loop holds a lease in Redis (renewed every `lease_ttl_s`/3); a
  second scheduler waits for it, so a crashed scheduler is replaced within `lease_ttl_s`. Only a
  lease that another scheduler holds stops this one's actions, and then it stops no job: the holder
  adopts them. While Redis is unreachable the loop pauses and every job keeps running (generation
  needs no Redis); when Redis answers again the lease is renewed and scheduling resumes.
- Controllers outlive the scheduler: each job's controller runs in a detached Ray actor named by the
  store's id and the job id (runners.py), which owns the gang. A scheduler that starts reconciles
  Redis with the live actors: a placed job is requeued (its start may have been cut short); a running
  or preempting job whose controller actor answers is adopted as it is (same workers, no reload, no
  checkpoint restore); one whose actor is gone is requeued (`queued`, with a message) and training
  resumes from its last recorded checkpoint; jobs whose cancel was requested are stopped and become
  `cancelled`. Queued and preempted jobs stay queued in their order. No job is lost and none is
  duplicated (ids and queue membership live in Redis only).
- No orphans: every pass stops the controller actors of this store that run no job of this
  scheduler (a job missing from Redis, finished, or requeued), and with them their gangs and
  placement groups.

Checkpoints of training jobs go to `<state_dir>/checkpoints/<job id>/`; on a multi-node cluster that
directory must be shared storage, since a job may resume on other nodes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, TypeAdapter

import ray
import redis

from shardwright.actors.controllers import controller_name, controller_names, find_controller, job_of
from shardwright.cluster import inventory
from shardwright.cluster.ray_connect import connect
from shardwright.cluster.state_store import HOLDING, TERMINAL, WAITING, JobRecord, JobState, StateStore
from shardwright.cluster.state_store import LeaseLostError, TransitionError
from shardwright.config import (InferenceDeployment, JobFileError, JobSpec, ModelSpec, ParallelLayout, Settings,
                                StrictModel, TrainingJob, check_spec_size, parse_job)
from shardwright.scheduler.model import ClusterInventory, GangShape, Job, PriorityClass, RunningJob
from shardwright.scheduler.placement import Placement
from shardwright.scheduler.policies import PreemptJob, StartJob, make_policy
from shardwright.scheduler.runners import ControllerRunner, JobRunner, Progress, make_runner
from shardwright.tenants import Tenants, confine_paths
from shardwright.training.reshard import served_model_dir, served_model_spec

log = logging.getLogger(__name__)
S = JobState

_SPEC = TypeAdapter(JobSpec)


class SchedulerConfig(StrictModel):
    """How the live scheduler decides and how often it looks."""

    policy: Literal["fifo", "priority", "fairshare", "backfill", "las"] = Field(
        "priority", description="Scheduling policy (scheduler.policies).")
    policy_options: dict[str, Any] = Field(default_factory=dict,
                                           description="Keyword options of the policy, e.g. quotas_gpus.")
    namespace: str = Field("shardwright", min_length=1, description="Redis key prefix.")
    reconcile_interval_s: float = Field(0.5, gt=0, description="Pause between passes (submit/cancel wake it).")
    lease_ttl_s: float = Field(5.0, gt=0, description="A dead scheduler's lease expires after this.")
    checkpoint_timeout_s: float = Field(300.0, gt=0, description="How long a preempted job may take to checkpoint.")
    progress_event_interval_s: float = Field(10.0, gt=0, description="Least time between progress events of a job.")


class JobNotFoundError(LookupError):
    """No such job for this tenant."""


class SchedulerService:
    """The control plane of jobs: API calls write Redis; the reconcile loop acts on it."""

    def __init__(self, settings: Settings | None = None, config: SchedulerConfig | None = None, *,
                 runner_factory=make_runner, tenants: Tenants | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.config = config or SchedulerConfig()
        self.tenants = tenants or Tenants.load(self.settings.tokens_file)
        unconfined = sorted(p.name for p in (self.tenants.policies or {}).values() if p.roots is None)
        if unconfined:
            log.warning("tenants %s have no roots (old tokens format): their jobs may read any path this "
                        "server can; give them `roots` in the tenants file (README, Tenants)", unconfined)
        self.policy = make_policy(self.config.policy, **self._policy_options())
        connect(self.settings)
        self.store = StateStore.open(self.settings, self.config.namespace)
        self.store_id = self.store.store_id()
        self.runner_factory = runner_factory
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._runners: dict[str, JobRunner] = {}
        # (tenant, name) -> the job id of a deployment this scheduler runs: generation finds its
        # controller here, without a Redis read (kept current as jobs start, are adopted and end).
        self._deployments: dict[tuple[str, str], str] = {}
        # (tenant, name) -> job id of every running deployment of the store (any scheduler's), kept
        # current from the event feed by the follower thread; their clients by job id.
        self._routes: dict[tuple[str, str], str] = {}
        self._clients: dict[str, Any] = {}
        self._following = threading.Event()
        self._store_down = threading.Event()
        self._needs_recovery = True
        self._progress_event_at: dict[str, float] = {}
        self._wake, self._stopping, self._lease_lost = threading.Event(), threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self.passes = 0  # loop iterations completed (each a reconcile pass, or a skipped one)

    def _policy_options(self) -> dict[str, Any]:
        """The policy's options; fairshare also gets the tenants file's GPU quotas."""
        options = dict(self.config.policy_options)
        quotas = {p.name: p.quota_gpus for p in (self.tenants.policies or {}).values() if p.quota_gpus is not None}
        if self.config.policy == "fairshare" and quotas:
            options["quotas_gpus"] = {**quotas, **options.get("quotas_gpus", {})}
        return options

    # ---- API ------------------------------------------------------------------------------
    def submit(self, spec: TrainingJob | InferenceDeployment, tenant: str,
               idempotency_key: str | None = None) -> dict:
        """Check completely, then queue a job; with a known idempotency key, return that job instead.

        Before anything is stored: the tenant's priority maximum (PermissionError), its roots
        (paths resolved against its first root, PermissionError outside them), that the paths exist,
        the stored spec's size, the tenant's GPU quota and that the gang could ever be placed; while
        storing it, the tenant's max_jobs (JobLimitError)."""
        policy = self.tenants.policy(tenant)
        policy.check_priority(spec.priority)
        spec = confine_paths(spec.model_copy(update={"tenant": tenant}), base=None, policy=policy)
        if isinstance(spec, InferenceDeployment):  # a training checkpoint is served from its export
            spec = spec.model_copy(update={"model": served_model_dir(spec.model)})
        check_spec_size(spec)
        policy.check_quota(spec.layout.world_size)
        self.check_submission(spec)
        now = time.time()
        record = JobRecord(job_id=f"{spec.name}-{uuid.uuid4().hex[:8]}", name=spec.name, kind=spec.kind,
                           tenant=tenant, state=S.QUEUED, priority=spec.priority, layout=spec.layout.model_dump(),
                           spec=spec.model_dump(mode="json"), submitted_at_s=now, updated_at_s=now,
                           idempotency_key=idempotency_key, queued_since_s=now)
        gpus = spec.layout.world_size
        record, _ = self.store.create_job(record, [(S.SUBMITTED, f"submitted by tenant {tenant}: {gpus} GPUs"),
                                                   (S.QUEUED, "queued")], max_unfinished=policy.max_jobs)
        self._wake.set()
        return record.model_dump(mode="json")

    def submit_text(self, text: str, tenant: str, idempotency_key: str | None = None) -> dict:
        """`submit` of a job file's text (YAML or JSON)."""
        return self.submit(parse_job(text), tenant, idempotency_key)

    def check_submission(self, spec: TrainingJob | InferenceDeployment) -> None:
        """Raise ValueError (UnplaceableJobError) for a job that could never run on this cluster."""
        model_dir = spec.model if isinstance(spec, InferenceDeployment) else spec.model.path
        if model_dir is not None:
            field = "model" if isinstance(spec, InferenceDeployment) else "model.path"
            try:
                model = served_model_spec(model_dir)
            except (OSError, ValueError) as err:  # the directory's own config.json is unreadable or wrong
                raise JobFileError(f"{field}: {model_dir} cannot be read as a model: "
                                   f"{' '.join(str(err).split())[:300]}") from None
            if model is not None:
                spec.layout.validate_for(model)
        shape = GangShape(*(getattr(spec.layout, a) for a in ("tp", "pp", "cp", "dp", "ep")),
                          peers=_memory_peers(spec.model_dump(mode="json")))
        job = Job(spec.name, spec.tenant, spec.kind, shape, time.time(),
                  priority=int(PriorityClass[spec.priority.upper()]))
        empty = inventory.gpu_counts(inventory.list_nodes())
        self.policy.check_submission(job, ClusterInventory.from_nodes(empty.total_by_node))

    def get(self, job_id: str, tenant: str | None = None) -> dict:
        return self._record(job_id, tenant).model_dump(mode="json")

    def list(self, tenant: str | None, page_size: int = 50, page_token: str | None = None,
             state: str | None = None, kind: str | None = None) -> tuple[list[dict], str | None]:
        """The tenant's jobs (all jobs for tenant None) in submission order, a page at a time."""
        if state is not None and state not in {s.value for s in S}:
            raise ValueError(f"state={state!r} is not a job state; choose one of {[s.value for s in S]}")
        if kind not in (None, "training", "inference"):
            raise ValueError(f"kind={kind!r} is not a job kind; choose 'training' or 'inference'")
        records, token = self.store.list_jobs(tenant, page_size, page_token, state, kind)
        return [r.model_dump(mode="json") for r in records], token

    def cancel(self, job_id: str, tenant: str | None = None) -> dict:
        """Cancel now if waiting; if holding GPUs, record the request and let the loop stop it."""
        for _ in range(5):  # the loop may move the job between our read and our write: re-read
            record = self._record(job_id, tenant)
            try:
                if record.state in WAITING:
                    record = self.store.transition(job_id, S.CANCELLED, f"cancelled by tenant {record.tenant}",
                                                   expect=WAITING)
                elif record.state in HOLDING and not record.cancel_requested:
                    record = self.store.annotate(job_id, "cancel requested; stopping its gang",
                                                 fields={"cancel_requested": True}, expect=HOLDING)
                self._wake.set()
                return record.model_dump(mode="json")
            except TransitionError:
                continue
        raise RuntimeError(f"job {job_id} kept changing state while being cancelled; try again")

    def events(self, job_id: str, from_sequence: int = 0, tenant: str | None = None) -> list[dict]:
        self._record(job_id, tenant)
        return [e.model_dump(mode="json") for e in self.store.events(job_id, from_sequence)]

    def wait_events(self, job_id: str, from_sequence: int, timeout_s: float = 1.0,
                    tenant: str | None = None) -> tuple[list[dict], bool]:
        """Events from `from_sequence` (waiting up to `timeout_s` for one), and whether the job has
        ended and every one of its events has been returned (for a WatchJob stream to end)."""
        self._record(job_id, tenant)
        events = self.store.wait_events(job_id, from_sequence, timeout_s)
        record = self._record(job_id, tenant)
        seen = from_sequence + len(events) if events else from_sequence
        return [e.model_dump(mode="json") for e in events], record.state in TERMINAL and seen >= record.num_events

    def cluster_info(self, tenant: str | None = None) -> dict:
        """Nodes (GPUs, memory) and the gangs placed on them (the tenant's only, if given)."""
        nodes = inventory.list_nodes()
        address = {n.node_id: n.address for n in nodes}
        gangs = [{"job_id": r.job_id, "kind": r.kind, "layout": r.layout,
                  "workers": [f"rank {rank} on node {address.get(node, '?')} ({node[:12]})"
                              for rank, node in enumerate(r.placement)], **self._memory(r)}
                 for r in self.store.get_jobs(self.store.active_ids()) if tenant in (None, r.tenant)]
        return {"nodes": [asdict(n) for n in nodes], "gangs": gangs}

    def metrics_snapshot(self) -> dict[str, Any]:
        """The control plane as /metrics reports it (api/metrics.py), read without any Ray call:
        `store_up`; `jobs` {(state, priority, kind): count} of unfinished jobs and `gpus_held`
        (absent while Redis is down); `gpus_total`/`gpus_free` of the live nodes; and, for the jobs
        this scheduler runs, `deployments` [(tenant, name, the engine's last reported load)] and
        `training` [(tenant, name, the last step's metrics)], as of the last reconcile pass."""
        out: dict[str, Any] = {"store_up": not self._store_down.is_set()}
        try:
            records = self.store.get_jobs([*self.store.queued_ids(), *self.store.active_ids()])
        except redis.RedisError:
            out["store_up"] = False
        else:
            out["jobs"] = Counter((r.state.value, r.priority, r.kind) for r in records)
            out["gpus_held"] = sum(ParallelLayout(**r.layout).world_size for r in records if r.state in HOLDING)
        try:
            nodes = [n for n in inventory.list_nodes() if n.alive]
            out["gpus_total"] = sum(n.gpus_total for n in nodes)
            out["gpus_free"] = sum(n.gpus_free for n in nodes)
        except Exception:  # Ray unreachable: leave the node gauges out rather than fail the scrape
            pass
        out["deployments"], out["training"] = [], []
        for runner in list(self._runners.values()):
            if isinstance(runner, ControllerRunner) and runner.stats:
                key = "deployments" if isinstance(runner.spec, InferenceDeployment) else "training"
                out[key].append((runner.spec.tenant or "", runner.spec.name, dict(runner.stats)))
        return out

    def _memory(self, record: JobRecord) -> dict:
        """An inference gang's memory budget and peers (from its spec) and pooling plan (if run here)."""
        pool = (record.spec.get("engine") or {}).get("pool") or {}
        runner = self._runners.get(record.job_id)
        plan = runner.describe().get("memory_plan", []) if isinstance(runner, ControllerRunner) else []
        return {"memory_budget_bytes": pool.get("budget_bytes"), "memory_peers": pool.get("peers", 0),
                "memory_plan": plan}

    def engine(self, tenant: str, name: str):
        """The tenant's running deployment `name`, as a DeploymentClient of its controller actor.

        A deployment this scheduler runs is found without Redis (so generation goes on while Redis is
        down); another scheduler's (this replica does not hold the lease) is found in the store and
        reached by its controller's name."""
        job_id = self._deployments.get((tenant, name))
        runner = self._runners.get(job_id) if job_id else None
        client = runner.client() if isinstance(runner, ControllerRunner) else None
        if client is not None:
            return client
        if self._following.is_set():  # the routes follow the job events: no Redis read per request
            job_id = self._routes.get((tenant, name))
            client = self._client_of(job_id) if job_id else None
            if client is not None:
                return client
        else:  # not started (an API-only object): look it up in the store
            try:
                records = self.store.get_jobs(self.store.active_ids())
            except redis.RedisError as err:
                raise RuntimeError(f"deployment {name!r} is not run by this server and the state store is "
                                   f"unreachable ({err}); retry shortly") from err
            for record in records:
                if (record.tenant, record.name, record.state, record.kind) == (tenant, name, S.RUNNING, "inference"):
                    client = self._client_of(record.job_id, str(record.spec["model"]))
                    if client is not None:
                        return client
        try:
            failed = self._last_failure(tenant, name)
        except redis.RedisError:
            failed = None
        raise LookupError(f"tenant {tenant!r} has no running inference deployment named {name!r}"
                          + (f" (job {failed.job_id} failed: {failed.message})" if failed else "")
                          + "; see `shardwright status` for its jobs and their states")

    def _client_of(self, job_id: str, model_dir: str | None = None):
        """A DeploymentClient of the job's controller actor (cached), or None if it is gone."""
        from shardwright.actors.controllers import DeploymentClient

        client = self._clients.get(job_id)
        if client is None:
            actor = find_controller(controller_name(self.store_id, job_id))
            if actor is None:
                return None
            if model_dir is None:
                model_dir = str(self.store.get_job(job_id).spec["model"])
            client = self._clients[job_id] = DeploymentClient(job_id, actor, model_dir)
        return client

    def _follow(self) -> None:
        """Keep `_routes` current from the event feed (every replica runs this, leader or not)."""
        position = None
        while not self._stopping.is_set():
            try:
                if position is None:  # position first, then the snapshot: no change is missed
                    position = self.store.feed_position()
                    self._routes = {(r.tenant, r.name): r.job_id for r in self.store.get_jobs(self.store.active_ids())
                                    if r.kind == "inference" and r.state == S.RUNNING}
                    self._following.set()
                job_ids, position = self.store.feed_after(position)
                for record in self.store.get_jobs(set(job_ids)):
                    key = (record.tenant, record.name)
                    if record.kind != "inference":
                        continue
                    if record.state == S.RUNNING:
                        self._routes[key] = record.job_id
                    elif self._routes.get(key) == record.job_id:
                        del self._routes[key]
                        self._clients.pop(record.job_id, None)
            except Exception as err:  # Redis down: the routes stay as they are (serving goes on)
                log.debug("following job events paused: %s", err)
                self._stopping.wait(0.5)

    def _last_failure(self, tenant: str, name: str) -> JobRecord | None:
        """The tenant's most recent failed deployment named `name`, if any."""
        found, token = None, None
        while True:
            records, token = self.store.list_jobs(tenant, 200, token, S.FAILED.value, "inference")
            found = next((r for r in reversed(records) if r.name == name), found)
            if not token:
                return found

    def runner(self, job_id: str) -> JobRunner | None:
        """The runner of a job this scheduler is running, if any."""
        return self._runners.get(job_id)

    def health(self) -> dict:
        """A real probe: a Redis round trip (raises while Redis is unreachable), whether the loop
        runs, and whether another scheduler holds the lease (this one then only serves)."""
        return {"redis_round_trip_s": self.store.ping(), "loop_running": any(t.is_alive() for t in self._threads),
                "lease_lost": self._lease_lost.is_set(), "jobs_running_here": len(self._runners)}

    def _record(self, job_id: str, tenant: str | None) -> JobRecord:
        record = self.store.get_job(job_id)
        if record is None or tenant not in (None, record.tenant):
            raise JobNotFoundError(f"job {job_id!r} not found for tenant {tenant!r}; list your jobs with "
                                   "`shardwright status`")
        return record

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, standby: bool = False) -> SchedulerService:
        """Take the lease (waiting up to 2 x lease_ttl_s for a dead scheduler's to expire), adopt the
        running controllers a previous scheduler left (requeue the jobs whose controller is gone),
        and start the loop. With `standby`, a lease held by another scheduler is no error: this one
        serves (its deployments are found from the job events) and takes the lease over, adopting
        the jobs, once the holder stops renewing it."""
        deadline = time.monotonic() + (0 if standby else 2 * self.config.lease_ttl_s)
        while (holder := self.store.acquire_lease(self.owner, self.config.lease_ttl_s)) is not None:
            if standby:
                log.warning("scheduler %s holds the lease: this one stands by", holder)
                self._lease_lost.set()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"scheduler {holder} holds the lease of namespace {self.config.namespace!r}; "
                                   "stop it first, or give this one another SchedulerConfig.namespace")
            time.sleep(0.1)
        if not self._lease_lost.is_set():
            self._recover()
        self._needs_recovery = self._lease_lost.is_set()
        self.store.supervise()  # restart the embedded Redis if it dies
        for target in (self._heartbeat, self._loop, self._follow):
            thread = threading.Thread(target=target, name=f"shardwright-scheduler{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, requeue_jobs: bool = True, keep_jobs: bool = False) -> None:
        """End the loop. With `keep_jobs`, leave every job running in its controller actor for the
        next scheduler to adopt; else stop them, and with `requeue_jobs` checkpoint them and record
        them `preempted` (back in the queue), else leave their records for the next scheduler."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=self.config.checkpoint_timeout_s + 30)
        if keep_jobs:
            self._runners.clear()
            self._deployments.clear()
        for job_id in list(self._runners):
            try:
                if requeue_jobs:
                    self._preempt(job_id, "the scheduler is shutting down")
            except Exception:  # keep stopping the others; this job is requeued by the next scheduler
                log.exception("could not requeue job %s at shutdown", job_id)
            self._release(job_id)
        self.store.release_lease(self.owner)

    def close(self, keep_jobs: bool = False) -> None:
        """`stop()` (if started), then close the state store."""
        if self._threads:
            self.stop(keep_jobs=keep_jobs)
        self.store.close()

    def _recover(self) -> None:
        """Reconcile the jobs Redis records as holding GPUs with the live controller actors."""
        for record in self.store.get_jobs(self.store.active_ids()):
            if record.job_id in self._runners:
                continue
            runner = None
            if record.state in (S.RUNNING, S.PREEMPTING):
                runner = ControllerRunner.adopt(record.job_id, _SPEC.validate_python(record.spec),
                                                name=self._controller_name(record.job_id),
                                                bundle_nodes=tuple(record.placement) or None,
                                                checkpoint_dir=self._checkpoint_dir(record.job_id))
            else:  # placed: its start may have been cut short; a half-built controller is an orphan
                self._stop_orphan(self._controller_name(record.job_id))
            if runner is not None:
                self._runners[record.job_id] = runner
                self._register(record)
                log.info("adopted the running controller of job %s", record.job_id)
                if record.state == S.PREEMPTING:  # finish what the previous scheduler began
                    self._finish_preemption(record, "the preemption began before the scheduler restarted")
                continue
            if record.cancel_requested:
                self._transition(record.job_id, S.CANCELLED, "cancelled (requested before the scheduler "
                                      "restarted; its controller had ended)", fields=_released(record))
                continue
            resume = f"resumes from checkpoint {record.checkpoint}" if record.checkpoint else "starts over"
            self._transition(record.job_id, S.QUEUED, f"requeued: the scheduler restarted and this job's "
                                  f"controller actor was gone; {resume}",
                                  fields={**_released(record), "queued_since_s": time.time()})

    def _transition(self, job_id: str, state: JobState, message: str, **options) -> JobRecord:
        """A job transition by the scheduler loop: fenced, so it fails once another holds the lease."""
        return self.store.transition(job_id, state, message, fence=self.owner, **options)

    def _controller_name(self, job_id: str) -> str:
        return controller_name(self.store_id, job_id)

    def _checkpoint_dir(self, job_id: str) -> Path:
        return Path(self.settings.state_dir) / "checkpoints" / job_id

    def _register(self, record: JobRecord) -> None:
        if record.kind == "inference":
            self._deployments[(record.tenant, record.name)] = record.job_id

    def _stop_orphan(self, name: str) -> None:
        actor = find_controller(name)
        if actor is not None:
            log.warning("stopping orphaned controller actor %s", name)
            ray.kill(actor, no_restart=True)

    def _stop_orphans(self) -> list[str]:
        """Stop this store's controller actors that run no job of this scheduler; returns their names."""
        orphans = [n for n in controller_names(self.store_id) if job_of(n, self.store_id) not in self._runners]
        for name in orphans:
            self._stop_orphan(name)
        return orphans

    def _heartbeat(self) -> None:
        """Renew the lease. Redis unreachable: keep everything running (the loop pauses). Another
        scheduler holds it: stop acting (its scheduler adopts the jobs). Got it back: adopt again."""
        while not self._stopping.wait(self.config.lease_ttl_s / 3):
            try:
                holder = self.store.acquire_lease(self.owner, self.config.lease_ttl_s)
            except Exception as err:
                if not self._store_down.is_set():
                    log.warning("state store unreachable, scheduling paused, jobs keep running: %s", err)
                self._store_down.set()
                continue
            if self._store_down.is_set():
                log.warning("state store reachable again: scheduling resumes")
                self._store_down.clear()
                self._wake.set()
            if holder is not None and not self._lease_lost.is_set():
                log.error("scheduler lease taken by %s: this scheduler stops acting and leaves its jobs "
                          "to it", holder)
                self._lease_lost.set()
                self._wake.set()
            elif holder is None and self._lease_lost.is_set():
                log.warning("scheduler lease taken back: adopting the running jobs")
                self._needs_recovery = True
                self._lease_lost.clear()
                self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self._lease_lost.is_set():  # another scheduler owns the jobs now: forget ours, write nothing
                self._runners.clear()
                self._deployments.clear()
            elif not self._store_down.is_set():
                try:
                    if self._needs_recovery:
                        self._recover()
                        self._needs_recovery = False
                    self.reconcile_once()
                except LeaseLostError as err:  # fenced out: another scheduler acts now
                    log.error("%s; this scheduler stops acting", err)
                    self._lease_lost.set()
                except Exception:  # Redis or Ray hiccup: log it and try again next pass
                    log.exception("scheduler pass failed; retrying in %.1f s", self.config.reconcile_interval_s)
            self.passes += 1  # (acted or not): lets a caller wait for "a pass has happened since"
            self._wake.wait(self.config.reconcile_interval_s)
            self._wake.clear()

    # ---- one pass ------------------------------------------------------------------------------
    def reconcile_once(self) -> list:
        """Poll runners, stop orphaned controllers, then run the policy on the stored queue and
        carry out its decisions."""
        self._poll_runners()
        self._stop_orphans()
        queue = self.store.get_jobs(self.store.queued_ids())
        active = self.store.get_jobs(self.store.active_ids())
        if not queue:
            return []
        now = time.time()
        counts = inventory.gpu_counts(inventory.list_nodes(), Counter(n for r in active for n in r.placement))
        cluster = ClusterInventory.from_nodes(counts.total_by_node, counts.free_by_node)
        running = [_running_job(r, now) for r in active
                   if r.placement and all(n in cluster.total_by_node for n in r.placement)]
        decisions = self.policy.schedule([_scheduler_job(r) for r in queue], running, cluster, now)
        for decision in decisions:
            if self._stopping.is_set() or self._lease_lost.is_set():
                break
            if isinstance(decision, PreemptJob):
                self._preempt(decision.job_id, decision.reason)
            elif isinstance(decision, StartJob):
                self._start(decision.job_id, decision.placement)
        return decisions

    def _poll_runners(self) -> None:
        for job_id, runner in list(self._runners.items()):
            record = self.store.get_job(job_id)
            if record is None or record.state not in HOLDING:
                self._release(job_id)
            elif record.cancel_requested:
                self._release(job_id)
                self._transition(job_id, S.CANCELLED, f"cancelled by tenant {record.tenant}",
                                      fields=_released(record))
            else:
                self._observe(record, runner.progress())

    def _observe(self, record: JobRecord, progress: Progress) -> None:
        """Store a runner's progress: its outcome if it ended, else step and checkpoint when they moved."""
        step, checkpoint = progress["step"], progress["checkpoint"] or record.checkpoint
        metrics = {"step": float(step)}
        if progress.get("loss") is not None:
            metrics["loss"] = float(progress["loss"])
        fields = {"step": step, "checkpoint": checkpoint}
        if progress["state"] in ("succeeded", "failed"):
            outcome = S(progress["state"])
            message = f"{outcome.value} at step {step}" + (f": {progress['error']}" if progress["error"] else "")
            self._transition(record.job_id, outcome, message, fields={**fields, **_released(record)},
                                  metrics=metrics)
            self._release(record.job_id)  # after the outcome is stored: a crash now cannot re-run it
        elif (step, checkpoint) != (record.step, record.checkpoint):
            self._record_progress(record.job_id, fields, metrics)

    def _record_progress(self, job_id: str, fields: dict[str, Any], metrics: dict[str, float]) -> None:
        """Progress fields every pass; an event at most every progress_event_interval_s."""
        now = time.monotonic()
        due = now - self._progress_event_at.get(job_id, 0.0) >= self.config.progress_event_interval_s
        if due:
            self._progress_event_at[job_id] = now
        try:
            self.store.annotate(job_id, f"step {fields['step']}" if due else None, fields=fields,
                                metrics=metrics, expect=HOLDING, fence=self.owner)
        except TransitionError:
            pass  # it left HOLDING meanwhile; the next pass handles it

    def _start(self, job_id: str, placement: Placement) -> None:
        record, nodes = self.store.get_job(job_id), placement.rank_nodes
        where = ", ".join(f"{count} on {node[:12]}" for node, count in placement.node_gpus)
        try:
            record = self._transition(job_id, S.PLACED, f"placed: {where}", expect=WAITING,
                                           fields={"placement": list(nodes), "started_at_s": time.time(),
                                                   "attempts": record.attempts + 1})
        except TransitionError:  # cancelled since the queue was read
            return
        try:  # the paths again: a symlink swapped in since submission must not lead out of the roots
            spec = confine_paths(_SPEC.validate_python(record.spec), base=None,
                                 policy=self.tenants.policy(record.tenant))
        except (PermissionError, ValueError) as err:
            self._transition(job_id, S.FAILED, f"could not start: {err}", fields=_released(record))
            return
        runner = self.runner_factory(spec, job_id=job_id, name=self._controller_name(job_id), bundle_nodes=nodes,
                                     checkpoint_dir=self._checkpoint_dir(job_id))
        try:
            runner.start(record.checkpoint)
        except Exception as err:
            _stop_quietly(runner)
            self._transition(job_id, S.FAILED, f"could not start: {err}", fields=_released(record))
            return
        self._runners[job_id] = runner
        self._register(record)
        step = runner.progress()["step"]
        resumed = f"; resumed from checkpoint {record.checkpoint} at step {step}" if record.checkpoint else ""
        self._transition(job_id, S.RUNNING, f"running{resumed}", fields={"step": step},
                              metrics={"step": float(step)}, expect=[S.PLACED])

    def _preempt(self, job_id: str, reason: str) -> None:
        record = self._transition(job_id, S.PREEMPTING, f"preempting: {reason}", expect=[S.RUNNING])
        self._finish_preemption(record)

    def _finish_preemption(self, record: JobRecord, note: str = "") -> None:
        """Checkpoint and stop a `preempting` job, then record it `preempted` (or `cancelled`)."""
        job_id = record.job_id
        runner, checkpoint = self._runners.pop(job_id, None), record.checkpoint
        self._unregister(job_id)
        note, step = f" ({note})" if note else "", record.step
        if runner is not None:
            try:
                checkpoint = runner.checkpoint_and_stop(self.config.checkpoint_timeout_s) or checkpoint
                step = runner.progress()["step"]
            except Exception as err:
                note += f" (checkpoint failed: {err}; the last recorded checkpoint is kept)"
                _stop_quietly(runner)
        where = f"checkpoint {checkpoint} at step {step}" if checkpoint else "no checkpoint"
        fields = {**_released(record), "checkpoint": checkpoint, "step": step, "queued_since_s": time.time()}
        if self.store.get_job(job_id).cancel_requested:  # asked while we preempted: honour the cancel
            self._transition(job_id, S.CANCELLED, f"cancelled by tenant {record.tenant} ({where})",
                                  fields=fields, metrics={"step": float(step)})
            return
        self._transition(job_id, S.PREEMPTED, f"preempted; requeued with {where}{note}",
                              fields=fields, metrics={"step": float(step)})

    def _unregister(self, job_id: str) -> None:
        for key, known in list(self._deployments.items()):
            if known == job_id:
                del self._deployments[key]

    def _release(self, job_id: str) -> None:
        self._unregister(job_id)
        runner = self._runners.pop(job_id, None)
        self._progress_event_at.pop(job_id, None)
        if runner is not None:
            _stop_quietly(runner)


def _released(record: JobRecord) -> dict[str, Any]:
    """Fields of a job that gives its GPUs back: no placement, its run added to its service."""
    ran_s = max(0.0, time.time() - record.started_at_s) if record.started_at_s else 0.0
    gpus = len(record.placement)
    return {"placement": [], "started_at_s": None,
            "attained_service_gpu_s": record.attained_service_gpu_s + gpus * ran_s}


def _stop_quietly(runner: JobRunner) -> None:
    try:
        runner.stop()
    except Exception:  # stopping must not stop the scheduler; the gang dies with the process anyway
        log.exception("stopping a runner failed")


def _memory_peers(spec: dict) -> int:
    return int(((spec.get("engine") or {}).get("pool") or {}).get("peers") or 0)


def _scheduler_job(record: JobRecord) -> Job:
    deadline = record.spec.get("deadline_s")
    shape = GangShape(**record.layout, peers=_memory_peers(record.spec))
    return Job(record.job_id, record.tenant, record.kind, shape, record.submitted_at_s,
               priority=int(PriorityClass[record.priority.upper()]),
               deadline_s=record.submitted_at_s + deadline if deadline else None,
               attained_service_gpu_s=record.attained_service_gpu_s, queued_since_s=record.queued_since_s)


def _running_job(record: JobRecord, now: float) -> RunningJob:
    return RunningJob(_scheduler_job(record), dict(Counter(record.placement)), record.started_at_s or now)
