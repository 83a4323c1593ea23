"""Trace loaders: the generic CSV (strict), Philly and Alibaba (lenient, real files when present)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from shardwright.config import ParallelLayout
from shardwright.scheduler.model import GangShape, PriorityClass
from shardwright.scheduler.traces import (
    detect_format,
    load_alibaba,
    load_generic,
    load_philly,
    load_trace,
    shape_for_gpus,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PHILLY = SHARED / "traces" / "philly" / "philly_jobs_2017-09-04_to_2017-10-31.csv"
ALIBABA = SHARED / "traces" / "alibaba-gpu-v2023" / "openb_pod_list_default.csv"


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real trace {path} is absent (shared/traces not checked out next to the repository)")
    return path


@pytest.mark.parametrize(
    ("gpus", "shape"),
    [
        (1, GangShape(ParallelLayout(tp=1))),
        (8, GangShape(ParallelLayout(tp=8))),
        (3, GangShape(ParallelLayout(tp=3))),
        (16, GangShape(ParallelLayout(tp=8, pp=2))),
        (12, GangShape(ParallelLayout(tp=6, pp=2))),
        (24, GangShape(ParallelLayout(tp=8, pp=3))),
        (128, GangShape(ParallelLayout(tp=8, pp=16))),
    ],
)
def test_gpu_count_maps_to_a_gang_shape(gpus, shape):
    assert shape_for_gpus(gpus, gpus_per_node=8) == shape


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobs.csv"
    path.write_text(text)
    return path


def test_generic_loader_reads_aliases_optional_columns_and_sorts(tmp_path):
    path = write(
        tmp_path,
        "submit_time,duration,num_gpus,user,kind,priority,tp,pp\n"
        "5,10,4,alice,inference,,2,2\n"
        "1,20,1,,training,best_effort,,\n"
        "3,0,2,bob,,,,\n",
    )
    trace = load_generic(path)
    assert [j.submit_time_s for j in trace.jobs] == [1.0, 5.0]
    first, second = trace.jobs
    assert first.tenant == "default" and first.priority == PriorityClass.BEST_EFFORT
    assert second.kind == "inference" and second.shape == GangShape(ParallelLayout(tp=2, pp=2))
    assert second.priority == PriorityClass.INFERENCE
    assert trace.skipped == {"zero_gpus_or_duration": 1}
    assert detect_format(path) == "generic"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1,10,abc,u", "line 2: column 'num_gpus' = 'abc'"),
        ("x,10,1,u", "line 2: column 'submit_time' = 'x'"),
        ("1,10,4,u,,,3,1", "line 2: the layout's world size \\(tp\\*pp\\) = 3 but gpus = 4"),
        ("1,10,1,u,serving,,,", "line 2: job job-2: kind='serving'"),
        ("1,10,1,u,,urgent,,", "line 2: priority='urgent'"),
    ],
)
def test_generic_loader_names_line_and_column_of_bad_values(tmp_path, row, message):
    path = write(tmp_path, "submit_time_s,duration_s,gpus,user,kind,priority,tp,pp\n" + row + "\n")
    with pytest.raises(ValueError, match=message):
        load_generic(path)


def test_missing_trace_file_is_an_actionable_error(tmp_path):
    with pytest.raises(ValueError, match="not found; pass an existing CSV"):
        load_trace(tmp_path / "missing.csv")


def test_philly_lenient_loader_skips_bad_rows(tmp_path):
    path = write(
        tmp_path,
        "timestamp,duration,num_gpus,gpu_time,cluster\n"
        "2017-10-01 00:00:10,100.0,2,200,vc1\n"
        "2017-10-01 00:00:20,,1,,vc2\n"
        "not-a-time,5,1,5,vc2\n"
        "2017-10-01 00:01:10,50.0,0,0,vc2\n"
        "2017-10-01 00:02:10,50.0,16,800,vc3\n",
    )
    trace = load_philly(path)
    assert [(j.submit_time_s, j.tenant, j.num_gpus) for j in trace.jobs] == [
        (0.0, "vc1", 2),
        (120.0, "vc3", 16),
    ]
    assert trace.skipped == {"no_duration": 1, "bad_timestamp": 1, "no_gpus": 1}
    assert detect_format(path) == "philly"


def test_real_philly_week_slice():
    trace = load_philly(need(PHILLY), since_s=20 * 86_400, window_s=7 * 86_400)
    jobs = trace.jobs
    assert len(jobs) == 5_729 and trace.skipped == {}
    assert jobs[0].submit_time_s == 0.0 and all(
        a.submit_time_s <= b.submit_time_s for a, b in itertools.pairwise(jobs)
    )
    assert jobs[-1].submit_time_s < 7 * 86_400
    assert {j.kind for j in jobs} == {"training"} and len({j.tenant for j in jobs}) > 5
    big = [j for j in jobs if j.num_gpus > 8]
    assert big and all(j.shape.tp == 8 for j in big if j.num_gpus % 8 == 0)


def test_real_alibaba_pods_map_qos_to_kind_and_skip_cpu_only():
    trace = load_alibaba(need(ALIBABA))
    assert trace.skipped["cpu_only"] == 1_088
    kinds = {j.job_id: j.kind for j in trace.jobs}
    assert kinds["openb-pod-0000"] == "inference"  # LS
    assert {j.kind for j in trace.jobs} == {"inference", "training"}
    assert max(j.num_gpus for j in trace.jobs) == 8
    assert len(trace.jobs) + sum(trace.skipped.values()) == 8_152
    assert detect_format(ALIBABA) == "alibaba"
