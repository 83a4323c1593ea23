"""The `shardwright` command line as a user runs it: subprocesses, exit codes, JSON last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.parallel.context import ParallelContext


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardwright.api.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "tiny"
    done = run_cli("init-model", str(directory), "--preset", "tiny-llama", "--seed", "3", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["parameters"] > 500_000
    return directory


def test_generate_tp2_cp2_json_equals_the_reference(tiny_model):
    # Starts its own local Ray cluster (a fresh process), as a user's first command would.
    done = run_cli("generate", "--model", str(tiny_model), "--tp", "2", "--cp", "2", "--prompt", "Hello",
                   "--max-tokens", "12", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    _, model = load_model(tiny_model, ParallelContext.single("cpu"))
    assert result["tokens"] == greedy_generate(model, list(b"Hello"), 12)
    assert result["text"] == bytes(result["tokens"]).decode("utf-8", errors="replace")


@pytest.mark.parametrize("args, message", [
    (["--tp", "3", "--prompt", "x"], "tp=3 does not divide num_heads=4"),
    (["--cp", "0", "--prompt", "x"], "cp"),
    (["--temperature", "-1", "--prompt", "x"], "temperature"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,999"], "outside the vocabulary"),
    (["--max-tokens", "0", "--prompt", "x"], "max_tokens=0 must be >= 1"),
    (["--memory-budget", "lots", "--prompt", "x"], "--memory-budget 'lots': give bytes"),
    (["--pool-peers", "1", "--prompt", "x"], "need budget_bytes"),
])
def test_generate_errors_are_one_actionable_line(tiny_model, args, message):
    done = run_cli("generate", "--model", str(tiny_model), *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_missing_model_directory(tmp_path):
    done = run_cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert done.returncode == 2 and "init-model" in done.stderr


def test_init_model_refuses_to_overwrite(tiny_model):
    done = run_cli("init-model", str(tiny_model))
    assert done.returncode == 2 and "--force" in done.stderr


def test_bench_api_reports_grpc_beside_in_process_figures():
    """`shardwright bench api`: gRPC and HTTP streamed-generation overhead and Redis-persisted
    submissions per second, each beside the same calls in-process (the baseline), as the last line
    of JSON."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "shardwright.api.cli", "bench", "api", "--quick", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["benchmark"] == "api" and report["quick"] is True
    rows = {(r["path"], r["what"]): r for r in report["results"]}
    streams = {(f"generate_stream {path}", what) for path in ("grpc", "http")
               for what in ("time to first token", "16 tokens")}
    assert set(rows) == streams | {("submit", "jobs per second (Redis-persisted)")}
    for row in rows.values():
        assert row["value"] > 0 and row["baseline"] > 0
        assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
    for path in ("grpc", "http"):  # a 16-token stream takes longer than its first token (the figures are real)
        total = rows[(f"generate_stream {path}", "16 tokens")]
        first = rows[(f"generate_stream {path}", "time to first token")]
        assert total["value"] > first["value"] and total["baseline"] > first["baseline"]


def test_generate_with_a_memory_budget_too_small_is_refused_naming_the_missing_bytes(tiny_model):
    # A 1 MB budget cannot hold even the embeddings, KV cache and activations: refused at
    # admission, before any weight is loaded, with the bytes missing and where.
    done = run_cli("generate", "--model", str(tiny_model), "--memory-budget", "1MB", "--pool-peers", "1",
                   "--prompt", "Hello")
    assert done.returncode == 2, done.stderr
    assert "cannot fit its budget of 976.6 KiB" in done.stderr and "missing on node" in done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("shardwright generate:")]
    assert len(ours) == 1 and "raise the budget" in ours[0], done.stderr  # one line (Ray may log its own)
