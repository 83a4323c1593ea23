"""`shardwright bench` as a user runs it: a progress line per point on stderr, and a failing point that
is reported (layout and error) without losing the points already measured, exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scheduler import PHILLY  # noqa: E402


def run_bench(name: str, *, fail_point: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SHARDWRIGHT_BENCH_FAIL_POINT", None)
    if fail_point is not None:
        env["SHARDWRIGHT_BENCH_FAIL_POINT"] = fail_point
    return subprocess.run([sys.executable, "-m", "shardwright.api.cli", "bench", name, "--quick", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.skipif(not PHILLY.is_file(), reason=f"Philly trace not found at {PHILLY} (shared/traces)")
def test_a_failing_point_is_reported_and_the_other_points_survive():
    # The scheduler bench: 5 policies simulated on one Philly week, then 5 x 2 pass timings = 15
    # points; the injected failure hits the priority policy's 3 points (the simulation, 2 passes).
    done = run_bench("scheduler", fail_point="policy=priority")
    assert done.returncode == 1, done.stderr[-3000:]
    progress = [line for line in done.stderr.splitlines() if line.startswith("[bench scheduler] point ")]
    assert len(progress) == 15, done.stderr[-3000:]
    failed_lines = [line for line in progress if ": FAILED in " in line]
    assert len(failed_lines) == 3 and all("policy=priority" in line and "InjectedFailure" in line
                                          for line in failed_lines), failed_lines
    assert progress[0].startswith("[bench scheduler] point 1: slice=days 20-27") and ": ok in " in progress[0]

    report = json.loads(done.stdout.splitlines()[-1])  # the JSON line stays last on stdout
    assert [(f.get("slice") or f.get("pass"), f["policy"]) for f in report["failed"]] == [
        ("days 20-27 (5729 jobs)", "priority"), ("busy", "priority"), ("draining", "priority")]
    assert all("SHARDWRIGHT_BENCH_FAIL_POINT" in f["error"] for f in report["failed"])
    simulated = {r["policy"]: r for r in report["results"] if r["slice"].startswith("days")}
    assert set(simulated) == {"fifo", "fairshare", "backfill", "las"}  # measured before and after the failure
    assert simulated["fifo"]["jct_vs_fifo"] == 1.0 and simulated["las"]["avg_jct_s"] > 0
    passes = {r["policy"]: r for r in report["results"] if r["slice"].startswith("one pass")}
    assert "pass_busy_ms" not in passes["priority"] and passes["las"]["pass_draining_ms"] > 0
    assert "FAILED: InjectedFailure" in done.stdout  # the human summary names it too


def test_a_malformed_fail_point_is_a_one_line_error():
    done = run_bench("scheduler", fail_point="policy")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "shardwright bench: SHARDWRIGHT_BENCH_FAIL_POINT='policy': expected key=value[,key=value...]")
