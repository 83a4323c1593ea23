"""End to end: `shardwright serve` as a subprocess on a free port, driven through the client.

Real parts only: the server starts its own local Ray head (a process of its own, which
`stop_server` ends) and embedded Redis (in a temporary state directory); deployments run
InferenceEngines on Ray workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from waiting import eventually
from model_helpers import tiny_spec
from shardwright.api.client import Client, ShardwrightError
from shardwright.models.random_init import write_random_checkpoint

TOKENS = {"alice-token-123": "alice", "bob-token-4567": "bob"}
CORPUS = Path(__file__).resolve().parents[2] / "examples" / "corpus"
TRAIN_JOB = """kind: training
name: tiny-train
model: {{preset: tiny-llama, seed: 0}}
layout: {{tp: 1}}
train:
  data: {{path: {corpus}, seq_len: 32, global_batch_size: 4}}
  steps: 6
  num_micro_batches: 1
"""


def start_server(state_dir: Path, tokens_file: Path) -> tuple[subprocess.Popen, str]:
    proc, info = start_server_info(state_dir, tokens_file)
    return proc, info["address"]


def start_server_info(state_dir: Path, tokens_file: Path, *args: str, stderr=subprocess.DEVNULL
                      ) -> tuple[subprocess.Popen, dict]:
    """`serve --port 0 ARGS...` as a subprocess, and the JSON line it prints once serving
    (`stderr`: where its log goes, by default nowhere)."""
    env = {**os.environ, "SHARDWRIGHT_STATE_DIR": str(state_dir), "SHARDWRIGHT_TOKENS_FILE": str(tokens_file)}
    env.pop("SHARDWRIGHT_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "shardwright.api.cli", "serve", "--port", "0", "--grace-s", "5", *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    proc.state_dir = Path(state_dir)  # for stop_server: the local Ray head serve starts there outlives it
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("{"):
                return proc, json.loads(line)
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
        proc.kill()
        raise TimeoutError("server did not report its address within 120 s")
    except Exception:
        proc.wait()
        stop_state_dir(state_dir)  # a head it started before failing (none if it joined one by address)
        raise


@contextlib.contextmanager
def serving_chat(root: Path, *serve_args: str, max_positions: int = 512, num_blocks: int = 64, stderr=subprocess.DEVNULL,
                 prepare=None):
    """`serve --port 0 SERVE_ARGS...` in `root` with TOKENS, and deployment 'chat' of alice running a
    tiny random Llama (`prepare(model_dir)` runs before the server starts). Yields (a Client as
    alice, the server's info line, the model directory, the deployment's job id); stops the server."""
    model = write_random_checkpoint(root / "model", tiny_spec("llama", max_position_embeddings=max_positions),
                                    seed=5, std=0.2)
    if prepare is not None:
        prepare(model)
    tokens_file = root / "tokens.yaml"
    tokens_file.write_text("\n".join(f"{t}: {n}" for t, n in TOKENS.items()))
    proc, info = start_server_info(root / "state", tokens_file, *serve_args, stderr=stderr)
    try:
        with Client(info["address"], token="alice-token-123") as alice:
            job = alice.submit(f"kind: inference\nname: chat\nmodel: {model}\nlayout: {{tp: 1}}\n"
                               f"engine: {{num_blocks: {num_blocks}, block_size: 8}}\n")
            wait_state(alice, job["job_id"], {"running"})
            yield alice, info, model, job["job_id"]
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen, *, keep_head: bool = False) -> None:
    """SIGTERM the server and wait for it; unless `keep_head`, then end the local Ray head it started
    (or joined) in its state dir, its jobs with it, and the embedded Redis if no one else uses it."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not keep_head:
        stop_state_dir(proc.state_dir)


def stop_state_dir(state_dir: Path) -> None:
    """What `shardwright stop` ends, once no server uses the state dir: the local Ray head and a
    leftover embedded Redis (a no-op for a server that joined a Ray cluster by address)."""
    from shardwright.cluster.local_head import stop_head
    from shardwright.cluster.redis_server import embedded_server, stop_embedded

    stop_head(state_dir)
    running = embedded_server(state_dir)
    if running is not None and running[1] == 0:
        stop_embedded(state_dir)


def wait_state(client: Client, job_id: str, states: set[str], timeout_s: float = 120) -> dict:
    return eventually(lambda: (job := client.get(job_id))["state"] in states and job,
                      lambda: f"{job_id} stayed {client.get(job_id)['state']}, wanted {states}", timeout_s, 0.5)


@pytest.fixture(scope="module")
def deployment_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    model = write_random_checkpoint(root / "model", tiny_spec("llama", max_position_embeddings=512), seed=5, std=0.2)
    spec = root / "chat.yaml"
    spec.write_text(f"kind: inference\nname: chat\nmodel: {model}\nlayout: {{tp: 2}}\n"
                    "engine: {num_blocks: 64, block_size: 8}\n")
    return spec


def test_serve_submit_stream_watch_cancel_auth_and_restart(tmp_path, deployment_file):
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text("\n".join(f"{t}: {n}" for t, n in TOKENS.items()))
    proc, address = start_server(tmp_path / "state", tokens_file)
    try:
        with Client(address, token="alice-token-123") as alice:
            assert alice.health() == "SERVING"
            job = alice.submit(deployment_file.read_text(), idempotency_key="chat-1")
            assert alice.submit(deployment_file.read_text(), idempotency_key="chat-1")["job_id"] == job["job_id"]
            wait_state(alice, job["job_id"], {"running"})
            messages = list(alice.generate_stream("chat", [1, 2, 3], max_tokens=12, ignore_eos=True))
            tokens = [m["token_id"] for m in messages if m["token_id"] >= 0]
            assert len(tokens) == 12 and messages[-1]["finish_reason"] == "length"
            unary = alice.generate("chat", [1, 2, 3], max_tokens=12, ignore_eos=True)
            assert unary["token_ids"] == tokens
            _check_errors(alice, address, job["job_id"])
            training = alice.submit(TRAIN_JOB.format(corpus=CORPUS))
            events = list(alice.watch(training["job_id"], timeout_s=300))
            assert events[-1]["state"] == "succeeded", events[-1]
            assert [e["sequence"] for e in events] == list(range(len(events)))  # complete, in order
            assert alice.get(training["job_id"])["step"] == 6
            cluster = alice.cluster()
            assert sum(n["gpus_total"] for n in cluster["nodes"]) >= 2
            assert any(g["job_id"] == job["job_id"] for g in cluster["gangs"])
        stop_server(proc, keep_head=True)  # the jobs outlive the server on its Ray head
        proc, address = start_server(tmp_path / "state", tokens_file)
        with Client(address, token="alice-token-123") as alice:
            jobs, _ = alice.list()
            assert sorted(j["job_id"] for j in jobs) == sorted([job["job_id"], training["job_id"]])  # kept, once
            assert alice.get(training["job_id"])["state"] == "succeeded"
            wait_state(alice, job["job_id"], {"running"})
            assert len(alice.generate("chat", [4, 5], max_tokens=4, ignore_eos=True)["token_ids"]) == 4
            cancelled = alice.cancel(job["job_id"])
            wait_state(alice, job["job_id"], {"cancelled"})
            states = [e["state"] for e in alice.watch(job["job_id"], timeout_s=30)]
            assert states[0] == "submitted" and states[-1] == "cancelled" and "running" in states
            assert cancelled["job_id"] == job["job_id"]
    finally:
        stop_server(proc)


def _check_errors(alice: Client, address: str, job_id: str) -> None:
    with Client(address) as anonymous:
        with pytest.raises(ShardwrightError) as err:
            anonymous.list()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health() == "SERVING"  # health needs no token
    with Client(address, token="wrong-token-000") as wrong:
        with pytest.raises(ShardwrightError) as err:
            wrong.get(job_id)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(address, token="bob-token-4567") as bob:
        for call in (lambda: bob.get(job_id), lambda: bob.cancel(job_id),
                     lambda: bob.generate("chat", [1], max_tokens=2)):
            with pytest.raises(ShardwrightError) as err:
                call()
            assert err.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
        assert bob.list()[0] == []
    for bad, params in (([1] * 600, {"max_tokens": 4}), ([1, 2], {"max_tokens": 10**9}),
                        ([1, 2], {"temperature": -1.0})):
        with pytest.raises(ShardwrightError) as err:
            alice.generate("chat", bad, **params)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value
    with pytest.raises(ShardwrightError) as err:
        alice.submit("kind: inference\nname: x\nmodel: /nope\nbogus: 1\n")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "bogus" in str(err.value)
