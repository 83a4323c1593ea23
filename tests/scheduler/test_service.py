"""The live scheduler on a real 3-node local Ray cluster with embedded Redis and real engines.

One cluster for the module: `ray.cluster_utils.Cluster` with 3 nodes (the head included) of 4
logical GPUs each, 12 GPUs in all. Each test gets its own state dir (its own embedded Redis) and
stops its scheduler, so its gangs are gone before the next test. Tests that need a full cluster
without starting 12 workers hold the other GPUs with a plain Ray placement group, which the
scheduler sees as GPUs in use by someone else (the inventory takes Ray's available GPUs into account).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from collections import Counter

import pytest

from model_helpers import tiny_spec
from waiting import eventually
from shardwright.config import InferenceDeployment, ModelSource, ParallelLayout, Settings, TrainingJob
from shardwright.models.random_init import write_random_checkpoint
from shardwright.scheduler.jobs import TERMINAL
from shardwright.scheduler.model import UnplaceableJobError

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402

from shardwright.actors.controllers import (  # noqa: E402
    controller_name, controller_names, create_controller, find_controller)
from shardwright.serving.sampling import SamplingParams  # noqa: E402
from shardwright.cluster.redis_server import SOCKET_RETRIES, SOCKET_TIMEOUT_S  # noqa: E402
from shardwright.scheduler.service import SchedulerConfig, SchedulerService  # noqa: E402

pytestmark = pytest.mark.slow
GPUS_PER_NODE = 4
CORPUS = str(Path(__file__).resolve().parents[2] / "examples" / "corpus")
FAST = dict(reconcile_interval_s=0.2, lease_ttl_s=2.0)


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": GPUS_PER_NODE,
                                                      "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE)
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("served") / "llama",
                                   tiny_spec("llama", vocab_size=256), seed=5, std=0.15)


@pytest.fixture
def make_service(cluster, tmp_path):
    made = []

    def make(policy: str = "priority", start: bool = True, state_dir=None, **options) -> SchedulerService:
        settings = Settings(state_dir=state_dir or tmp_path / "state", ray_address=cluster.address)
        service = SchedulerService(settings, SchedulerConfig(policy=policy, policy_options=options, **FAST))
        made.append(service)
        return service.start() if start else service

    yield make
    for service in made:
        service.close()


def node_ids() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


@pytest.fixture
def hold_gpus(cluster):
    """Hold GPUs with a placement group: hold({node: count}) leaves the scheduler only the rest."""
    groups = []

    def hold(by_node: dict[str, int]) -> None:
        nodes = [node for node, count in by_node.items() for _ in range(count)]
        pg = placement_group([{"GPU": 1}] * len(nodes), bundle_label_selector=[{"ray.io/node-id": n} for n in nodes])
        ray.get(pg.ready(), timeout=30)
        groups.append(pg)

    yield hold
    for pg in groups:
        remove_placement_group(pg)


def deployment(name: str, model_dir, tp: int = 1, pp: int = 1, **fields) -> InferenceDeployment:
    return InferenceDeployment(name=name, model=model_dir, layout=ParallelLayout(tp=tp, pp=pp),
                               engine={"num_blocks": 64}, **fields)


def wait_state(service: SchedulerService, job_id: str, state: str, timeout_s: float = 90.0) -> dict:
    """The job once it is in `state` (fails at once if it ended in another)."""
    def reached() -> dict | None:
        job = service.get(job_id)
        if job["state"] in {s.value for s in TERMINAL} and state != job["state"]:
            raise AssertionError(f"{job_id} ended {job['state']}: {job['message']}")
        return job if job["state"] == state else None
    return eventually(reached, lambda: f"{job_id} is {service.get(job_id)['state']}, not {state}: "
                      f"{[e['message'] for e in service.events(job_id)]}", timeout_s)


def passes_done(service: SchedulerService, n: int) -> None:
    """Wait until the scheduler's loop has completed `n` more passes (what a test of "it did not act"
    needs: passes that could have acted, not a guessed sleep)."""
    target = service.passes + n + 1  # + 1: the pass in progress may have read the state before the change
    eventually(lambda: service.passes >= target, f"the scheduler did not complete {n} passes", timeout_s=60)


def worker_pids(service: SchedulerService, job_id: str) -> list[int]:
    """The worker processes of a job's gang, asked of its controller actor (whoever runs the scheduler)."""
    workers = ray.get(find_controller(controller_name(service.store_id, job_id)).describe.remote())["workers"]
    return [w["pid"] for w in workers]


def states(service: SchedulerService, job_id: str) -> list[str]:
    return [e["state"] for e in service.events(job_id)]


def test_job_larger_than_the_cluster_is_rejected_at_submission(make_service, model_dir):
    service = make_service(start=False)
    big = TrainingJob(name="big", model=ModelSource(preset="tiny"), layout=ParallelLayout(tp=4, dp=4),
                      train={"data": {"path": CORPUS, "seq_len": 32, "global_batch_size": 16}})
    with pytest.raises(UnplaceableJobError, match=r"asks for 16 GPUs .* larger than the whole cluster "
                                                   r"\(12 GPUs on 3 nodes\); shrink the gang or add nodes"):
        service.submit(big, "t1")
    with pytest.raises(ValueError, match="pp=4 exceeds num_layers=2"):
        service.submit(deployment("deep", model_dir, tp=4, pp=4), "t1")
    assert service.list(None) == ([], None)  # nothing was stored


def test_submission_is_idempotent_by_key(make_service, model_dir):
    service = make_service(start=False)
    first = service.submit(deployment("chat", model_dir), "t1", idempotency_key="k-1")
    again = service.submit(deployment("chat", model_dir), "t1", idempotency_key="k-1")
    assert again["job_id"] == first["job_id"] and again["state"] == "queued"
    other = service.submit(deployment("chat-2", model_dir), "t1", idempotency_key="k-2")
    assert other["job_id"] != first["job_id"]
    with pytest.raises(ValueError, match="already has an unfinished job named 'chat'"):
        service.submit(deployment("chat", model_dir), "t1")
    jobs, _ = service.list("t1")
    assert [j["job_id"] for j in jobs] == [first["job_id"], other["job_id"]]
    assert states(service, first["job_id"]) == ["submitted", "queued"]
    with pytest.raises(LookupError):
        service.get(first["job_id"], "t2")  # another tenant does not see it


def test_tp4_lands_on_one_node_and_tp2pp2_pairs_each_on_one_node(make_service, model_dir):
    service = make_service()
    tp4 = service.submit(deployment("tp4", model_dir, tp=4), "t1")["job_id"]
    tp2pp2 = service.submit(deployment("tp2pp2", model_dir, tp=2, pp=2), "t1")["job_id"]
    for job_id in (tp4, tp2pp2):
        wait_state(service, job_id, "running")
    workers = service.runner(tp4).worker_nodes()
    assert len(workers) == 4 and len(set(workers)) == 1 and workers == service.get(tp4)["placement"]
    workers = service.runner(tp2pp2).worker_nodes()
    assert workers == service.get(tp2pp2)["placement"]
    assert workers[0] == workers[1] and workers[2] == workers[3]  # each TP pair on one node
    assert len(set(workers) | {service.get(tp4)["placement"][0]}) >= 2  # the tp=4 node is full
    gangs = {g["job_id"]: g for g in service.cluster_info("t1")["gangs"]}
    assert len(gangs[tp2pp2]["workers"]) == 4
    out = service.engine("t1", "tp2pp2").generate([[1, 2, 3]], timeout_s=60)[0]
    assert len(out.token_ids) > 0
    for job_id in (tp4, tp2pp2):
        service.cancel(job_id)
        wait_state(service, job_id, "cancelled")
    assert states(service, tp4) == ["submitted", "queued", "placed", "running", "running", "cancelled"]


def test_cluster_info_reports_a_deployments_memory_budget_and_pooling_plan(make_service, model_dir):
    service = make_service()
    pool = {"budget_bytes": 10**9, "peers": 1, "pooled_fraction": 0.5}
    job = service.submit(InferenceDeployment(name="pooled", model=model_dir, engine={"num_blocks": 64, "pool": pool}),
                         "t1")["job_id"]
    wait_state(service, job, "running")
    placement = service.get(job)["placement"]  # the scheduler reserved a GPU for the memory peer
    assert len(placement) == 2 and service.runner(job).worker_nodes() == placement
    gang = {g["job_id"]: g for g in service.cluster_info("t1")["gangs"]}[job]
    assert gang["memory_budget_bytes"] == 10**9 and gang["memory_peers"] == 1
    assert len(gang["memory_plan"]) == 1 and "1/2 layers resident" in gang["memory_plan"][0], gang
    out = service.engine("t1", "pooled").generate([[1, 2, 3]], timeout_s=60)[0]
    assert len(out.token_ids) > 0
    service.cancel(job)
    wait_state(service, job, "cancelled")


def test_a_job_that_fits_later_waits_then_runs(make_service, model_dir, hold_gpus):
    nodes = node_ids()
    hold_gpus({nodes[0]: 4, nodes[1]: 4, nodes[2]: 3})  # one GPU left for the scheduler
    service = make_service()
    first = service.submit(deployment("first", model_dir), "t1")["job_id"]
    wait_state(service, first, "running")
    second = service.submit(deployment("second", model_dir), "t1")["job_id"]
    passes_done(service, 2)  # two whole passes have looked at it since
    assert service.get(second)["state"] == "queued"
    service.cancel(first)
    wait_state(service, first, "cancelled")
    job = wait_state(service, second, "running")
    assert job["placement"] == [nodes[2]]
    assert states(service, second) == ["submitted", "queued", "placed", "running"]


def test_tenant_over_quota_waits_while_others_run(make_service, model_dir):
    service = make_service("fairshare", quotas_gpus={"team-a": 1})
    a1 = service.submit(deployment("a1", model_dir), "team-a")["job_id"]
    a2 = service.submit(deployment("a2", model_dir), "team-a")["job_id"]
    b1 = service.submit(deployment("b1", model_dir), "team-b")["job_id"]
    wait_state(service, a1, "running")
    wait_state(service, b1, "running")
    passes_done(service, 2)  # two whole passes have looked at a2 since
    assert service.get(a2)["state"] == "queued"  # 10 GPUs free, but team-a holds its quota
    with pytest.raises(UnplaceableJobError, match="quota of 1 GPUs"):
        service.submit(deployment("a3", model_dir, tp=2), "team-a")
    service.cancel(a1)
    wait_state(service, a2, "running")
    assert service.get(b1)["state"] == "running"


SCHEDULER_PROCESS = textwrap.dedent("""
    import time
    from shardwright.scheduler.service import SchedulerConfig, SchedulerService
    service = SchedulerService(config=SchedulerConfig(reconcile_interval_s=0.2, lease_ttl_s=2.0)).start()
    time.sleep(3600)
""")


def test_scheduler_killed_with_jobs_queued_and_running_loses_nothing_and_adopts_its_gangs(
        cluster, make_service, model_dir, hold_gpus, tmp_path):
    nodes = node_ids()
    hold_gpus({nodes[0]: 4, nodes[1]: 4, nodes[2]: 2})  # two GPUs left
    api = make_service(start=False)  # API only: writes Redis; the scheduler runs in a child process
    ids = {name: api.submit(deployment(name, model_dir, tp=tp), "t1", idempotency_key=name)["job_id"]
           for name, tp in (("r1", 1), ("r2", 1), ("q1", 1), ("q2", 2))}
    env = {**os.environ, "SHARDWRIGHT_STATE_DIR": str(tmp_path / "state"), "SHARDWRIGHT_RAY_ADDRESS": cluster.address}
    log_path = tmp_path / "scheduler.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-c", SCHEDULER_PROCESS], env=env, stdout=log, stderr=log,
                                 start_new_session=True)
    try:
        for name in ("r1", "r2"):
            wait_state(api, ids[name], "running", timeout_s=120)
        assert [api.get(ids[n])["state"] for n in ("q1", "q2")] == ["queued", "queued"]
        # Generation reaches the child scheduler's deployment through its controller actor.
        before = {n: api.engine("t1", n).generate([[1, 2, 3]], SamplingParams(max_tokens=6, ignore_eos=True),
                                                  timeout_s=60)[0].token_ids for n in ("r1", "r2")}
        pids = {n: worker_pids(api, ids[n]) for n in ("r1", "r2")}
    except AssertionError as err:
        raise AssertionError(f"{err}\nscheduler process log:\n{log_path.read_text()[-3000:]}") from err
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # no clean-up at all: as if the machine lost the process
        child.wait()
    for name in ("r1", "r2"):  # the controllers and their workers outlive the scheduler's process
        assert worker_pids(api, ids[name]) == pids[name]
    restarted = make_service(start=False)
    restarted.start()  # waits for the dead scheduler's lease, then reconciles Redis with the live actors
    jobs, _ = restarted.list("t1")
    assert sorted(j["job_id"] for j in jobs) == sorted(ids.values())  # nothing lost, nothing duplicated
    by_name = {j["name"]: j for j in jobs}
    assert {n: by_name[n]["state"] for n in ("q1", "q2")} == {"q1": "queued", "q2": "queued"}
    for name in ("r1", "r2"):  # adopted as they were: no requeue, no reload, the same worker processes
        assert by_name[name]["state"] == "running" and Counter(states(restarted, ids[name]))["placed"] == 1
        assert restarted.runner(ids[name]).worker_pids() == pids[name]
        out = restarted.engine("t1", name).generate([[1, 2, 3]], SamplingParams(max_tokens=6, ignore_eos=True),
                                                    timeout_s=60)[0]
        assert out.token_ids == before[name]  # greedy: the same tokens before and after
    assert [restarted.get(ids[n])["state"] for n in ("q1", "q2")] == ["queued", "queued"]
    assert restarted.submit(deployment("r1", model_dir), "t1", idempotency_key="r1")["job_id"] == ids["r1"]
    assert len(restarted.list(None)[0]) == 4


def test_a_gone_controller_is_requeued_and_orphan_controllers_are_stopped(cluster, make_service, model_dir):
    service = make_service()
    job = service.submit(deployment("solo", model_dir), "t1")["job_id"]
    wait_state(service, job, "running")
    name = controller_name(service.store_id, job)
    service.stop(keep_jobs=True)  # the scheduler goes; the controller stays
    assert find_controller(name) is not None
    ray.kill(find_controller(name), no_restart=True)  # then the controller dies too
    orphan = create_controller("inference", controller_name(service.store_id, "no-such-job"), None, "no-such-job",
                               {"model_dir": str(model_dir), "num_blocks": 8})
    ray.get(orphan.describe.remote())  # alive, with no job in Redis
    restarted = make_service(state_dir=service.settings.state_dir)
    job_now = wait_state(restarted, job, "running")  # requeued, then started again
    events = restarted.events(job)
    assert any("requeued: the scheduler restarted and this job's controller actor was gone" in e["message"]
               for e in events), events
    assert job_now["attempts"] == 2
    eventually(lambda: controller_names(service.store_id) == [name], "the orphan controller was not stopped")


def test_redis_outage_pauses_scheduling_and_stops_nothing(make_service, model_dir):
    service = make_service()
    job = service.submit(deployment("steady", model_dir), "t1")["job_id"]
    wait_state(service, job, "running")
    engine, params = service.engine("t1", "steady"), SamplingParams(max_tokens=4, ignore_eos=True)
    pids, before = service.runner(job).worker_pids(), engine.generate([[1, 2]], params, timeout_s=60)[0].token_ids
    redis_pid = service.store.client.pid
    os.kill(redis_pid, signal.SIGSTOP)  # unreachable (not dead) for more than the lease's TTL
    try:
        # Longer than the lease's TTL and than a Redis call's timeout (when the outage is noticed).
        outage_until = time.monotonic() + max(2.5 * FAST["lease_ttl_s"], (SOCKET_RETRIES + 1) * SOCKET_TIMEOUT_S + 3)
        served, noticed = 0, False
        while time.monotonic() < outage_until:  # generation needs no Redis
            assert service.engine("t1", "steady").generate([[1, 2]], params, timeout_s=60)[0].token_ids == before
            served, noticed = served + 1, noticed or service._store_down.is_set()
        assert served >= 2 and noticed
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    eventually(lambda: not service._store_down.is_set(), "the scheduler did not see Redis back")
    assert service.get(job)["state"] == "running" and service.runner(job).worker_pids() == pids
    assert "running" == states(service, job)[-1]  # nothing was stopped or requeued
    os.kill(redis_pid, signal.SIGKILL)  # now the embedded Redis dies: the supervisor restarts it
    killed_at = time.monotonic()
    eventually(lambda: service.store.restarts == 1, "the embedded Redis was not restarted", timeout_s=10)
    assert service.store.ping() and time.monotonic() - killed_at < 5  # back within 5 s (the bound)
    later = service.submit(deployment("later", model_dir), "t1")["job_id"]  # scheduling resumed
    wait_state(service, later, "running")
    assert service.get(job)["state"] == "running" and service.runner(job).worker_pids() == pids


def test_inference_preempts_training_which_resumes_from_its_checkpoint(make_service, model_dir, hold_gpus,
                                                                       tmp_path):
    pytest.importorskip("shardwright.actors.training")
    nodes = node_ids()
    hold_gpus({nodes[0]: 4, nodes[1]: 4, nodes[2]: 2})  # two GPUs left: the cluster is full with `train`
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    service = make_service("priority")
    train = TrainingJob(name="train", model=ModelSource(path=model_dir), layout=ParallelLayout(tp=2),
                        train={"data": {"path": str(corpus), "seq_len": 32, "global_batch_size": 2},
                               "steps": 100_000, "num_micro_batches": 1})
    train_id = service.submit(train, "t1")["job_id"]
    wait_state(service, train_id, "running")
    eventually(lambda: service.get(train_id)["step"] >= 3, lambda: service.get(train_id), timeout_s=60)
    serve_id = service.submit(deployment("serve", model_dir, tp=2), "t2")["job_id"]
    wait_state(service, serve_id, "running")
    preempted = service.get(train_id)
    assert preempted["state"] == "preempted" and preempted["checkpoint"]
    step_at_preemption = preempted["step"]
    assert step_at_preemption >= 3
    service.cancel(serve_id)
    resumed = wait_state(service, train_id, "running")
    run_events = [e for e in service.events(train_id) if e["state"] == "running"]
    assert "resumed from checkpoint" in run_events[-1]["message"]
    assert run_events[-1]["metrics"]["step"] >= step_at_preemption  # not back to step 0
    assert resumed["attempts"] == 2
    # Progress events repeat the current state ('running'); the transitions are the changes.
    seen = states(service, train_id)
    transitions = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    assert transitions[:6] == ["submitted", "queued", "placed", "running", "preempting", "preempted"]


def test_a_deployment_whose_rebuild_cannot_succeed_fails_naming_the_cause(make_service, model_dir, tmp_path):
    import shutil

    copy = tmp_path / "doomed-model"
    shutil.copytree(model_dir, copy)
    service = make_service()
    job = service.submit(deployment("doomed", copy, tp=2), "t1")["job_id"]
    wait_state(service, job, "running")
    pids = service.runner(job).worker_pids()
    for weights in copy.glob("*.safetensors"):
        weights.unlink()  # a rebuild cannot load the shards any more
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)  # a worker of this test's own gang
    failed = wait_state(service, job, "failed", timeout_s=60)
    assert time.monotonic() - killed_at < 60  # the bound
    assert "rank 1" in failed["message"] and "rebuild 4/4 failed" in failed["message"], failed["message"]
    with pytest.raises(LookupError, match=r"doomed.*failed: .*rebuild 4/4 failed"):
        service.engine("t1", "doomed")
    eventually(lambda: find_controller(controller_name(service.store_id, job)) is None,
               "the failed deployment's controller actor is still alive")


def test_a_standby_scheduler_serves_from_job_events_and_takes_over_adopting_the_jobs(make_service, model_dir,
                                                                                     tmp_path):
    leader = make_service(state_dir=tmp_path / "shared")
    job = leader.submit(deployment("shared", model_dir, tp=2), "t1")["job_id"]
    wait_state(leader, job, "running")
    standby = make_service(state_dir=tmp_path / "shared", start=False).start(standby=True)
    assert standby._lease_lost.is_set()  # it serves, but does not schedule
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    eventually(lambda: ("t1", "shared") in standby._routes, "the standby did not learn the deployment from events")
    via_standby = standby.engine("t1", "shared").generate([[1, 2, 3]], params, timeout_s=60)[0].token_ids
    assert via_standby == leader.engine("t1", "shared").generate([[1, 2, 3]], params, timeout_s=60)[0].token_ids
    pids = leader.runner(job).worker_pids()
    leader.stop(keep_jobs=True)  # the leader goes (releasing its lease); its jobs stay
    eventually(lambda: standby.runner(job) is not None, "the standby did not take the lease over", timeout_s=20)
    assert standby.runner(job).worker_pids() == pids and standby.get(job)["state"] == "running"
    assert Counter(states(standby, job))["placed"] == 1  # adopted, not restarted
    later = standby.submit(deployment("later", model_dir), "t1")["job_id"]  # the new leader schedules
    wait_state(standby, later, "running")
    assert standby.engine("t1", "shared").generate([[1, 2, 3]], params, timeout_s=60)[0].token_ids == via_standby


def test_a_scheduler_whose_lease_was_taken_cannot_write_and_stops_acting(make_service, model_dir):
    from shardwright.scheduler.jobs import LeaseLostError

    service = make_service()
    running = service.submit(deployment("kept", model_dir), "t1")["job_id"]
    wait_state(service, running, "running")
    pids = service.runner(running).worker_pids()
    lease = service.store._key("lease")
    service.store.client.set(lease, "intruder", px=60_000)  # another replica took the lease
    with pytest.raises(LeaseLostError, match="held by intruder"):  # checked in the write's own transaction
        service.store.annotate(running, "step 1", fields={"step": 1}, fence=service.owner)
    eventually(lambda: service._lease_lost.is_set(), "the scheduler did not notice that it lost the lease")
    waiting = service.submit(deployment("waiting", model_dir), "t1")["job_id"]  # the API still takes jobs
    passes_done(service, 2)  # two passes of the fenced-out loop since the submission
    assert service.get(waiting)["state"] == "queued"  # no scheduling by a fenced-out scheduler
    assert find_controller(controller_name(service.store_id, waiting)) is None
    assert worker_pids(service, running) == pids  # and it stopped nothing: the holder adopts the jobs
    service.store.client.delete(lease)  # the other replica is gone: this one takes the lease back
    wait_state(service, waiting, "running")
    assert service.runner(running).worker_pids() == pids and Counter(states(service, running))["placed"] == 1


def test_a_deployment_of_a_training_run_serves_its_newest_checkpoint(make_service, model_dir, tmp_path):
    """Train 4 steps through the scheduler, then deploy the run's checkpoint folder itself: the
    deployment is recorded as serving `step-N.hf` beside the newest checkpoint, its controller writes
    that export on start, and the served logits equal the export loaded in this process (fp32, 1e-5:
    the same weights, kernels differing only in reduction order) and differ from the untrained model's."""
    pytest.importorskip("shardwright.actors.training")
    import torch

    from shardwright.models import load_model
    from shardwright.parallel.context import ParallelContext

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    service = make_service("priority")
    train = TrainingJob(name="train", model=ModelSource(path=model_dir), layout=ParallelLayout(tp=1),
                        train={"data": {"path": str(corpus), "seq_len": 32, "global_batch_size": 2},
                               "steps": 4, "num_micro_batches": 1, "optim": {"lr": 1e-2}})
    trained = wait_state(service, service.submit(train, "t1")["job_id"], "succeeded", timeout_s=180)
    run_root = Path(trained["checkpoint"]).parent
    job = service.submit(deployment("from-run", run_root), "t1")
    served_dir = Path(job["spec"]["model"])
    assert served_dir == run_root / "step-00000004.hf" and not served_dir.exists()
    wait_state(service, job["job_id"], "running", timeout_s=180)
    assert (served_dir / "config.json").is_file() and (served_dir / "model.safetensors").is_file()
    prompt = [3, 14, 15, 92, 65, 35]
    served = service.engine("t1", "from-run").prompt_logits(prompt)
    with torch.no_grad():
        _, reference = load_model(served_dir, ParallelContext.single("cpu"))
        ids, positions = torch.tensor([prompt]), torch.arange(len(prompt))[None]
        expected = reference.full_logits(reference(ids, positions))[0]
        _, untrained = load_model(model_dir, ParallelContext.single("cpu"))
        before = untrained.full_logits(untrained(ids, positions))[0]
    assert (served - expected).abs().max() <= 1e-5
    assert (expected - before).abs().max() > 1e-3, "4 steps at lr 1e-2 should move the logits"


def test_a_deployment_of_a_folder_that_is_neither_model_nor_checkpoint_is_refused(make_service, tmp_path):
    service = make_service("priority", start=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face model directory.*nor a training checkpoint"):
        service.submit(deployment("nothing", tmp_path / "empty"), "t1")
