"""Job-trace loaders: Microsoft Philly, Alibaba GPU v2023 ("openb") and a simple generic CSV.

Every loader returns a `Trace`: jobs sorted by submit time (stable), the source, and how many rows
were skipped and why. Submit times are seconds from the first kept job (Philly, Alibaba) or as given
(generic).

Gang shape. The public traces give only a GPU count, so a shape is synthesised by `shape_for_gpus`:
a job of `g <= gpus_per_node` GPUs is one TP group (`tp = g`, so it needs one node); a larger job gets
`tp` = the largest divisor of `g` that fits a node and `pp = g / tp` pipeline stages. (Placement only
constrains TP groups, so putting the rest in `dp` instead would place identically.)

Rows with missing or bad values:
- Philly and Alibaba (real traces, lenient): a row that cannot be parsed, has no positive GPU count
  or no positive duration is skipped and counted in `Trace.skipped` under a reason.
  Alibaba: CPU-only pods (`num_gpu == 0`) and pods never scheduled (empty `scheduled_time`) are
  skipped; the duration is `deletion_time - scheduled_time`; `Failed` pods are kept, because they
  held their GPUs until deleted; pods still `Running` at the cut keep their censored duration;
  fractional GPUs (`gpu_milli < 1000`) count as one whole GPU.
- Generic (written by hand or converted, strict): a value that does not parse raises ValueError
  naming the line and column; rows with `duration_s <= 0` or `gpus <= 0` are skipped and counted.

Converting another public trace to the generic CSV (header
`submit_time_s,duration_s,gpus,user[,kind,priority,tp,pp]`; `submit_time`, `duration`, `num_gpus`
are accepted too): Philly-style rows give submit_time_s = seconds since the first timestamp,
duration_s = run time, gpus = num_gpus, user = virtual cluster; Helios-style rows give
submit_time_s = submit_time - first submit_time, duration_s = end_time - start_time,
gpus = gpu_num, user = user; Alibaba openb pods give submit_time_s = creation_time,
duration_s = deletion_time - scheduled_time, gpus = num_gpu, kind = inference for qos LS.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

from shardwright.config import ParallelLayout
from shardwright.scheduler.model import GangShape, Job, JobKind, PriorityClass

TraceFormat = Literal["philly", "alibaba", "generic"]
TRACE_FORMATS: tuple[TraceFormat, ...] = ("philly", "alibaba", "generic")
ALIBABA_KIND: dict[str, JobKind] = {
    "LS": "inference",
    "Guaranteed": "inference",
    "BE": "training",
    "Burstable": "training",
}
GENERIC_ALIASES = {"submit_time_s": "submit_time", "duration_s": "duration", "gpus": "num_gpus"}


@dataclass(frozen=True)
class Trace:
    """Jobs of one trace (sorted by submit time), where they came from, and rows skipped by reason."""

    jobs: list[Job]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)


def shape_for_gpus(num_gpus: int, gpus_per_node: int) -> GangShape:
    """Synthesised gang shape for a job known only by its GPU count (see module docstring)."""
    if num_gpus < 1 or gpus_per_node < 1:
        raise ValueError(f"num_gpus={num_gpus} and gpus_per_node={gpus_per_node} must be >= 1")
    if num_gpus <= gpus_per_node:
        return GangShape(ParallelLayout(tp=num_gpus))
    tp = max(d for d in range(1, gpus_per_node + 1) if num_gpus % d == 0)
    return GangShape(ParallelLayout(tp=tp, pp=num_gpus // tp))


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row; ValueError with the path if the file cannot be read."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ValueError(f"{path} is empty; expected a CSV with a header row")
            yield from enumerate(reader, start=2)
    except OSError as err:
        raise ValueError(f"cannot read trace {path}: {err.strerror}; check the --trace path") from err


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _finish(jobs: list[Job], source: str, skipped: Counter[str], limit: int | None, rebase: bool) -> Trace:
    jobs.sort(key=lambda job: job.submit_time_s)
    if limit is not None:
        jobs = jobs[:limit]
    if rebase and jobs:
        origin = jobs[0].submit_time_s
        jobs = [_rebased(job, origin) for job in jobs]
    return Trace(jobs, source, dict(skipped))


def _rebased(job: Job, origin_s: float) -> Job:
    return replace(job, submit_time_s=job.submit_time_s - origin_s)


def load_philly(
    path: str | Path,
    gpus_per_node: int = 8,
    limit: int | None = None,
    since_s: float = 0.0,
    window_s: float | None = None,
) -> Trace:
    """Philly jobs (columns timestamp, duration, num_gpus, cluster) as training jobs; tenant = cluster.

    Keeps jobs submitted in `[first + since_s, first + since_s + window_s)` (the whole file if
    `window_s` is None), then the first `limit` of them; submit times count from the first kept job.
    """
    path = Path(path)
    jobs: list[Job] = []
    skipped: Counter[str] = Counter()
    first: datetime | None = None
    for line, row in _rows(path):
        try:
            stamp = datetime.fromisoformat(row["timestamp"])
        except (KeyError, TypeError, ValueError):
            skipped["bad_timestamp"] += 1
            continue
        first = first or stamp
        offset_s = (stamp - first).total_seconds() - since_s
        if offset_s < 0 or (window_s is not None and offset_s >= window_s):
            continue
        job = _job_from(
            f"philly-{line}",
            row.get("cluster") or "unknown",
            "training",
            offset_s,
            _number(row.get("duration")),
            _number(row.get("num_gpus")),
            gpus_per_node,
            skipped,
        )
        if job is not None:
            jobs.append(job)
    return _finish(jobs, f"philly:{path}", skipped, limit, rebase=True)


def load_alibaba(path: str | Path, gpus_per_node: int = 8, limit: int | None = None) -> Trace:
    """Alibaba openb pods: LS / Guaranteed -> inference, BE / Burstable -> training (our assumption;
    the trace does not label them); tenant = the qos class; submit = creation_time."""
    path = Path(path)
    jobs: list[Job] = []
    skipped: Counter[str] = Counter()
    for line, row in _rows(path):
        gpus, created = _number(row.get("num_gpu")), _number(row.get("creation_time"))
        scheduled, deleted = _number(row.get("scheduled_time")), _number(row.get("deletion_time"))
        if gpus == 0:
            skipped["cpu_only"] += 1
            continue
        if scheduled is None or created is None or deleted is None:
            skipped["never_scheduled_or_no_times"] += 1
            continue
        qos = row.get("qos") or "BE"
        job = _job_from(
            row.get("name") or f"pod-{line}",
            qos,
            ALIBABA_KIND.get(qos, "training"),
            created,
            deleted - scheduled,
            gpus,
            gpus_per_node,
            skipped,
        )
        if job is not None:
            jobs.append(job)
    return _finish(jobs, f"alibaba:{path}", skipped, limit, rebase=True)


def _job_from(
    job_id: str,
    tenant: str,
    kind: JobKind,
    submit_s: float,
    duration_s: float | None,
    gpus: float | None,
    gpus_per_node: int,
    skipped: Counter[str],
) -> Job | None:
    """A lenient-loader job, or None (counted in `skipped`) when GPUs or duration are missing/<= 0."""
    if gpus is None or gpus < 1 or gpus != int(gpus):
        skipped["no_gpus"] += 1
        return None
    if duration_s is None or duration_s <= 0:
        skipped["no_duration"] += 1
        return None
    return Job(
        job_id, tenant, kind, shape_for_gpus(int(gpus), gpus_per_node), submit_s, duration_s=duration_s
    )


def load_generic(path: str | Path, gpus_per_node: int = 8, limit: int | None = None) -> Trace:
    """Generic CSV: submit_time_s (or submit_time), duration_s (or duration), gpus (or num_gpus), and
    optionally user, kind, priority (integer or class name), tp, pp, cp, dp, job_id.

    With no tp given the shape comes from `shape_for_gpus`; with tp given, tp*pp*cp*dp must equal gpus.
    """
    path = Path(path)
    jobs: list[Job] = []
    skipped: Counter[str] = Counter()
    for line, raw in _rows(path):
        row = {GENERIC_ALIASES.get(k.strip(), k.strip()): (v or "").strip() for k, v in raw.items() if k}
        gpus, duration_s = _required(row, "num_gpus", line), _required(row, "duration", line)
        if gpus <= 0 or duration_s <= 0:
            skipped["zero_gpus_or_duration"] += 1
            continue
        jobs.append(_generic_job(row, line, int(gpus), duration_s, gpus_per_node))
    return _finish(jobs, f"generic:{path}", skipped, limit, rebase=False)


def _required(row: dict[str, str], column: str, line: int) -> float:
    value = _number(row.get(column))
    if value is None:
        raise ValueError(f"line {line}: column {column!r} = {row.get(column)!r} is missing or not a number")
    return value


def _generic_job(row: dict[str, str], line: int, gpus: int, duration_s: float, gpus_per_node: int) -> Job:
    submit_s = _required(row, "submit_time", line)
    try:
        return Job(
            job_id=row.get("job_id") or f"job-{line}",
            tenant=row.get("user") or "default",
            kind=row.get("kind") or "training",  # type: ignore[arg-type]  # validated by Job
            shape=_generic_shape(row, gpus, gpus_per_node),
            submit_time_s=submit_s,
            priority=_priority(row.get("priority")),
            duration_s=duration_s,
        )
    except ValueError as err:
        raise ValueError(f"line {line}: {err}") from err


def _generic_shape(row: dict[str, str], gpus: int, gpus_per_node: int) -> GangShape:
    if not row.get("tp"):
        return shape_for_gpus(gpus, gpus_per_node)
    axes = [name for name in ParallelLayout.model_fields if row.get(name)]  # the layout's axes the row gives
    try:
        shape = GangShape(ParallelLayout(**{name: int(row[name]) for name in axes}))
    except ValueError as err:
        raise ValueError(f"{'/'.join(axes)} must be positive integers ({' '.join(str(err).split())})") from err
    if shape.num_gpus != gpus:
        raise ValueError(f"the layout's world size ({'*'.join(axes)}) = {shape.num_gpus} but gpus = {gpus}; "
                         "make them agree")
    return shape


def _priority(text: str | None) -> int | None:
    if not text:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return int(PriorityClass[text.upper()])
    except KeyError as err:
        names = ", ".join(p.name.lower() for p in PriorityClass)
        raise ValueError(f"priority={text!r} is neither an integer nor one of {names}") from err


def detect_format(path: str | Path) -> TraceFormat:
    """Guess the format from the header: `timestamp` + `cluster` -> philly, `qos` -> alibaba, else generic."""
    with Path(path).open(newline="") as handle:
        header = next(csv.reader(handle), [])
    columns = {c.strip() for c in header}
    if {"timestamp", "cluster"} <= columns:
        return "philly"
    if "qos" in columns and "creation_time" in columns:
        return "alibaba"
    return "generic"


def load_trace(
    path: str | Path, fmt: TraceFormat | None = None, gpus_per_node: int = 8, limit: int | None = None
) -> Trace:
    """Load a trace of the given format (detected from the header when None)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} not found; pass an existing CSV to --trace")
    fmt = fmt or detect_format(path)
    loaders = {"philly": load_philly, "alibaba": load_alibaba, "generic": load_generic}
    if fmt not in loaders:
        raise ValueError(f"unknown trace format {fmt!r}; choose one of {', '.join(TRACE_FORMATS)}")
    return loaders[fmt](path, gpus_per_node=gpus_per_node, limit=limit)
