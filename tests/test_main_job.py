"""The main job as a user runs it: `shardwright run` (the Ray job entrypoint) and `shardwright demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardwright.api.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT, env={**os.environ, **(env or {})})


def test_run_train_tiny_json_contract(tmp_path):
    done = run_cli("run", "examples/train_tiny.yaml", "--json", env={"SHARDWRIGHT_STATE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == "succeeded" and result["steps"] == 50
    assert result["last_loss"] < result["first_loss"] - 1.0  # it learns (bytes: ~5.5 -> ~2.7)
    assert (Path(result["checkpoint"]) / "manifest.json").is_file()
    # Saved at 25 and 50 (once each: 50 is both a multiple of 25 and the end), the last 2 kept.
    root = Path(result["checkpoint"]).parent
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000025", "step-00000050"]
    assert json.loads((root / "latest").read_text()) == {"checkpoint": "step-00000050", "step": 50}
    assert "step 50/50" in done.stderr  # the progress line


def test_demo_trains_serves_and_generates_through_grpc():
    done = run_cli("demo", "--json", "--steps", "30")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == "ok" and result["tokens"] == 48
    assert result["last_loss"] < result["first_loss"]
    assert "[demo] shut down" in done.stdout
