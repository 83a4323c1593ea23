"""`serve` without a Ray address on its own local Ray head, which outlives it: restarts keep the jobs.

Real parts only: `serve` subprocesses with no Ray address (each starts or joins the Ray head of its
state dir, a `ray start --head` process of its own), their embedded Redis in a temporary state
dir, gRPC on localhost, tiny random models. The test process joins the same head as a driver only
to read the worker pids of the controller actors. Every test ends the head it caused (stop_server,
`shardwright stop`), failing or not; tests/conftest.py fails the session if one is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from waiting import eventually
from model_helpers import tiny_spec
from shardwright.api.client import Client, ShardwrightError
from shardwright.cluster.local_head import find_head
from shardwright.cluster.redis_server import EMBEDDED_DB_NAME, embedded_server
from shardwright.config import Settings
from shardwright.models.random_init import write_random_checkpoint
from test_server_e2e import CORPUS, start_server_info, stop_server, stop_state_dir, wait_state

ray = pytest.importorskip("ray")
from test_serve_restart import TRAIN, gangs  # noqa: E402  (worker pids per job, read through Ray)

pytestmark = pytest.mark.slow
TOKEN = "alice-token-123"
LEASE_TTL_S = 5.0  # SchedulerConfig's default, which `serve` runs with


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A folder with a tiny model and a tokens file, for servers with no Ray address; at the end the
    test process leaves Ray and nothing of the state dir runs any more."""
    for var in ("SHARDWRIGHT_RAY_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # this process's driver, as serve sets its own
    if ray.is_initialized():
        ray.shutdown()  # another module's Ray: this one joins the server's head
    write_random_checkpoint(tmp_path / "model", tiny_spec("llama", max_position_embeddings=512), seed=5, std=0.2)
    (tmp_path / "tokens.yaml").write_text(f"{TOKEN}: alice")
    yield tmp_path
    ray.shutdown()
    stop_state_dir(tmp_path / "state")


def serve(root: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    return start_server_info(root / "state", root / "tokens.yaml", *args)


def join_head(root: Path) -> list[int]:
    """Join the state dir's head as a driver (the server started it); returns the pids of the head's
    process tree, to check later that stopping it ended them all."""
    from shardwright.cluster.ray_connect import connect_serving

    head = find_head(root / "state")
    assert head is not None, "serve did not record a running Ray head in its state dir"
    if not ray.is_initialized():
        connect_serving(Settings(state_dir=root / "state"))
    return [head.pid, *(p.pid for p in psutil.Process(head.pid).children(recursive=True))]


def deployment(root: Path, name: str, tp: int) -> str:
    return (f"kind: inference\nname: {name}\nmodel: {root / 'model'}\nlayout: {{tp: {tp}}}\n"
            "engine: {num_blocks: 64, block_size: 8}\n")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def events_so_far(client: Client, job_id: str) -> list[dict]:
    """A job's events so far: a watch of a job that has not ended, read to its deadline."""
    events = []
    try:
        for event in client.watch(job_id, timeout_s=3):
            events.append(event)
    except ShardwrightError as err:
        if err.code != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return events


def states_so_far(client: Client, job_id: str) -> list[str]:
    return [event["state"] for event in events_so_far(client, job_id)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardwright.api.cli", *args], capture_output=True, text=True,
                          timeout=180)


def test_serve_killed_with_sigkill_restarts_on_its_own_head_with_the_same_workers(root):
    proc, info = serve(root)
    try:
        head = find_head(root / "state")
        with Client(info["address"], token=TOKEN) as alice:
            chat = alice.submit(deployment(root, "chat", tp=2))["job_id"]
            train = alice.submit(TRAIN.format(model=root / "model", corpus=CORPUS))["job_id"]
            wait_state(alice, chat, {"running"})
            wait_state(alice, train, {"running"})
            before = alice.generate("chat", [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
            join_head(root)
            pids = gangs()
            assert len(pids[chat]) == 2 and len(pids[train]) == 1
            step_before = alice.get(train)["step"]
        os.kill(proc.pid, signal.SIGKILL)  # the only replica, no clean-up at all
        proc.wait()
        assert find_head(root / "state") == head  # the head is no child of the server: it runs on
        assert gangs() == pids  # and so do the controllers and their workers
        proc, info = serve(root)
        serving_at = time.monotonic()
        with Client(info["address"], token=TOKEN) as alice:
            after = alice.generate("chat", [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
            first_answer_s = time.monotonic() - serving_at
            assert after == before  # greedy: the same tokens from the same, never reloaded, gang
            assert first_answer_s < 10.0, first_answer_s  # the bound, from SERVING to the answer
            assert find_head(root / "state") == head  # joined, not started again
            assert gangs() == pids
            eventually(lambda: alice.get(train)["step"] > step_before, lambda: alice.get(train), 60)  # goes on
            for job_id in (chat, train):
                states = states_so_far(alice, job_id)
                assert states.count("placed") == 1 and "queued" not in states[2:], states  # adopted, not requeued
            print(f"restart: first Generate {first_answer_s:.2f} s after SERVING")
    finally:
        ray.shutdown()  # leave the head before it ends
        stop_server(proc)


def test_stop_checkpoints_and_ends_the_head_and_its_jobs_and_a_later_serve_resumes_them(root):
    proc, info = serve(root)
    try:
        with Client(info["address"], token=TOKEN) as alice:
            chat = alice.submit(deployment(root, "chat", tp=1))["job_id"]
            train = alice.submit(TRAIN.format(model=root / "model", corpus=CORPUS))["job_id"]
            wait_state(alice, chat, {"running"})
            wait_state(alice, train, {"running"})
            before = alice.generate("chat", [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
            eventually(lambda: alice.get(train)["step"] >= 2, lambda: alice.get(train), 120)
        tree = join_head(root)
        workers = gangs()[chat] + gangs()[train]
        refused = run_cli("stop", "--state-dir", str(root / "state"))
        assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr  # a server still uses it
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        stop_server(proc, keep_head=True)  # a clean stop leaves the jobs running too
        assert sorted(sum(gangs().values(), [])) == sorted(workers)
        head = find_head(root / "state")
        ray.shutdown()
        done = run_cli("stop", "--state-dir", str(root / "state"), "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["ray_head"]["pid"] == head.pid and sorted(result["checkpointed_jobs"]) == sorted([chat, train])
        left = [pid for pid in tree + workers if running(pid)]
        assert not left, [psutil.Process(pid).cmdline()[:2] for pid in left]  # the head's processes all ended
        assert find_head(root / "state") is None and embedded_server(root / "state") is None
        again = run_cli("stop", "--state-dir", str(root / "state"), "--json")
        assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1]) == {
            "state_dir": str(root / "state"), "ray_head": None, "redis_pid": None, "checkpointed_jobs": []
        }, again.stdout
        assert "nothing to stop" in run_cli("stop", "--state-dir", str(root / "state")).stdout
        proc, info = serve(root)  # a new head; the job records say the deployment ran: it is requeued
        assert find_head(root / "state").pid != head.pid
        with Client(info["address"], token=TOKEN) as alice:
            wait_state(alice, chat, {"running"})
            states = states_so_far(alice, chat)
            assert "preempted" in states[2:], states  # stopped by `stop`, back in the queue, started again
            assert alice.generate("chat", [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"] == before
            wait_state(alice, train, {"running"})
            events = events_so_far(alice, train)
            last = max(i for i, e in enumerate(events) if e["state"] == "preempted")  # `stop`'s checkpoint
            stopped_at, step = events[last], int(events[last]["metrics"]["step"])
            assert step >= 2 and f"at step {step}" in stopped_at["message"], events
            checkpoint = stopped_at["message"].split("checkpoint ")[1].split(" at step")[0]
            resumed = next(e for e in events[last:] if e["message"].startswith("running"))  # started again
            assert resumed["message"] == f"running; resumed from checkpoint {checkpoint} at step {step}", events
    finally:
        ray.shutdown()
        stop_server(proc)


def lease_holder_pid(state: Path) -> int | None:
    """The pid in the scheduler lease's owner (`host:pid:nonce`), read from the embedded Redis."""
    import redis

    registry = json.loads((state / "redis" / f"{EMBEDDED_DB_NAME}.settings").read_text())
    direct = redis.Redis(unix_socket_path=registry["unixsocket"], decode_responses=True, socket_timeout=5)
    try:
        owner = direct.get("shardwright:lease")
    finally:
        direct.close()
    return int(owner.split(":")[-2]) if owner else None


def first_answer(client: Client, name: str) -> list[int]:
    """Greedy tokens of deployment `name` through a standby replica, which learns a deployment from the
    job events it follows, a moment after the job became running."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.generate(name, [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
        except ShardwrightError as err:
            if err.code != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_standby_takes_over_from_a_killed_leader_while_clients_stream_through_it(root):
    first, _ = serve(root)
    second = None
    try:
        assert lease_holder_pid(root / "state") == first.pid
        second, info = serve(root)  # joins the head and stands by
        assert lease_holder_pid(root / "state") == first.pid
        with Client(info["address"], token=TOKEN) as alice:
            wide = alice.submit(deployment(root, "wide", tp=2))["job_id"]
            narrow = alice.submit(deployment(root, "narrow", tp=1))["job_id"]
            train = alice.submit(TRAIN.format(model=root / "model", corpus=CORPUS))["job_id"]
            for job_id in (wide, narrow, train):
                wait_state(alice, job_id, {"running"})
            expected = {name: first_answer(alice, name) for name in ("wide", "narrow")}
            join_head(root)
            pids = gangs()
            assert sorted(len(p) for p in pids.values()) == [1, 1, 2]
            steps = [alice.get(train)["step"]]
            done, results = threading.Event(), []

            def stream(name: str) -> None:  # through the replica that survives
                with Client(info["address"], token=TOKEN) as client:
                    while not done.is_set():
                        try:
                            msgs = list(client.generate_stream(name, [1, 2, 3], max_tokens=8, ignore_eos=True))
                            results.append((name, [m["token_id"] for m in msgs if m["token_id"] >= 0]))
                        except Exception as err:  # a failed request
                            results.append((name, err))

            clients = [threading.Thread(target=stream, args=(name,), daemon=True) for name in ("wide", "narrow")]
            for t in clients:
                t.start()
            os.kill(first.pid, signal.SIGKILL)  # the lease holder
            killed_at = time.monotonic()
            first.wait()
            eventually(lambda: lease_holder_pid(root / "state") == second.pid, "the standby took the lease over",
                       60, interval_s=0.1)
            takeover_s = time.monotonic() - killed_at
            # The lease expires lease_ttl_s after the holder's last renewal; the standby tries once per
            # heartbeat pass (lease_ttl_s / 3); plus 1 s for this loop's reads on a loaded machine.
            assert takeover_s <= LEASE_TTL_S + LEASE_TTL_S / 3 + 1.0, takeover_s
            served = len(results)
            deadline = time.monotonic() + 120
            while len(results) < served + 4 or alice.get(train)["step"] <= steps[0]:  # streams and steps go on
                steps.append(alice.get(train)["step"])
                assert time.monotonic() < deadline, (len(results), steps)
                time.sleep(0.5)
            steps.append(alice.get(train)["step"])
            after = {name: alice.generate(name, [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
                     for name in ("wide", "narrow")}
            done.set()
            for t in clients:
                t.join(timeout=60)
            failures = [r for r in results if r[1] != expected[r[0]]]
            assert results and not failures, failures[:3]  # 0 failed or different generations
            assert after == expected  # greedy tokens after the kill equal those before
            assert steps == sorted(steps) and steps[-1] > steps[0], steps  # the step never goes back
            assert gangs() == pids  # the same workers: nothing reloaded, nothing restored
            for job_id in (wide, narrow, train):
                states = states_so_far(alice, job_id)
                assert states.count("placed") == 1 and "queued" not in states[2:], states
            print(f"takeover: lease held by the standby {takeover_s:.2f} s after the kill; {len(results)} streams")
    finally:
        if second is not None:
            stop_server(second, keep_head=True)
        first.kill()
        first.wait()
        ray.shutdown()
        stop_state_dir(root / "state")
