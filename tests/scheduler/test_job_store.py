"""The scheduler's job store on a real redis-server (embedded): records, events, queues, idempotency, lease."""

from __future__ import annotations

import time

import pytest

from waiting import eventually
from shardwright.config import ParallelLayout, Settings
from shardwright.scheduler.job_store import JobStore
from shardwright.scheduler.jobs import JobRecord, JobState, TransitionError

S = JobState


def record(job_id: str, *, name: str | None = None, tenant: str = "t1", kind: str = "training",
           key: str | None = None) -> JobRecord:
    now = time.time()
    return JobRecord(job_id=job_id, name=name or job_id, kind=kind, tenant=tenant, state=S.QUEUED,
                     priority="batch", layout=ParallelLayout(tp=2), spec={"name": name or job_id},
                     submitted_at_s=now, updated_at_s=now, idempotency_key=key, queued_since_s=now)


def create(store: JobStore, job_id: str, **kwargs) -> JobRecord:
    job, created = store.create_job(record(job_id, **kwargs), [(S.SUBMITTED, "submitted"), (S.QUEUED, "queued")])
    assert created
    return job


@pytest.fixture
def store(tmp_path):
    s = JobStore.open(Settings(state_dir=tmp_path / "state"))
    yield s
    s.close()


def test_write_read_and_event_log(store):
    assert 0 < store.ping() < 1.0  # a real round trip through the job store's keys
    create(store, "a")
    store.transition("a", S.PLACED, "placed on n1", fields={"placement": ["n1", "n1"], "attempts": 1})
    store.transition("a", S.RUNNING, "running", metrics={"step": 0})
    store.annotate("a", None, fields={"step": 7, "checkpoint": "/ck/7"})
    job = store.get_job("a")
    assert (job.state, job.placement, job.step, job.checkpoint) == (S.RUNNING, ["n1", "n1"], 7, "/ck/7")
    assert job.attempts == 1
    assert job.message == "running" and job.num_events == 4
    events = store.events("a")
    assert [(e.sequence, e.state) for e in events] == [(0, S.SUBMITTED), (1, S.QUEUED), (2, S.PLACED), (3, S.RUNNING)]
    assert [e.sequence for e in store.events("a", 2)] == [2, 3]
    assert events[3].metrics == {"step": 0.0}
    assert store.get_job("nope") is None


def test_queue_membership_follows_the_state(store):
    for job_id in ("a", "b", "c"):
        create(store, job_id)
    assert store.queued_ids() == ["a", "b", "c"] and store.active_ids() == []
    store.transition("b", S.PLACED, "placed")
    assert store.queued_ids() == ["a", "c"] and store.active_ids() == ["b"]
    store.transition("b", S.RUNNING, "running")
    store.transition("b", S.PREEMPTING, "preempting")
    store.transition("b", S.PREEMPTED, "preempted", fields={"checkpoint": "/ck"})
    assert store.queued_ids() == ["a", "b", "c"] and store.active_ids() == []
    store.transition("a", S.CANCELLED, "cancelled")
    assert store.queued_ids() == ["b", "c"]


def test_illegal_transitions_are_refused_and_change_nothing(store):
    create(store, "a")
    with pytest.raises(TransitionError, match="job a is queued; it cannot become succeeded"):
        store.transition("a", S.SUCCEEDED, "done")
    store.transition("a", S.CANCELLED, "cancelled")
    with pytest.raises(TransitionError, match="cancelled"):
        store.transition("a", S.PLACED, "placed")
    with pytest.raises(TransitionError):
        store.transition("a", S.FAILED, "failed", expect=[S.RUNNING])
    assert store.get_job("a").state == S.CANCELLED and store.get_job("a").num_events == 3
    with pytest.raises(LookupError, match="job zz does not exist"):
        store.transition("zz", S.PLACED, "x")


def test_idempotency_key_returns_the_same_job_per_tenant(store):
    first = create(store, "a", name="train", key="k1")
    again, created = store.create_job(record("b", name="train", key="k1"), [(S.QUEUED, "queued")])
    assert not created and again.job_id == first.job_id
    other, created = store.create_job(record("c", name="train", key="k1", tenant="t2"), [(S.QUEUED, "queued")])
    assert created and other.job_id == "c"  # keys are per tenant
    assert [j.job_id for j in store.list_jobs(None, 10)[0]] == ["a", "c"]


def test_unfinished_names_are_unique_per_tenant(store):
    create(store, "a", name="train")
    with pytest.raises(ValueError, match="already has an unfinished job named 'train' \\(a\\)"):
        store.create_job(record("b", name="train"), [(S.QUEUED, "queued")])
    store.transition("a", S.CANCELLED, "cancelled")
    create(store, "b", name="train")


def test_listing_pages_and_filters(store):
    for i in range(7):
        create(store, f"j{i}", tenant="t1" if i % 2 == 0 else "t2", kind="training" if i < 5 else "inference")
    store.transition("j2", S.CANCELLED, "cancelled")
    seen, token = [], None
    while True:
        page, token = store.list_jobs("t1", 2, token)
        seen += [j.job_id for j in page]
        if token is None:
            break
    assert seen == ["j0", "j2", "j4", "j6"]
    assert [j.job_id for j in store.list_jobs(None, 10, state="queued")[0]] == ["j0", "j1", "j3", "j4", "j5", "j6"]
    assert [j.job_id for j in store.list_jobs(None, 10, kind="inference")[0]] == ["j5", "j6"]
    page, token = store.list_jobs(None, 3, state="queued", kind="training")
    assert [j.job_id for j in page] == ["j0", "j1", "j3"] and token is not None
    page, token = store.list_jobs(None, 3, token, state="queued", kind="training")
    assert [j.job_id for j in page] == ["j4"] and token is None
    with pytest.raises(ValueError, match="was not issued by this server"):
        store.list_jobs(None, 3, "abc")


def test_wait_events_wakes_on_a_new_event(store):
    import threading

    create(store, "a")
    timer = threading.Timer(0.3, lambda: store.transition("a", S.PLACED, "placed"))
    timer.start()
    start = time.monotonic()
    events = store.wait_events("a", 2, timeout_s=5.0)
    assert [e.state for e in events] == [S.PLACED] and time.monotonic() - start < 3.0
    start = time.monotonic()
    assert store.wait_events("a", 3, timeout_s=0.3) == []
    assert 0.25 < time.monotonic() - start < 2.0


def test_scheduler_lease_has_one_holder(store):
    assert store.acquire_lease("s1", ttl_s=0.5) is None
    assert store.acquire_lease("s2", ttl_s=0.5) == "s1"
    assert store.acquire_lease("s1", ttl_s=0.5) is None  # renewal
    eventually(lambda: store.acquire_lease("s2", ttl_s=5) is None, "s1's lease expired")  # 0.5 s after renewal
    store.release_lease("s1")  # not the holder: no effect
    assert store.acquire_lease("s1", ttl_s=5) == "s2"
