"""Scheduling policies on plain objects: one pass at a time, decisions checked exactly."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwright.config import ParallelLayout
from shardwright.scheduler.model import (
    ClusterInventory,
    GangShape,
    Job,
    PriorityClass,
    RunningJob,
    UnplaceableJobError,
)
from shardwright.scheduler.placement import place_and_allocate
from shardwright.scheduler.policies import (
    POLICY_NAMES,
    BackfillPolicy,
    FairSharePolicy,
    FifoPolicy,
    LasPolicy,
    PreemptJob,
    PriorityPolicy,
    ReserveJob,
    StartJob,
    make_policy,
)


def job(
    job_id: str,
    gpus: int = 1,
    *,
    tenant: str = "t",
    kind: str = "training",
    submit_s: float = 0.0,
    duration_s: float = 100.0,
    priority: int | None = None,
    attained: float = 0.0,
) -> Job:
    return Job(
        job_id,
        tenant,
        kind,
        GangShape(ParallelLayout(tp=gpus)),
        submit_s,
        priority=priority,  # type: ignore[arg-type]
        duration_s=duration_s,
        attained_service_gpu_s=attained,
    )


def run_on(cluster: ClusterInventory, j: Job, start_s: float = 0.0) -> RunningJob:
    placement = place_and_allocate(j.shape, cluster)
    assert placement is not None
    return RunningJob(j, placement.gpus_by_node, start_s, start_s + (j.duration_s or 0.0))


def started(decisions) -> list[str]:
    return [d.job_id for d in decisions if isinstance(d, StartJob)]


def preempted(decisions) -> list[str]:
    return [d.job_id for d in decisions if isinstance(d, PreemptJob)]


def test_fifo_head_of_line_blocks():
    cluster = ClusterInventory.uniform(1, 8)
    running = [run_on(cluster, job("r", 6))]
    decisions = FifoPolicy().schedule(
        [job("a", 4, submit_s=1), job("b", 1, submit_s=2)], running, cluster, 5.0
    )
    assert decisions == []


def test_policy_does_not_mutate_its_inputs():
    cluster = ClusterInventory.uniform(2, 4)
    before = dict(cluster.free_by_node)
    queue = [job(f"q{i}", 2, submit_s=i) for i in range(5)]
    for name in POLICY_NAMES:
        assert started(make_policy(name).schedule(queue, [], cluster, 0.0)) == ["q0", "q1", "q2", "q3"]
        assert cluster.free_by_node == before


def test_priority_inference_preempts_training_never_inference():
    cluster = ClusterInventory.uniform(2, 4)
    serving = run_on(cluster, job("serve", 4, kind="inference"))
    training = run_on(cluster, job("train", 4))
    decisions = PriorityPolicy().schedule(
        [job("new-serve", 4, kind="inference", submit_s=1)], [serving, training], cluster, 2.0
    )
    assert preempted(decisions) == ["train"]
    start = decisions[-1]
    assert isinstance(start, StartJob) and start.job_id == "new-serve"
    assert start.after_preemptions == ("train",)
    assert start.placement.gpus_by_node == training.gpus_by_node


def test_training_never_preempts_inference_even_with_a_higher_class():
    cluster = ClusterInventory.uniform(1, 4)
    serving = run_on(cluster, job("serve", 4, kind="inference"))
    urgent = job("urgent-train", 4, priority=int(PriorityClass.CRITICAL))
    assert PriorityPolicy().schedule([urgent], [serving], cluster, 1.0) == []


def test_priority_preempts_lowest_class_then_most_recent_and_only_what_is_needed():
    cluster = ClusterInventory.uniform(1, 8)
    old = run_on(cluster, job("old", 2), start_s=0.0)
    recent = run_on(cluster, job("recent", 2), start_s=50.0)
    best_effort = run_on(cluster, job("be", 2, priority=int(PriorityClass.BEST_EFFORT)), start_s=10.0)
    other = run_on(cluster, job("other", 2), start_s=20.0)
    decisions = PriorityPolicy().schedule(
        [job("serve", 4, kind="inference")], [old, recent, best_effort, other], cluster, 60.0
    )
    assert preempted(decisions) == ["be", "recent"]
    assert started(decisions) == ["serve"]


def test_priority_does_not_preempt_within_the_same_class():
    cluster = ClusterInventory.uniform(1, 4)
    running = [run_on(cluster, job("a", 4))]
    assert PriorityPolicy().schedule([job("b", 4, submit_s=1)], running, cluster, 2.0) == []


def test_fairshare_offers_gpus_to_the_tenant_with_the_smallest_share():
    cluster = ClusterInventory.uniform(1, 8)
    running = [run_on(cluster, job("a-run", 6, tenant="a"))]
    queue = [job("a1", 2, tenant="a", submit_s=1), job("b1", 2, tenant="b", submit_s=2)]
    assert started(FairSharePolicy().schedule(queue, running, cluster, 3.0)) == ["b1"]


def test_tenant_over_quota_waits_while_others_run():
    cluster = ClusterInventory.uniform(1, 8)
    queue = [job(f"a{i}", 2, tenant="a", submit_s=i) for i in range(4)] + [
        job("b0", 2, tenant="b", submit_s=9)
    ]
    decisions = FairSharePolicy(quotas_gpus={"a": 4}).schedule(queue, [], cluster, 10.0)
    assert sorted(started(decisions)) == ["a0", "a1", "b0"]  # 2 GPUs stay free: a is at its quota


def test_job_larger_than_its_tenant_quota_is_rejected_at_submission():
    policy = FairSharePolicy(quotas_gpus={"a": 4})
    with pytest.raises(UnplaceableJobError, match="quota of 4 GPUs"):
        policy.check_submission(job("big", 8, tenant="a"), ClusterInventory.uniform(2, 8))


def test_backfill_starts_short_jobs_and_keeps_the_head_reservation():
    cluster = ClusterInventory.uniform(1, 4)
    running = [run_on(cluster, job("r", 2, duration_s=10.0))]  # ends at t=10
    queue = [
        job("head", 4, submit_s=1),
        job("short", 2, submit_s=2, duration_s=5),
        job("long", 2, submit_s=3, duration_s=50),
    ]
    decisions = BackfillPolicy().schedule(queue, running, cluster, 3.0)
    assert started(decisions) == ["short"]  # ends at 8 <= 10; "long" would hold the head's GPUs at 10
    reserve = decisions[-1]
    assert isinstance(reserve, ReserveJob) and reserve.job_id == "head" and reserve.start_time_s == 10.0


def test_backfill_long_job_may_use_gpus_the_reservation_leaves_spare():
    cluster = ClusterInventory.uniform(2, 4)
    running = [
        run_on(cluster, job("r1", 4, duration_s=10.0)),
        run_on(cluster, job("r2", 2, duration_s=100.0)),
    ]
    queue = [job("head", 4, submit_s=1), job("long", 2, submit_s=2, duration_s=500)]
    decisions = BackfillPolicy().schedule(queue, running, cluster, 3.0)
    # at t=10 the head takes r1's node; r2's node has 2 GPUs spare now and then, so "long" runs there
    assert started(decisions) == ["long"]
    assert decisions[0].placement.gpus_by_node == {"node-0001": 2} == running[1].gpus_by_node
    assert decisions[1].placement.gpus_by_node == {"node-0000": 4}  # the head's reserved placement


def test_las_new_job_preempts_the_job_with_more_service_not_equals_or_inference():
    cluster = ClusterInventory.uniform(1, 3)
    policy = LasPolicy(thresholds_gpu_s=(100.0,), starve_limit=None)
    long_run = run_on(cluster, job("long", 1), start_s=0.0)  # 500 GPU-s at t=500: queue 1
    fresh = run_on(cluster, job("fresh", 1), start_s=450.0)  # 50 GPU-s: queue 0
    serve = run_on(cluster, job("serve", 1, kind="inference"), start_s=0.0)
    decisions = policy.schedule([job("new", 1, submit_s=500)], [long_run, fresh, serve], cluster, 500.0)
    assert preempted(decisions) == ["long"] and started(decisions) == ["new"]


def test_las_starvation_guard_promotes_a_long_waiting_job():
    policy = LasPolicy(thresholds_gpu_s=(100.0,), starve_limit=2.0)
    waited = Job(
        "w",
        "t",
        "training",
        GangShape(),
        0.0,
        duration_s=1e4,
        attained_service_gpu_s=200.0,
        queued_since_s=100.0,
    )
    assert policy.waiting_queue(waited, now_s=200.0) == 1  # waited 100 s <= 2 x 200 s run
    assert policy.waiting_queue(waited, now_s=600.0) == 0  # waited 500 s > 400 s


def test_las_promoted_job_is_not_preempted_straight_back():
    # X (attained 5000 GPU-s, queue 2) waited 12,000 s > 2 x 5,000 s of run time, so it was promoted
    # and restarted at t=12,000. Y (200 GPU-s, queue 1) was just displaced. Counting X's service from
    # its restart (10 GPU-s: queue 0), Y may not preempt it; without the guard it would.
    def state():
        cluster = ClusterInventory.uniform(1, 1)
        x = Job("x", "t", "training", GangShape(), 0.0, duration_s=1e5, attained_service_gpu_s=5000.0)
        y = Job(
            "y",
            "t",
            "training",
            GangShape(),
            0.0,
            duration_s=1e5,
            attained_service_gpu_s=200.0,
            queued_since_s=12_000.0,
        )
        return [y], [run_on(cluster, x, start_s=12_000.0)], cluster

    guarded = LasPolicy(thresholds_gpu_s=(100.0, 1000.0), starve_limit=2.0)
    assert guarded.schedule(*state(), 12_010.0) == []
    unguarded = LasPolicy(thresholds_gpu_s=(100.0, 1000.0), starve_limit=None)
    assert preempted(unguarded.schedule(*state(), 12_010.0)) == ["x"]


def test_las_asks_for_a_review_when_a_running_job_crosses_a_threshold():
    cluster = ClusterInventory.uniform(1, 2)
    policy = LasPolicy(thresholds_gpu_s=(100.0,), starve_limit=None)
    running = [run_on(cluster, job("r", 2), start_s=0.0)]  # 2 GPUs: crosses 100 GPU-s at t=50
    assert policy.next_review_s([job("q", 2, submit_s=10)], running, 10.0) == pytest.approx(50.0, abs=1e-5)
    assert policy.next_review_s([], running, 10.0) is None


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="choose one of fifo, priority, fairshare, backfill, las"):
        make_policy("srtf")


def random_state(seed: int) -> tuple[list[Job], list[RunningJob], ClusterInventory]:
    rng = random.Random(seed)
    cluster = ClusterInventory.from_nodes({f"n{i}": rng.choice([2, 4, 8]) for i in range(rng.randint(1, 6))})
    kinds = ["training", "training", "inference"]
    running = []
    for i in range(rng.randint(0, 8)):
        j = job(
            f"r{i}",
            rng.choice([1, 2, 4]),
            kind=rng.choice(kinds),
            tenant=rng.choice("ab"),
            attained=rng.choice([0, 500.0]),
        )
        placement = place_and_allocate(j.shape, cluster)
        if placement is not None:
            running.append(RunningJob(j, placement.gpus_by_node, rng.uniform(0, 50), rng.uniform(60, 200)))
    queue = [
        job(
            f"q{i}",
            rng.choice([1, 2, 4, 8]),
            kind=rng.choice(kinds),
            tenant=rng.choice("ab"),
            submit_s=rng.uniform(0, 50),
            duration_s=rng.uniform(1, 300),
        )
        for i in range(rng.randint(0, 12))
    ]
    return queue, running, cluster


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(POLICY_NAMES))
def test_property_decisions_apply_in_order_and_never_preempt_inference(seed, name):
    queue, running, cluster = random_state(seed)
    decisions = make_policy(name).schedule(queue, running, cluster, 60.0)
    by_id = {r.job.job_id: r for r in running}
    work = cluster.copy()
    kinds = [type(d) for d in decisions]
    assert kinds == sorted(kinds, key=[PreemptJob, StartJob, ReserveJob].index)
    for decision in decisions:
        if isinstance(decision, PreemptJob):
            assert by_id[decision.job_id].job.kind == "training"
            work.release(by_id[decision.job_id].gpus_by_node)
        elif isinstance(decision, StartJob):
            work.allocate(decision.placement.gpus_by_node)  # raises if it does not fit
    assert work.num_free_gpus >= 0
