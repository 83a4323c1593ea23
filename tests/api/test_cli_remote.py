"""The client commands as a user runs them (subprocesses) against a real `shardwright serve` on
localhost: one output format for local and remote generate, `--stop`, `--address HOST` without a
port, a connection error that says what to check, and exit status 2 for requests the server
refuses as bad input (1 for work that failed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from shardwright.api.client import Client, with_default_port
from test_server_e2e import serving_chat

ALICE = "alice-token-123"
CORE_KEYS = {"tokens", "text", "prompt_tokens", "finish_reason", "elapsed_s"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server address, model directory) with deployment 'chat' running for alice."""
    with serving_chat(tmp_path_factory.mktemp("cli-remote")) as (_, info, model, _):
        yield info["address"], model


def run_cli(*args: str, token: str | None = ALICE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SHARDWRIGHT_TOKEN", "SHARDWRIGHT_ADDRESS")}
    if token:
        env["SHARDWRIGHT_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "shardwright.api.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_remote_generate_prints_as_local_generate_does(served):
    address, model = served
    prompt = ["--prompt-ids", "1,2,3", "--max-tokens", "8"]
    remote = run_cli("generate", "--deployment", "chat", "--address", address, *prompt, "--json")
    local = run_cli("generate", "--model", str(model), *prompt, "--json")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    remote_out, local_out = json.loads(remote.stdout.splitlines()[-1]), json.loads(local.stdout.splitlines()[-1])
    assert CORE_KEYS <= set(remote_out) and CORE_KEYS <= set(local_out)
    assert {k: remote_out[k] for k in ("tokens", "text", "prompt_tokens", "finish_reason")} == \
        {k: local_out[k] for k in ("tokens", "text", "prompt_tokens", "finish_reason")}
    assert remote_out["prompt_tokens"] == 3 and len(remote_out["tokens"]) == 8
    human = run_cli("generate", "--deployment", "chat", "--address", address, *prompt)
    assert human.returncode == 0 and human.stdout == remote_out["text"] + "\n"
    assert human.stderr.strip().startswith("(8 tokens, finish ")  # the stats line goes to stderr


def test_stop_cuts_the_text_before_the_stop_string(served):
    address, _ = served
    base = ["generate", "--deployment", "chat", "--address", address, "--prompt-ids", "1,2,3", "--max-tokens",
            "12", "--json"]
    full = json.loads(run_cli(*base).stdout.splitlines()[-1])["text"]
    stop = full[len(full) // 2]
    cut = run_cli(*base, "--stop", stop)
    assert cut.returncode == 0, cut.stderr
    out = json.loads(cut.stdout.splitlines()[-1])
    assert out["text"] == full[:full.index(stop)] and out["finish_reason"] == "stop"


def test_bad_requests_exit_2_and_failures_exit_1(served, tmp_path):
    address, _ = served
    missing = run_cli("status", "job-does-not-exist", "--address", address)
    assert missing.returncode == 2 and missing.stderr.startswith("shardwright status: NOT_FOUND")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: inference\nname: x\nmodel: /nowhere\nlayout: {tp: 0}\n")
    refused = run_cli("submit", str(bad), "--address", address)
    assert refused.returncode == 2 and "INVALID_ARGUMENT" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    denied = run_cli("status", "--address", address, token="wrong-token-000")
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_address_without_a_port_means_50051_and_nothing_listening_says_what_to_check():
    assert with_default_port("localhost") == "localhost:50051"
    assert with_default_port("10.0.0.2:7000") == "10.0.0.2:7000"
    assert with_default_port("[::1]") == "[::1]:50051" and with_default_port("::1") == "[::1]:50051"
    assert with_default_port("unix:/tmp/sock") == "unix:/tmp/sock"
    port = _free_port()  # bound and released: nothing listens there
    done = run_cli("health", "--address", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert "shardwright serve" in done.stderr and "SHARDWRIGHT_ADDRESS" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_deployments_by_name_watch_until_ready_and_cancel(served, tmp_path):
    address, model = served
    job_file = tmp_path / "second.yaml"
    job_file.write_text(f"kind: inference\nname: second\nmodel: {model}\nengine: {{num_blocks: 16, block_size: 8}}\n")
    submitted = run_cli("submit", str(job_file), "--address", address, "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout.splitlines()[-1])["job_id"]
    watched = run_cli("watch", "second", "--until", "ready", "--address", address)  # by name; returns when serving
    assert watched.returncode == 0, watched.stderr
    assert " ready " in watched.stdout.splitlines()[-1] + " "
    listed = run_cli("deployments", "--address", address, "--json")
    rows = {r["name"]: r for r in json.loads(listed.stdout.splitlines()[-1])["deployments"]}
    assert {"chat", "second"} <= set(rows) and rows["second"]["job_id"] == job_id
    assert rows["second"]["state"] == "ready" and rows["second"]["layout"] == {"tp": 1, "pp": 1, "cp": 1, "ep": 1}
    status = run_cli("status", "second", "--address", address)
    assert status.returncode == 0 and job_id in status.stdout and "step=" not in status.stdout
    assert run_cli("cancel", "second", "--address", address).returncode == 0
    final = run_cli("watch", job_id, "--address", address, "--json")  # by id; returns once it ended
    assert json.loads(final.stdout.splitlines()[-1])["last_event"]["state"] == "cancelled"
    gone = run_cli("deployments", "--address", address, "--json")
    assert "second" not in {r["name"] for r in json.loads(gone.stdout.splitlines()[-1])["deployments"]}


def test_logs_prints_a_jobs_events_and_returns(served):
    address, _ = served
    done = run_cli("logs", "chat", "--address", address, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    with Client(address, token=ALICE) as alice:
        job = alice.get(out["job_id"])
    assert [e["sequence"] for e in out["events"]] == list(range(job["num_events"]))
    assert "running" in [e["state"] for e in out["events"]]
    human = run_cli("logs", "chat", "--address", address)
    assert human.returncode == 0 and len(human.stdout.splitlines()) == job["num_events"]
    assert " ready " in human.stdout
