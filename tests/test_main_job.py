"""The main job as a user runs it: `shardwright run` (the Ray job entrypoint) and `shardwright demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout_s: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardwright.api.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=cwd, env={**os.environ, **(env or {})})


def test_run_train_tiny_json_contract(tmp_path):
    done = run_cli("run", "examples/train_tiny.yaml", "--json", env={"SHARDWRIGHT_STATE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == "succeeded" and result["steps"] == 50
    assert result["last_loss"] < result["first_loss"] - 1.0  # it learns (bytes: ~5.5 -> ~2.7)
    assert (Path(result["checkpoint"]) / "manifest.json").is_file()
    assert "step 50/50" in done.stderr  # the progress line


def test_demo_trains_serves_and_generates_through_grpc(tmp_path):
    """From an empty folder (the corpus is package data), keeping the trained model."""
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    refused = run_cli("demo", "--keep", str(occupied), cwd=tmp_path, timeout_s=60)
    assert refused.returncode == 2 and "--keep" in refused.stderr and "[demo]" not in refused.stdout
    done = run_cli("demo", "--json", "--steps", "30", "--keep", "kept", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == "ok" and result["tokens"] == 48
    assert result["last_loss"] < result["first_loss"]
    assert "[demo] shut down" in done.stdout
    assert result["model_dir"] == str((tmp_path / "kept").resolve()) and (tmp_path / "kept" / "config.json").is_file()
