"""The scheduler's reconcile logic on plain fakes: fake nodes and fake controllers through the
scheduler's two cluster seams (`controllers`, `nodes`), the real job store on an embedded Redis.

No Ray: each test calls the recovery and reconcile steps directly (no loop thread, no sleeps), so
every pass is one deterministic step. test_service.py runs the same logic on a real Ray cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model_helpers import tiny_spec
from shardwright.cluster.inventory import NodeInfo
from shardwright.config import (InferenceDeployment, JobState, ModelSource, ParallelLayout, Settings,
                                TrainingJob)
from shardwright.models.random_init import write_random_checkpoint
from shardwright.scheduler.jobs import LeaseLostError
from shardwright.scheduler.runners import Progress
from shardwright.scheduler.service import SchedulerConfig, SchedulerService

S = JobState
CORPUS = str(Path(__file__).resolve().parents[2] / "examples" / "corpus")
NODES = [NodeInfo(node_id=f"node-{i}", address=f"10.0.0.{i}", alive=True, gpus_total=4.0, gpus_free=4.0,
                  memory_total_bytes=2**34, memory_free_bytes=2**34) for i in range(2)]


class FakeRunner:
    """A job's controller as the scheduler sees it; the test moves its state."""

    def __init__(self, controllers: FakeControllers, spec, job_id: str, name: str,
                 bundle_nodes: tuple[str, ...] | None, checkpoint_dir: Path) -> None:
        self.controllers, self.spec, self.job_id, self.name = controllers, spec, job_id, name
        self.bundle_nodes, self.checkpoint_dir = bundle_nodes, checkpoint_dir
        self.state, self.step, self.error, self.checkpoint = S.RUNNING, 0, None, None
        self.started_from: list[str | None] = []  # the checkpoint of each start
        self.stopped = False

    def start(self, resume_from_checkpoint: str | None) -> None:
        if self.controllers.failing_start:
            raise RuntimeError(self.controllers.failing_start)
        self.started_from.append(resume_from_checkpoint)
        self.controllers.live[self.name] = self

    def progress(self) -> Progress:
        return Progress(state=self.state, step=self.step, error=self.error, checkpoint=self.checkpoint, loss=None)

    def checkpoint_and_stop(self, timeout_s: float) -> str | None:
        if isinstance(self.spec, TrainingJob):
            self.checkpoint = f"{self.checkpoint_dir}/step-{self.step:08d}"
        self.stop()
        return self.checkpoint

    def stop(self) -> None:
        self.stopped = True
        self.controllers.live.pop(self.name, None)

    def worker_nodes(self) -> list[str]:
        return list(self.bundle_nodes or ())


class FakeControllers:
    """The cluster's live controllers by name (what outlives a scheduler)."""

    def __init__(self) -> None:
        self.live: dict[str, FakeRunner] = {}
        self.created: list[FakeRunner] = []
        self.failing_start: str | None = None  # set: every start raises this

    def create(self, spec, *, job_id, name, bundle_nodes, checkpoint_dir) -> FakeRunner:
        runner = FakeRunner(self, spec, job_id, name, bundle_nodes, checkpoint_dir)
        self.created.append(runner)
        return runner

    def adopt(self, spec, *, job_id, name, bundle_nodes, checkpoint_dir) -> FakeRunner | None:
        return self.live.get(name)

    def names(self, store_id: str) -> list[str]:
        return [name for name in self.live if name.split(":")[1] == store_id]

    def stop(self, name: str) -> None:
        runner = self.live.pop(name, None)
        if runner is not None:
            runner.stopped = True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("served") / "llama", tiny_spec("llama"), seed=5)


@pytest.fixture
def make_service(tmp_path):
    """make_service(controllers) -> a scheduler on the fakes holding the lease (nothing started)."""
    made = []

    def make(controllers: FakeControllers, policy: str = "priority") -> SchedulerService:
        service = SchedulerService(Settings(state_dir=tmp_path / "state"), SchedulerConfig(policy=policy),
                                   controllers=controllers, nodes=lambda: NODES)
        assert service.store.acquire_lease(service.owner, 60.0) is None  # it takes it: the only scheduler
        made.append(service)
        return service

    yield make
    for service in made:
        service.store.release_lease(service.owner)
    for service in made:
        service.close()


def training(name: str = "train", tp: int = 4, priority: str = "batch") -> TrainingJob:
    return TrainingJob(name=name, model=ModelSource(preset="tiny"), layout=ParallelLayout(tp=tp), priority=priority,
                       train={"data": {"path": CORPUS, "seq_len": 32, "global_batch_size": 4}})


def deployment(name: str, model_dir: Path, tp: int = 1) -> InferenceDeployment:
    return InferenceDeployment(name=name, model=model_dir, layout=ParallelLayout(tp=tp))


def state(service: SchedulerService, job_id: str) -> str:
    return service.get(job_id)["state"]


def test_a_pass_starts_what_fits_and_records_how_jobs_end(make_service, model_dir):
    controllers = FakeControllers()
    service = make_service(controllers)
    train = service.submit(training(tp=4), "t1")["job_id"]
    chat = service.submit(deployment("chat", model_dir, tp=2), "t1")["job_id"]
    wide = service.submit(deployment("wide", model_dir, tp=4), "t1")["job_id"]
    service.reconcile_once()  # serving ranks above batch: both deployments; 2 GPUs left, training waits
    assert [state(service, j) for j in (train, chat, wide)] == ["queued", "running", "running"]
    by_job = {r.job_id: r for r in controllers.created}
    assert len(set(by_job[wide].bundle_nodes)) == 1  # a TP group sits on one node
    assert service.get(wide)["placement"] == list(by_job[wide].bundle_nodes)
    by_job[wide].state, by_job[wide].error = S.FAILED, "rank 1 on node-0 died"
    service.reconcile_once()  # records the outcome, releases the gang, then places what now fits
    failed = service.get(wide)
    assert (failed["state"], failed["placement"]) == ("failed", []) and "rank 1 on node-0 died" in failed["message"]
    assert by_job[wide].stopped and state(service, train) == "running"
    trainer = next(r for r in controllers.created if r.job_id == train)
    assert trainer.started_from == [None]
    trainer.step, trainer.state = 7, S.SUCCEEDED
    service.reconcile_once()
    assert (state(service, train), service.get(train)["step"]) == ("succeeded", 7) and trainer.stopped
    assert [e["state"] for e in service.events(train)] == ["submitted", "queued", "placed", "running", "succeeded"]


def test_a_serving_job_preempts_training_which_resumes_from_its_checkpoint(make_service, model_dir):
    controllers = FakeControllers()
    service = make_service(controllers)
    train = service.submit(training(tp=4), "t1")["job_id"]
    other = service.submit(training("other", tp=4), "t1")["job_id"]
    service.reconcile_once()
    first = next(r for r in controllers.created if r.job_id == train)
    first.step = 12
    chat = service.submit(deployment("chat", model_dir, tp=4), "t2")["job_id"]  # serving > batch
    service.reconcile_once()  # preempts one training job: checkpoint, stop, requeue; then starts chat
    preempted = [j for j in (train, other) if state(service, j) == "preempted"]
    assert len(preempted) == 1 and state(service, chat) == "running"
    victim = next(r for r in controllers.created if r.job_id == preempted[0])
    record = service.get(preempted[0])
    assert victim.stopped and record["checkpoint"] == victim.checkpoint and record["placement"] == []
    service.cancel(chat)
    service.reconcile_once()  # stops chat (cancelled), then restarts the preempted job from its checkpoint
    assert state(service, chat) == "cancelled" and state(service, preempted[0]) == "running"
    resumed = [r for r in controllers.created if r.job_id == preempted[0]][-1]
    assert resumed is not victim and resumed.started_from == [victim.checkpoint]


def test_a_new_scheduler_adopts_live_controllers_and_requeues_the_rest(make_service, model_dir):
    controllers = FakeControllers()
    old = make_service(controllers)
    train = old.submit(training(tp=4), "t1")["job_id"]
    chat = old.submit(deployment("chat", model_dir, tp=2), "t1")["job_id"]
    old.reconcile_once()
    runners = {r.job_id: r for r in controllers.created}
    runners[train].step = 5
    old.reconcile_once()  # the step is recorded
    old.store.annotate(train, None, fields={"checkpoint": "/ck/step-00000005"})
    old.store.release_lease(old.owner)  # the old scheduler is gone; its controllers live on ...
    controllers.live.pop(runners[chat].name)  # ... but for chat's, which died meanwhile
    new = make_service(controllers)
    new._recover()
    assert new.runner(train) is runners[train] and state(new, train) == "running"  # adopted: no new start
    assert runners[train].started_from == [None] and service_step(new, train) == 5
    assert state(new, chat) == "queued" and "controller actor was gone" in new.get(chat)["message"]
    new.reconcile_once()
    assert state(new, chat) == "running" and len([r for r in controllers.created if r.job_id == chat]) == 2


def service_step(service: SchedulerService, job_id: str) -> int:  # the step recorded in the store
    return service.get(job_id)["step"]


def test_orphaned_and_cancelled_controllers_are_stopped_within_one_pass(make_service, model_dir):
    controllers = FakeControllers()
    service = make_service(controllers)
    chat = service.submit(deployment("chat", model_dir), "t1")["job_id"]
    service.reconcile_once()
    orphan = FakeRunner(controllers, None, "gone-1234", f"shardwright-job:{service.store_id}:gone-1234", None, Path())
    controllers.live[orphan.name] = orphan  # a controller whose job Redis does not know
    foreign = "shardwright-job:another-store:x"
    controllers.live[foreign] = FakeRunner(controllers, None, "x", foreign, None, Path())
    service.cancel(chat)
    service.reconcile_once()
    assert orphan.stopped and state(service, chat) == "cancelled"
    assert list(controllers.live) == [foreign]  # another store's controllers are not this scheduler's


def test_a_start_that_fails_records_the_job_failed_with_the_cause(make_service, model_dir):
    controllers = FakeControllers()
    controllers.failing_start = "rank 0 on node-1 failed in load_shard: checkpoint gone"
    service = make_service(controllers)
    chat = service.submit(deployment("chat", model_dir), "t1")["job_id"]
    service.reconcile_once()
    job = service.get(chat)
    assert job["state"] == "failed" and "could not start: rank 0 on node-1 failed" in job["message"]
    assert job["placement"] == [] and controllers.live == {}


def test_a_scheduler_that_lost_its_lease_writes_nothing(make_service, model_dir):
    controllers = FakeControllers()
    service = make_service(controllers)
    chat = service.submit(deployment("chat", model_dir), "t1")["job_id"]
    service.store.client.set(f"{service.config.namespace}:lease", "another-replica", px=60_000)
    with pytest.raises(LeaseLostError, match="held by another-replica"):
        service.reconcile_once()  # its first write, the placement, is refused
    assert state(service, chat) == "queued" and controllers.created == []


def test_drain_checkpoints_every_running_job_and_starts_nothing(make_service, model_dir):
    controllers = FakeControllers()
    service = make_service(controllers)
    train = service.submit(training(tp=4), "t1")["job_id"]
    chat = service.submit(deployment("chat", model_dir, tp=4), "t1")["job_id"]
    service.reconcile_once()
    trainer = next(r for r in controllers.created if r.job_id == train)
    trainer.step = 9
    waiting = service.submit(deployment("later", model_dir), "t1")["job_id"]  # no GPUs left for it
    service.store.release_lease(service.owner)
    drainer = make_service(controllers)  # `shardwright stop`'s: adopts the live controllers, then stops them
    drainer.store.release_lease(drainer.owner)
    assert sorted(drainer.drain("the head is ending")) == sorted([train, chat])
    assert [state(drainer, j) for j in (train, chat, waiting)] == ["preempted", "preempted", "queued"]
    record = drainer.get(train)
    assert (record["step"], record["checkpoint"]) == (9, trainer.checkpoint) and trainer.checkpoint.endswith("9")
    assert controllers.live == {} and len(controllers.created) == 2  # nothing started meanwhile
    assert drainer.store.acquire_lease("next-serve", 5.0) is None  # the lease was given back
