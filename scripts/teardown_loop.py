"""Launch each training layout's ranks again and again, as `bench train` does, and count how they end.

Issue 21: a rank of `shardwright bench train` now and then died at exit with "terminate called
without an active exception" (SIGABRT). This is the reproduction loop: for each layout (tp2, pp2,
dp2, cp2, and dp2 with half the optimizer state offloaded to host memory) it starts the ranks with
`run_ranks` exactly as `bench train` does (the same rank function `benchmarks.train.rank_main`, the
same model, the same thread settings: run_ranks' default of the machine's cores split among the
ranks), trains a few steps, lets them tear down, and classifies each launch:

- ok: every rank exited 0 and returned its result;
- abort: a rank died of SIGABRT, or a rank's stderr says "terminate called";
- failed: any other non-zero exit, signal or exception.
A launch that did not end ok keeps its error and the last lines of the ranks' stderr in the JSON.

Run from a checkout (the code under test is whatever PYTHONPATH imports, so the same script runs
against an older tree: `PYTHONPATH=/path/to/old/tree python scripts/teardown_loop.py`):

    PYTHONPATH=$PWD python scripts/teardown_loop.py --runs 50 [--layouts tp2,dp2] [--warmup 1 --steps 1] [--json]

Layouts are taken in turns (run 1 of each layout, then run 2 of each, ...) so that the machine's
load falls on all of them alike; per layout the runs are consecutive launches of it. A progress line
per launch goes to stderr (with the 1-minute load); a table and, last, one JSON line to stdout.
Exit status 1 if any launch did not end ok.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {  # name -> (ParallelLayout fields, share of the optimizer state offloaded)
    "tp2": (dict(tp=2), 0.0),
    "pp2": (dict(pp=2), 0.0),
    "dp2": (dict(dp=2), 0.0),
    "cp2": (dict(cp=2), 0.0),
    "offload": (dict(dp=2), 0.5),
}
ABORT_TEXT = "terminate called"
TAIL_LINES = 30  # of the ranks' stderr, kept for a launch that did not end ok


def launch(name: str, warmup: int, steps: int, directory: Path) -> tuple[str, str]:
    """One launch of `name`'s ranks: (outcome, detail). The ranks' stderr (fd 2, which spawned
    children inherit) goes to a file for the launch, read back to find the abort's message."""
    import torch.multiprocessing as mp

    from benchmarks.train import rank_main
    from shardwright.config import ParallelLayout
    from shardwright.parallel.launch import run_ranks

    fields, offload = LAYOUTS[name]
    layout = ParallelLayout(**fields)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            run_ranks(rank_main, layout.world_size, args=(layout, str(directory), warmup, steps, offload))
            error = None
        except mp.ProcessExitedException as exc:
            error = exc
        except Exception as exc:  # a rank raised, or the results were not written
            error = exc
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    return classify(error, text)


def classify(error: BaseException | None, text: str) -> tuple[str, str]:
    """(ok | abort | failed, detail) from the exception run_ranks raised and the ranks' stderr;
    the detail of a launch that did not end ok ends with the last lines the ranks wrote to stderr."""
    signal_name = getattr(error, "signal_name", None)
    tail = " | ".join(ln.strip() for ln in text.strip().splitlines()[-TAIL_LINES:])
    if ABORT_TEXT in text or signal_name == signal.Signals.SIGABRT.name:
        line = next((ln for ln in text.splitlines() if ABORT_TEXT in ln), str(error))
        return "abort", f"{line.strip()[:300]}; stderr: {tail}"
    if error is not None:
        return "failed", f"{type(error).__name__}: {error}".replace("\n", " | ")[:300] + f"; stderr: {tail}"
    return "ok", ""


def load() -> float:
    return os.getloadavg()[0]


def loop(names: list[str], runs: int, warmup: int, steps: int) -> dict:
    from benchmarks.train import model_dir

    directory = model_dir()
    counts = {name: {"ok": 0, "abort": 0, "failed": 0, "errors": []} for name in names}
    loads = []
    start = time.perf_counter()
    for run in range(1, runs + 1):
        for name in names:
            began = time.perf_counter()
            outcome, detail = launch(name, warmup, steps, directory)
            counts[name][outcome] += 1
            if detail:
                counts[name]["errors"].append(f"run {run}: {detail}")
            loads.append(load())
            print(f"[teardown {name}] run {run}/{runs}: {outcome} in {time.perf_counter() - began:.1f} s"
                  f" (load {loads[-1]:.1f}){': ' + detail if detail else ''}", file=sys.stderr, flush=True)
    return {"runs_per_layout": runs, "warmup": warmup, "steps": steps, "layouts": counts,
            "load_min": min(loads), "load_max": max(loads), "load_mean": sum(loads) / len(loads),
            "elapsed_s": time.perf_counter() - start, "cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="launches per layout")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--warmup", type=int, default=1, help="training steps before the measured ones")
    parser.add_argument("--steps", type=int, default=1, help="measured training steps per launch")
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    args = parser.parse_args(argv)
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or args.runs < 1:
        parser.error(f"unknown layouts {unknown} (choose from {', '.join(LAYOUTS)})" if unknown else "--runs must be >= 1")
    report = loop(names, args.runs, args.warmup, args.steps)
    if not args.json:
        print(f"{'layout':8} {'ok':>4} {'abort':>6} {'failed':>7}")
        for name, c in report["layouts"].items():
            print(f"{name:8} {c['ok']:>4} {c['abort']:>6} {c['failed']:>7}")
        print(f"load {report['load_min']:.1f}-{report['load_max']:.1f} (mean {report['load_mean']:.1f}),"
              f" {report['elapsed_s']:.0f} s")
    print(json.dumps(report))
    bad = sum(c["abort"] + c["failed"] for c in report["layouts"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
