"""The main job as a user runs it: `shardwright run` (the Ray job entrypoint) and `shardwright demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

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
    # Saved at 25 and 50 (once each: 50 is both a multiple of 25 and the end), the last 2 kept.
    root = Path(result["checkpoint"]).parent
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000025", "step-00000050"]
    assert json.loads((root / "latest").read_text()) == {"checkpoint": "step-00000050", "step": 50}
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


def test_export_turns_a_run_into_a_servable_model_folder(tmp_path):
    from safetensors.torch import load_file

    from shardwright.models import load_model
    from shardwright.parallel.context import ParallelContext
    from shardwright.training.checkpoint import read_manifest
    from shardwright.training.reshard import gather_hf

    job = f"""kind: training
name: export-me
model: {{preset: tiny-llama, seed: 0}}
layout: {{tp: 2}}
train:
  data: {{path: {ROOT / 'examples' / 'corpus'}, seq_len: 32, global_batch_size: 4}}
  steps: 4
  num_micro_batches: 1
  checkpoint_every_steps: 2
"""
    (tmp_path / "job.yaml").write_text(job)
    ran = run_cli("run", str(tmp_path / "job.yaml"), "--json", env={"SHARDWRIGHT_STATE_DIR": str(tmp_path / "state")})
    assert ran.returncode == 0, ran.stderr[-2000:]
    checkpoint = Path(json.loads(ran.stdout.splitlines()[-1])["checkpoint"])
    done = run_cli("export", str(checkpoint.parent), str(tmp_path / "hf"), "--json")  # the run's folder: newest
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["step"] == 4 and {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(result["files"])
    expected = gather_hf(checkpoint, read_manifest(checkpoint))  # the tp=2 shards gathered, in HF names
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    load_model(tmp_path / "hf", ParallelContext.single())  # loads as a model
    again = run_cli("export", str(checkpoint), str(tmp_path / "hf"))
    assert again.returncode == 2 and "--force" in again.stderr
    empty = run_cli("export", str(tmp_path / "state"), str(tmp_path / "out"))
    assert empty.returncode == 2 and "no complete checkpoint" in empty.stderr
