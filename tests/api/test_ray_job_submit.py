"""`ray job submit -- shardwright run examples/train_tiny.yaml` against a real `ray start --head`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    if not RAY.exists() and shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed beside this Python")
    port, dashboard = free_port(), free_port()
    # Ports of its own for every agent: the test session's other Ray cluster holds the defaults
    # (a second head on the default dashboard-agent port never gets a job agent).
    agent_ports = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                    "--metrics-export-port", "--runtime-env-agent-port")
                   for arg in (flag, str(free_port()))]
    temp_dir = tempfile.mkdtemp(prefix="swray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen([str(RAY), "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dashboard), "--num-gpus", "4", "--num-cpus", "4", "--block",
                             "--temp-dir", temp_dir, *agent_ports], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the Ray head's dashboard did not come up within 90 s")
    yield url
    os.killpg(head.pid, signal.SIGKILL)  # the head's whole session: gcs, raylet, dashboard, workers
    head.wait(timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_train_tiny_and_streams_progress(ray_head):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the client reads the head's token from ~/.ray
    # The dashboard answers before the head's job agent has registered; until it has, Ray refuses
    # submissions with "No available agent". Only that retries.
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run([str(RAY), "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
                               "shardwright", "run", "examples/train_tiny.yaml", "--json"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "step 50/50" in done.stdout + done.stderr  # progress streamed into the job's logs
    result = next(json.loads(line) for line in reversed(done.stdout.splitlines()) if line.startswith('{"status"'))
    assert result["status"] == "succeeded" and result["steps"] == 50
    assert result["last_loss"] < result["first_loss"]
