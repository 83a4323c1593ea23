"""Shared benchmark runner: a human table, then one JSON line (the last line printed)."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

NAMES = ("decode", "step", "scheduler", "attention", "train", "pool", "api", "quant")


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


def main(name: str, quick: bool, as_json: bool) -> int:
    if name not in available():
        print(f"shardwright bench: unknown benchmark {name!r}; available: {available()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{name}")
    start = time.perf_counter()
    report = module.run(quick=quick)
    report["benchmark"], report["quick"] = name, quick
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(table(report["results"], module.COLUMNS))
    for line in report.get("notes", []):
        print(line)
    if as_json:
        print(json.dumps(report))
    return 0
