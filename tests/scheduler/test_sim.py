"""The discrete-event simulator: hand-computed tiny traces exactly, fairness, quotas, backfill, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwright.scheduler.model import ClusterInventory, Job
from shardwright.scheduler.policies import (
    POLICY_NAMES,
    BackfillPolicy,
    FairSharePolicy,
    FifoPolicy,
    LasPolicy,
    PriorityPolicy,
    make_policy,
)
from shardwright.scheduler.sim import SimOptions, Simulator, jain_index, main, percentile
from shardwright.scheduler.traces import load_philly, shape_for_gpus

PHILLY = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "traces"
    / "philly"
    / "philly_jobs_2017-09-04_to_2017-10-31.csv"
)


def job(
    job_id: str, submit_s: float, gpus: int, duration_s: float, *, tenant: str = "t", kind: str = "training"
) -> Job:
    shape = shape_for_gpus(gpus, gpus_per_node=8)
    return Job(job_id, tenant, kind, shape, submit_s, duration_s=duration_s)  # type: ignore[arg-type]


def jcts(report) -> dict[str, float]:
    return {jid: r.end_s - r.job.submit_time_s for jid, r in report.records.items() if r.end_s is not None}


def simulate(policy, jobs, nodes=1, gpus=4, **options):
    return Simulator(policy, ClusterInventory.uniform(nodes, gpus), SimOptions(**options)).run(jobs)


BLOCKING_TRACE = [job("A", 0, 2, 10), job("B", 1, 4, 5), job("C", 2, 2, 3), job("D", 3, 2, 20)]


def test_fifo_exact_on_a_hand_computed_trace():
    # 1 node x 4 GPUs. A runs 0-10. B (4 GPUs) waits for A: 10-15. C and D queue behind B: 15-18, 15-35.
    report = simulate(FifoPolicy(), BLOCKING_TRACE)
    assert jcts(report) == {"A": 10, "B": 14, "C": 16, "D": 32}
    assert report.avg_jct_s == 18.0  # (10 + 14 + 16 + 32) / 4
    assert report.avg_queue_s == report.avg_wait_s == (0 + 9 + 13 + 12) / 4
    assert report.makespan_s == 35.0
    # useful GPU-s 2*10 + 4*5 + 2*3 + 2*20 = 86 over 4 GPUs x 35 s
    assert report.utilization == pytest.approx(86 / 140)
    assert report.p50_jct_s == 15.0 and report.p99_jct_s == pytest.approx(16 + 0.97 * 16)


def test_backfill_exact_on_the_same_trace():
    # B is the head with a reservation at t=10 (when A ends). C (3 s, ends at 5 <= 10) is backfilled at
    # t=2; D (20 s) would still hold 2 GPUs at t=10, so it waits. B 10-15, D 15-35.
    report = simulate(BackfillPolicy(), BLOCKING_TRACE)
    assert jcts(report) == {"A": 10, "B": 14, "C": 3, "D": 32}
    assert report.avg_jct_s == 59 / 4
    assert report.records["B"].first_reservation_s == 10.0


def test_priority_preemption_with_checkpoint_on_demand_and_restart_overhead():
    # T (training, 4 GPUs, 100 s) from t=0; I (inference, 4 GPUs, 10 s) at t=30 preempts it.
    # T keeps its 30 s of progress, restarts at 40, spends 5 s reloading, needs 70 s more: ends at 115.
    trace = [job("T", 0, 4, 100), job("I", 30, 4, 10, kind="inference")]
    report = simulate(PriorityPolicy(), trace, restart_overhead_s=5.0)
    assert jcts(report) == {"T": 115, "I": 10}
    assert report.records["T"].num_preemptions == 1 and report.lost_gpu_s == 0.0
    assert report.avg_queue_s == 0.0  # both started on arrival ...
    assert report.avg_wait_s == (15 + 0) / 2  # ... but T waited 10 s requeued and 5 s reloading


def test_preemption_loses_work_since_the_last_checkpoint():
    # Checkpoints every 20 s of progress: at t=30 only 20 s are saved (10 s x 4 GPUs lost).
    # Restart at 40 + 5 s overhead + 80 s of work: T ends at 125.
    trace = [job("T", 0, 4, 100), job("I", 30, 4, 10, kind="inference")]
    report = simulate(PriorityPolicy(), trace, restart_overhead_s=5.0, checkpoint_interval_s=20.0)
    assert jcts(report) == {"T": 125, "I": 10}
    assert report.lost_gpu_s == 40.0
    assert report.utilization == pytest.approx((400 + 40) / (4 * 125))
    assert report.allocated_utilization == pytest.approx((4 * 30 + 4 * 10 + 4 * 85) / (4 * 125))


def test_las_exact_with_a_threshold_review():
    # 1 GPU, one LAS threshold at 10 GPU-s, no restart overhead. A (30 s) from 0; B (5 s) arrives at 5
    # while A is still in queue 0, so B waits. At t=10 A crosses into queue 1: the review pass (at
    # 10 + 1e-6) preempts it, B runs to 15, A resumes with 20 s left and ends at 35.
    trace = [job("A", 0, 1, 30), job("B", 5, 1, 5)]
    report = simulate(LasPolicy((10.0,), starve_limit=None), trace, nodes=1, gpus=1, restart_overhead_s=0.0)
    assert jcts(report) == pytest.approx({"A": 35.0, "B": 10.0}, abs=1e-5)
    assert report.num_preemptions == 1


def test_job_larger_than_the_cluster_is_rejected_and_the_rest_runs():
    report = simulate(FifoPolicy(), [job("huge", 0, 4, 10), job("ok", 0, 2, 10)], nodes=1, gpus=2)
    assert "larger than the whole cluster" in (report.records["huge"].rejected or "")
    assert report.num_rejected == 1 and jcts(report) == {"ok": 10}


def two_equal_tenants(seed: int) -> list[Job]:
    """Both tenants submit the same 100 jobs (Philly-like sizes: mostly 1 GPU) at t=0; a's come first."""
    rng = random.Random(seed)
    spec = [(rng.choice([1] * 6 + [2, 4, 8]), rng.uniform(50, 600)) for _ in range(100)]
    return [
        job(f"{tenant}{i}", 0.0, gpus, duration_s, tenant=tenant)
        for tenant in "ab"
        for i, (gpus, duration_s) in enumerate(spec)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fairshare_gives_two_equal_tenants_equal_gpu_time_within_10_percent(seed):
    # 4 nodes x 8 GPUs; both tenants are backlogged until the 1,500 s horizon (~40% of the work done).
    fair = simulate(FairSharePolicy(), two_equal_tenants(seed), nodes=4, gpus=8, horizon_s=1500.0)
    a, b = fair.tenant_gpu_s["a"], fair.tenant_gpu_s["b"]
    assert fair.num_unfinished > 0 and abs(a - b) / max(a, b) <= 0.10, (a, b)
    fifo = simulate(FifoPolicy(), two_equal_tenants(seed), nodes=4, gpus=8, horizon_s=1500.0)
    assert fifo.tenant_gpu_s["a"] > 2 * fifo.tenant_gpu_s["b"]  # the check can fail: FIFO serves a first


def test_quota_caps_a_tenant_while_the_other_runs():
    jobs = [job(f"a{i}", 0, 2, 100, tenant="a") for i in range(6)] + [
        job(f"b{i}", 50 * i, 2, 100, tenant="b") for i in range(3)
    ]
    report = simulate(FairSharePolicy(quotas_gpus={"a": 4}), jobs, nodes=1, gpus=8)
    intervals = [(r.first_start_s, r.end_s, r.job) for r in report.records.values()]
    for time_s in sorted({start for start, _, _ in intervals}):
        held = sum(j.num_gpus for start, end, j in intervals if j.tenant == "a" and start <= time_s < end)
        assert held <= 4
    assert all(report.records[f"b{i}"].first_start_s == 50 * i for i in range(3))  # b never waits
    assert report.records["a0"].first_start_s == 0 and report.records["a2"].first_start_s == 100


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6))
def test_property_backfill_never_delays_the_head_reservation(seed):
    rng = random.Random(seed)
    jobs = [
        job(f"j{i}", rng.uniform(0, 100), rng.choice([1, 2, 4, 8]), rng.uniform(1, 60)) for i in range(25)
    ]
    cluster = ClusterInventory.from_nodes({"a": 8, "b": 4, "c": 4})
    report = Simulator(BackfillPolicy(), cluster).run(jobs)
    for record in report.records.values():
        if record.first_reservation_s is not None:
            assert record.first_start_s <= record.first_reservation_s + 1e-9, record


def test_every_policy_is_deterministic_and_completes_a_random_trace():
    rng = random.Random(3)
    jobs = [
        job(
            f"j{i}",
            rng.uniform(0, 500),
            rng.choice([1, 2, 4, 8, 16]),
            rng.uniform(10, 300),
            tenant=rng.choice("xyz"),
            kind=rng.choice(["training"] * 4 + ["inference"]),
        )
        for i in range(80)
    ]
    for name in POLICY_NAMES:
        first = simulate(make_policy(name), jobs, nodes=3, gpus=8).to_json()
        assert first == simulate(make_policy(name), jobs, nodes=3, gpus=8).to_json()
        assert first["num_completed"] == 80 and first["avg_jct_s"] >= first["avg_queue_s"]


def test_metric_helpers():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 99) == 0.0
    assert jain_index([5.0, 5.0]) == 1.0 and jain_index([1.0, 0.0]) == 0.5


def write_trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,gpus,user\n0,10,2,a\n1,5,4,b\n2,3,2,b\n3,20,2,a\n")
    return path


def test_cli_prints_a_table_then_one_json_line(tmp_path, capsys):
    assert (
        main(
            [
                "--trace",
                str(write_trace(tmp_path)),
                "--nodes",
                "1",
                "--gpus-per-node",
                "4",
                "--policy",
                "backfill",
                "--json",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert {
        "avg_jct_s",
        "p50_jct_s",
        "p99_jct_s",
        "avg_queue_s",
        "makespan_s",
        "utilization",
    } <= figures.keys()
    assert figures["avg_jct_s"] == 59 / 4 and "policy backfill" in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--trace", "/nonexistent.csv", "--nodes", "1", "--gpus-per-node", "4", "--policy", "fifo"],
            "not found",
        ),
        (
            ["--nodes", "1", "--gpus-per-node", "4", "--policy", "srtf", "--trace", "TRACE"],
            "unknown policy 'srtf'",
        ),
        (["--trace", "TRACE", "--nodes", "0", "--gpus-per-node", "4", "--policy", "fifo"], "num_nodes=0"),
        (["--trace", "TRACE", "--nodes", "1", "--policy", "fifo"], "--gpus-per-node"),
    ],
)
def test_cli_errors_are_one_actionable_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [str(write_trace(tmp_path)) if a == "TRACE" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_philly_slice_runs_under_every_policy():
    if not PHILLY.is_file():
        pytest.skip(f"Philly trace not found at {PHILLY} (shared/traces is not checked out here)")
    jobs = load_philly(PHILLY, since_s=20 * 86_400, limit=300).jobs
    reports = {name: simulate(make_policy(name), jobs, nodes=4, gpus=8) for name in POLICY_NAMES}
    for report in reports.values():
        assert report.num_completed == 300
        assert report.avg_jct_s >= sum(j.duration_s for j in jobs) / 300 - 1e-6
