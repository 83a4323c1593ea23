"""Job files checked completely at submission, and tenants confined, on a real gRPC server.

Real parts: the session's local Ray cluster (4 logical GPUs), the scheduler service with its
embedded Redis, ShardwrightServer on localhost with a tenants file, the Python client. The
service's reconcile loop is not started, so accepted jobs stay queued (nothing runs): what is
tested is the front door, and the test can read Redis to see that a refused job wrote nothing.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_helpers import tiny_spec
from shardwright.api.client import Client, ShardwrightError
from shardwright.api.server import ServerOptions, ShardwrightServer
from shardwright.config import JobState
from shardwright.config import Settings
from shardwright.models.random_init import write_random_checkpoint
from shardwright.scheduler.service import SchedulerConfig, SchedulerService

MAX_OF = {"lou": "low", "bea": "batch", "sam": "serving", "hal": "high"}
TOKEN = {name: f"{name}-token-0001" for name in ("alice", "bob", "carl", *MAX_OF)}
MAX_JOBS = {"carl": 3}
# Like the 469-byte job file of issue 16: nine levels of anchors, each nine aliases of the one below.
ALIAS_BOMB = ("kind: training\nname: bomb\nmodel: {preset: tiny-llama}\ntrain:\n  data: {path: corpus, seq_len: 8, "
              "global_batch_size: 1}\n  x: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
              + "".join(f"  x{i}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                        for i, (p, c) in enumerate(zip("abcdefgh", "bcdefghi"))))
NESTING_BOMB = "kind: training\nname: nest\nmodel: {preset: tiny-llama}\ntrain: " + "[" * 100 + "]" * 100 + "\n"


@pytest.fixture(scope="module")
def front(ray_cluster, tmp_path_factory):
    """(service, server address, roots by tenant) with the tenants file of the matrix tests."""
    tmp = tmp_path_factory.mktemp("front")
    roots = {name: tmp / name for name in TOKEN}
    for name, root in roots.items():
        write_random_checkpoint(root / "model", tiny_spec("llama", vocab_size=256), seed=1)
        (root / "corpus").mkdir()
        (root / "corpus" / "a.txt").write_text("the quick brown fox " * 50)
    (roots["alice"] / "to-bob").symlink_to(roots["bob"])  # a symlink escaping alice's root
    tenants = {"tenants": {name: {"tokens": [token], "roots": [str(roots[name])],
                                  "max_priority": MAX_OF.get(name, "serving"), "quota_gpus": 4,
                                  **({"max_jobs": MAX_JOBS[name]} if name in MAX_JOBS else {})}
                           for name, token in TOKEN.items()}}
    tenants_file = tmp / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump(tenants))
    settings_ = Settings(state_dir=tmp / "state", tokens_file=tenants_file)
    service = SchedulerService(settings_, SchedulerConfig())  # loop not started: accepted jobs stay queued
    server = ShardwrightServer(service, ServerOptions(port=0, settings=settings_))
    port = server.start()
    yield service, f"127.0.0.1:{port}", roots
    server.server.stop(0)
    service.close()


def client(front, tenant: str) -> Client:
    return Client(front[1], token=TOKEN[tenant], timeout_s=30)


def refused(call) -> ShardwrightError:
    with pytest.raises(ShardwrightError) as err:
        call()
    return err.value


def inference(name: str, model, **extra) -> str:
    return yaml.safe_dump({"kind": "inference", "name": name, "model": str(model),
                           "engine": {"num_blocks": 16}, **extra})


def training(name: str, data, model_path=None, **extra) -> str:
    model = {"path": str(model_path)} if model_path is not None else {"preset": "tiny-llama"}
    return yaml.safe_dump({"kind": "training", "name": name, "model": model,
                           "train": {"data": {"path": str(data), "seq_len": 8, "global_batch_size": 4},
                                     "steps": 2}, **extra})


def test_bombs_are_refused_fast_small_and_unstored(front):
    service, _, _ = front
    keys_before = service.store.client.dbsize()
    with client(front, "alice") as alice:
        alice.submit(inference("warm-up", "model"))  # first call: channel and server warm
        keys_warm = service.store.client.dbsize()
        assert len(ALIAS_BOMB) < 500  # 9 * 10**8 "lol"s once expanded
        for bomb in (ALIAS_BOMB, NESTING_BOMB):
            start = time.perf_counter()
            err = refused(lambda: alice.submit(bomb))
            elapsed_s = time.perf_counter() - start
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "anchors" in str(err) or "nests deeper than 16" in str(err), err
            assert elapsed_s < 0.05, f"{elapsed_s * 1e3:.1f} ms"  # the bound; localhost round trip included
            tracemalloc.start()  # the server runs in this process: its allocations are traced
            refused(lambda: alice.submit(bomb))
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert keys_warm > keys_before and service.store.client.dbsize() == keys_warm  # the bombs wrote nothing


def test_a_typo_or_missing_path_is_one_line_naming_the_field(front):
    _, _, roots = front
    with client(front, "alice") as alice:
        text = training("typo", "corpus").replace("seq_len", "seq_lne")
        err = refused(lambda: alice.submit(text))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "train.data.seq_lne: unknown field (did you mean 'seq_len'?" in str(err) and "\n" not in str(err)
        err = refused(lambda: alice.submit(training("gone", "no-such-corpus")))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"train.data.path: {roots['alice'] / 'no-such-corpus'} does not exist" in str(err)


def test_relative_paths_resolve_against_the_tenants_root(front):
    _, _, roots = front
    with client(front, "alice") as alice:
        job = alice.submit(training("relative", "corpus/a.txt", model_path="model"))
        job_id = job["job_id"]
    spec = front[0].store.get_job(job_id).spec
    assert spec["train"]["data"]["path"] == str(roots["alice"] / "corpus" / "a.txt")
    assert spec["model"]["path"] == str(roots["alice"] / "model")


def test_path_matrix(front):
    _, _, roots = front
    alice_root, bob_root = roots["alice"], roots["bob"]
    outside = {"absolute outside the roots": "/etc", "absolute, missing, outside": "/no/such/dir",
               "..": "../bob/model", "symlink escaping the root": alice_root / "to-bob" / "model",
               "another tenant's directory": bob_root / "model"}
    with client(front, "alice") as alice:
        for field, make in (("model", lambda p, i: inference(f"m{i}", p)),
                            ("train.data.path", lambda p, i: training(f"d{i}", p)),
                            ("model.path", lambda p, i: training(f"p{i}", "corpus", model_path=p))):
            messages = {}
            for i, (case, path) in enumerate(outside.items()):
                err = refused(lambda: alice.submit(make(path, i)))
                assert err.code == grpc.StatusCode.PERMISSION_DENIED, (case, err)
                messages[case] = str(err)
            assert len(set(messages.values())) == 1, messages  # never says whether a path exists
            assert str(bob_root) not in next(iter(messages.values())) and field in next(iter(messages.values()))
            err = refused(lambda: alice.submit(make(alice_root / "missing", 9)))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and f"{field}: " in str(err), err
        alice.submit(inference("inside", alice_root / "model"))  # and inside the root it is accepted


def test_priority_matrix(front):
    order = ["low", "batch", "serving", "high"]
    for tenant, maximum in MAX_OF.items():
        with client(front, tenant) as c:
            job = c.submit(training(f"at-max-{maximum}", "corpus", priority=maximum))
            assert job["priority"] == maximum and job["tenant"] == tenant
            for above in order[order.index(maximum) + 1:]:
                err = refused(lambda: c.submit(training(f"above-{above}", "corpus", priority=above)))
                assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
                assert f"above the maximum of tenant {tenant}, {maximum!r}" in str(err)


def test_quota_is_checked_at_submission(front):
    with client(front, "alice") as alice:
        err = refused(lambda: alice.submit(inference("big", "model", layout={"tp": 8})))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "quota of 4 GPUs" in str(err)


def test_max_jobs_holds_under_concurrent_submissions(front):
    """8 submissions at once from a tenant with max_jobs 3: exactly 3 are stored, the others get
    RESOURCE_EXHAUSTED naming the limit; once one is cancelled, a new one fits again."""
    from concurrent.futures import ThreadPoolExecutor

    def submit(i):
        with client(front, "carl") as c:
            try:
                return c.submit(inference(f"carl-{i}", "model"))
            except ShardwrightError as err:
                return err

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(8)))
    accepted = [r for r in results if isinstance(r, dict)]
    refusals = [r for r in results if isinstance(r, ShardwrightError)]
    assert len(accepted) == 3 and len(refusals) == 5, results
    assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_jobs of 3" in str(r) for r in refusals)
    with client(front, "carl") as c:
        assert len(c.list()[0]) == 3
        c.cancel(accepted[0]["job_id"])
        assert c.submit(inference("carl-after-cancel", "model"))["tenant"] == "carl"
        err = refused(lambda: c.submit(inference("carl-one-too-many", "model")))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cluster_shows_other_tenants_nothing_of_their_jobs(front):
    service, _, _ = front
    with client(front, "bob") as bob:
        job = bob.submit(inference("bobs-secret", "model"))
        service.store.transition(job["job_id"], JobState.PLACED, "placed by the test", fields={"placement": ["n1"]})
        assert any(g["job_id"] == job["job_id"] for g in bob.cluster()["gangs"])
    with client(front, "alice") as alice:
        seen = json.dumps(alice.cluster())
    assert job["job_id"] not in seen and "bobs-secret" not in seen


def test_a_path_swapped_for_a_symlink_after_submission_fails_the_job_before_it_starts(front, tmp_path):
    _, _, roots = front
    settings_ = Settings(state_dir=tmp_path / "state", tokens_file=roots["alice"].parent / "tenants.yaml")
    service = SchedulerService(settings_, SchedulerConfig())  # its own store: only this job is queued
    try:
        swapped = roots["alice"] / "swapped"
        swapped.mkdir()
        (swapped / "config.json").write_text((roots["alice"] / "model" / "config.json").read_text())
        job = service.submit_text(inference("swap", swapped), "alice")
        (swapped / "config.json").unlink()
        swapped.rmdir()
        swapped.symlink_to(roots["bob"] / "model")  # now it leads into bob's root
        # One pass by hand, as the lease holder (its writes are fenced on the lease): no loop thread.
        assert service.store.acquire_lease(service.owner, ttl_s=60) is None
        service.reconcile_once()
        record = service.get(job["job_id"])
        assert record["state"] == "failed" and "model: not permitted" in record["message"], record
        assert service.runner(job["job_id"]) is None  # nothing was started on bob's model
    finally:
        service.close()


# ---- fuzz: generated job files, valid and invalid ------------------------------------------------

# (field the error must name, where in the job to put what): each one makes a valid job invalid.
MUTATIONS = [
    ("train.steps", ("train", "steps"), -1), ("train.steps", ("train", "steps"), "many"),
    ("train.data.seq_len", ("train", "data", "seq_len"), 0), ("train.optim.lr", ("train", "optim", "lr"), 0),
    ("train.optim.beta1", ("train", "optim", "beta1"), 1.5), ("train.schedule", ("train", "schedule"), "zigzag"),
    ("train.precision", ("train", "precision"), "fp8"), ("train.offload_optimizer", ("train", "offload_optimizer"), 2),
    ("train.data.pth", ("train", "data", "pth"), "corpus"), ("train.stepz", ("train", "stepz"), 3),
    ("train.optim.lrr", ("train", "optim", "lrr"), 0.1), ("layout.tp", ("layout", "tp"), 0),
    ("priority", ("priority",), "urgent"), ("name", ("name",), "Not_A_Name"), ("layot", ("layot",), {"tp": 1}),
    ("train.data.path", ("train", "data", "path"), "missing.txt"), ("model.path", ("model", "path"), "nowhere"),
    ("engine.num_blocks", ("engine", "num_blocks"), -1), ("engine.pool.peers", ("engine", "pool", "peers"), -2),
    ("model", ("model",), "no-model-here"), ("engine.max_runing", ("engine", "max_runing"), 4),
]
_names = iter(range(10**9))


@st.composite
def job_files(draw):
    """(text, field or None): a valid job, or one with one mutation that names `field`."""
    name = f"fz-{next(_names)}"
    kind = draw(st.sampled_from(["training", "inference"]))
    if kind == "training":
        job = {"kind": kind, "name": name, "model": draw(st.sampled_from([{"preset": "tiny-llama"}, {"path": "model"}])),
               "layout": {"tp": draw(st.sampled_from([1, 2])), "dp": draw(st.sampled_from([1, 2]))},
               "train": {"data": {"path": draw(st.sampled_from(["corpus", "corpus/a.txt"])), "seq_len": 8,
                                  "global_batch_size": 8},
                         "steps": draw(st.integers(1, 10**6)), "optim": {"lr": draw(st.floats(1e-5, 1.0))},
                         "schedule": draw(st.sampled_from(["1f1b", "gpipe"]))},
               "priority": draw(st.sampled_from(["low", "batch", "serving"]))}
    else:
        job = {"kind": kind, "name": name, "model": "model", "layout": {"tp": draw(st.sampled_from([1, 2, 4]))},
               "engine": {"num_blocks": draw(st.integers(1, 4096)), "block_size": draw(st.sampled_from([8, 16]))}}
    applicable = [m for m in MUTATIONS if (m[1][0] in job or m[1][0] in ("layot", "priority"))
                  and not (kind == "inference" and m[1][0] == "model" and len(m[1]) > 1)
                  and not (kind == "training" and m[1] == ("model",))
                  and not (m[1][:2] == ("model", "path") and "preset" in job["model"])]
    field = None
    if draw(st.booleans()):
        field, where, value = draw(st.sampled_from(applicable))
        node = job
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = value
    text = json.dumps(job) if draw(st.booleans()) else yaml.safe_dump(job)
    return text, field


# ~13 ms a submission on the 2-core dev machine: 2,000 take about 30 s in the suite; the issue's
# 10,000 run with SHARDWRIGHT_FUZZ_EXAMPLES=10000 (the issue note records that run).
FUZZ_EXAMPLES = int(os.environ.get("SHARDWRIGHT_FUZZ_EXAMPLES", "2000"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=job_files())
def test_fuzz_job_files(front, case):
    text, field = case
    with client(front, "sam") as sam:
        try:
            job = sam.submit(text)
        except ShardwrightError as err:
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (text, err)  # never INTERNAL/UNKNOWN
            assert field is not None, f"a valid job was refused: {err}\n{text}"
            assert f"{field}" in str(err) and "\n" not in str(err), (field, str(err))
        else:
            assert field is None, f"an invalid job ({field}) was accepted:\n{text}"
            assert job["state"] == "queued"


SPLICES = ["&a ", "*a", "<<: {x: 1}\n", "[", "]", "{", "}", ": ", "\n  ", "- ", "!!binary ", "~", "'", '"', "\t",
           "\x00", "9" * 5000, "nan", "1e999", "..", "/etc", "\u202e", "? ", "%YAML 1.1\n"]


@settings(max_examples=FUZZ_EXAMPLES // 4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=job_files(), cuts=st.lists(st.tuples(st.integers(0, 10**4), st.sampled_from(SPLICES)), min_size=1,
                                       max_size=4))
def test_fuzz_spliced_job_files(front, case, cuts):
    # Valid and invalid job files with YAML syntax spliced in anywhere: never a server error.
    text = case[0]
    for at, piece in cuts:
        at %= len(text) + 1
        text = text[:at] + piece + text[at:]
    with client(front, "sam") as sam:
        try:
            sam.submit(text)
        except ShardwrightError as err:
            assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), (text, err)
            assert "\n" not in str(err) and len(str(err)) < 1000, str(err)
