"""The local Ray head of a state dir (cluster/local_head.py) on its own: found, started once, stopped.

Real parts: a real `ray start --head --block` process in a temporary state dir (stopped at the end
of each test, failing or not). No server: `serve` on this head is tests/api/test_local_head.py.
"""

from __future__ import annotations

import os
import threading

import psutil
import pytest

from waiting import eventually
from shardwright.cluster.local_head import HeadRecord, ensure_head, find_head, head_file, stop_head

pytest.importorskip("ray")


@pytest.fixture
def state(tmp_path):
    yield tmp_path / "state"
    stop_head(tmp_path / "state")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_two_starters_at_once_share_one_head_and_stop_ends_its_whole_tree(state):
    found, lines = [], []

    def start() -> None:
        found.append(ensure_head(state, num_gpus=2, num_cpus=1, progress=lines.append))

    starters = [threading.Thread(target=start) for _ in range(2)]
    for t in starters:
        t.start()
    for t in starters:
        t.join(timeout=180)
    (first, started_first), (second, started_second) = found
    assert first == second and sorted([started_first, started_second]) == [False, True]  # one head, joined once
    assert any("starting a local Ray head (2 GPUs, 1 CPUs)" in line for line in lines), lines
    assert find_head(state) == first and HeadRecord.model_validate_json(head_file(state).read_text()) == first
    proc = psutil.Process(first.pid)
    assert proc.ppid() == os.getpid() and proc.pid == os.getsid(proc.pid)  # a session of its own
    eventually(lambda: "raylet" in {p.name() for p in proc.children(recursive=True)},  # the rest of the head
               lambda: [p.name() for p in proc.children(recursive=True)], 120, 0.2)
    tree = [first.pid, *(p.pid for p in proc.children(recursive=True))]
    assert stop_head(state) == first
    assert [pid for pid in tree if running(pid)] == []  # gcs_server, raylet, agents, ...: all ended
    assert find_head(state) is None and not head_file(state).exists()
    assert stop_head(state) is None  # idempotent


def test_a_record_whose_pid_is_another_process_is_stale_and_that_process_is_never_signalled(state):
    me = psutil.Process()
    state.mkdir(parents=True)
    stale = HeadRecord(address="127.0.0.1:1", pid=me.pid, create_time=me.create_time() - 100, num_gpus=4,
                       num_cpus=None, auth_mode="token", log="x", started_at_s=0)
    head_file(state).write_text(stale.model_dump_json())
    assert find_head(state) is None
    assert stop_head(state) is None  # this very process was not sent SIGTERM (it would not be here)
    assert not head_file(state).exists()


def test_an_unreadable_record_is_replaced_by_a_new_head(state):
    state.mkdir(parents=True)
    head_file(state).write_text("{not json")
    lines = []
    record, started = ensure_head(state, num_gpus=1, progress=lines.append)
    assert started and find_head(state) == record and record.num_cpus is None
