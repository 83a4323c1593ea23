"""Shared benchmark runner: a progress line per measured point (stderr), a human table, then one
JSON line (the last line printed on stdout).

A benchmark's `run(quick, **options)` (options: the flags `main` passes on, e.g. `mixed`) measures
each point through `measure_point(point, fn, *args)`: it prints `[bench NAME] point K: tp=2 pp=1
...: ok in 12.3 s` (or `FAILED in ...: error`) to stderr as it goes, and a point that raises is
recorded (its description and the error) instead of ending the run, so the points already measured
are still reported. A point may measure points inside it (bench decode's vLLM runs inside a layout's
point): each has its own number and line, and an inner one that fails leaves the outer one standing.
The JSON lists the failed points under "failed" and the 1-minute load average at the start and end
of the run under "load_1min"; the exit status is 1 if any failed.

Fault injection (to check the above on the real code path): SHARDWRIGHT_BENCH_FAIL_POINT="tp=2,pp=1"
makes every point whose description has all those key=value pairs raise before it runs.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

NAMES = ("decode", "step", "scheduler", "attention", "train", "pool", "api", "quant", "prefix", "speculative", "moe",
         "moe_pool", "families")
FAIL_POINT_ENV = "SHARDWRIGHT_BENCH_FAIL_POINT"


class InjectedFailure(RuntimeError):
    """Raised in place of a point named by SHARDWRIGHT_BENCH_FAIL_POINT."""


class Progress:
    """The points of one benchmark run: how many ran, which failed, where progress goes."""

    def __init__(self, name: str, fail_point: str | None = None, out: TextIO | None = None) -> None:
        self.name, self.out = name, out
        self.fail_point = _parse_point(fail_point) if fail_point else None
        self.count = 0
        self.failed: list[dict[str, Any]] = []

    def measure(self, point: dict[str, Any], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), or None (recorded in `failed`) if it raised."""
        self.count += 1
        index, label = self.count, describe(point)  # its own number, though points may nest
        start = time.perf_counter()
        try:
            if self.fail_point is not None and self.fail_point.items() <= _as_str(point).items():
                raise InjectedFailure(f"failure injected by {FAIL_POINT_ENV}={describe(self.fail_point)}")
            got = fn(*args, **kwargs)
        except Exception as exc:  # a failed point is reported, the run goes on
            error = f"{type(exc).__name__}: {exc}".strip().replace("\n", " | ")[:2000]
            self.failed.append({**point, "error": error})
            self.say(f"point {index}: {label}: FAILED in {time.perf_counter() - start:.1f} s: {error}")
            return None
        self.say(f"point {index}: {label}: ok in {time.perf_counter() - start:.1f} s")
        return got

    def say(self, line: str) -> None:
        print(f"[bench {self.name}] {line}", file=self.out or sys.stderr, flush=True)


_current: Progress | None = None


def measure_point(point: dict[str, Any], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Measure one point of the running benchmark (see the module doc); None if it failed."""
    global _current
    if _current is None:  # run() called outside main(): progress still shows
        _current = Progress("?", os.environ.get(FAIL_POINT_ENV))
    return _current.measure(point, fn, *args, **kwargs)


def say(line: str) -> None:
    """A progress line of the running benchmark (`[bench NAME] line`, stderr), outside any point."""
    global _current
    if _current is None:
        _current = Progress("?", os.environ.get(FAIL_POINT_ENV))
    _current.say(line)


def describe(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "(all)"


def _as_str(point: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in point.items()}


def _parse_point(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{FAIL_POINT_ENV}={text!r}: expected key=value[,key=value...]")
    return {k.strip(): v.strip() for k, v in pairs}


def available() -> list[str]:
    here = Path(__file__).parent
    return [n for n in NAMES if (here / f"{n}.py").is_file()]


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main(name: str, quick: bool, as_json: bool, options: dict[str, bool] | None = None) -> int:
    """Run benchmarks/NAME.py: 0 if every point was measured, 1 if any failed, 2 for a bad name or
    an option that benchmark does not take. `options` (e.g. {"mixed": True}) go to its run() as
    keywords; only those set are passed, so a benchmark without options never sees them."""
    global _current
    if name not in available():
        print(f"shardwright bench: unknown benchmark {name!r}; available: {available()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{name}")
    given = {k: v for k, v in (options or {}).items() if v}
    unknown = sorted(set(given) - set(inspect.signature(module.run).parameters))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        print(f"shardwright bench: {flags} is not an option of bench {name}", file=sys.stderr)
        return 2
    try:
        _current = Progress(name, os.environ.get(FAIL_POINT_ENV))
    except ValueError as exc:
        print(f"shardwright bench: {exc}", file=sys.stderr)
        return 2
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    report = module.run(quick=quick, **given)
    report["benchmark"], report["quick"] = name, quick
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # at start and end: the machine is shared
    report["failed"] = _current.failed
    print(table(report["results"], report.get("columns", module.COLUMNS)))
    for line in report.get("notes", []):
        print(line)
    for point in _current.failed:
        print(f"FAILED: {point['error']} ({describe({k: v for k, v in point.items() if k != 'error'})})")
    if as_json:
        print(json.dumps(report))
    return 1 if _current.failed else 0
