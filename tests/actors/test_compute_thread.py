"""A worker's ComputeThread (plain objects, real localhost sockets, no Ray): every call and every
channel step of a worker runs on the one thread, in order, and errors reach the caller."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from waiting import eventually
from shardwright.actors.compute_thread import ComputeThread, any_thread
from shardwright.actors.step_channel import StepChannel, connect_worker


class Recorder:
    """A runner that records the thread and order of everything run on it."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.entered: set[int] = set()

    def enter_thread(self) -> None:
        self.entered.add(threading.get_ident())

    def load(self, name: str) -> str:
        self.log.append((f"load {name}", threading.get_ident()))
        return name.upper()

    def step(self, msg):
        time.sleep(0.01)  # a step takes a while: a call arriving meanwhile waits for it
        self.log.append((f"step {msg}", threading.get_ident()))
        return msg

    def fail(self) -> None:
        raise KeyError("no such shard")


def test_calls_run_in_order_on_one_thread_that_is_not_the_callers():
    runner = Recorder()
    compute = ComputeThread("test-compute", runner.enter_thread)
    results = []
    callers = [threading.Thread(target=lambda i=i: results.append(compute.call(runner.load, f"w{i}")))
               for i in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert sorted(results) == ["W0", "W1", "W2", "W3"]
    threads = {ident for _, ident in runner.log}
    assert threads == {compute.ident} and compute.ident != threading.get_ident()
    assert runner.entered == {compute.ident}  # per-thread settings applied on the compute thread


def test_an_error_reaches_the_caller_and_the_thread_keeps_serving():
    runner = Recorder()
    compute = ComputeThread("test-compute", runner.enter_thread)
    with pytest.raises(KeyError, match="no such shard"):
        compute.call(runner.fail)
    assert compute.call(runner.load, "after") == "AFTER"


def test_a_call_made_on_the_compute_thread_runs_inline():
    compute = ComputeThread("test-compute")
    assert compute.call(lambda: compute.call(lambda: threading.get_ident())) == compute.ident


def test_channel_steps_and_calls_share_the_worker_thread():
    runner = Recorder()
    compute = ComputeThread("test-compute", runner.enter_thread)
    compute.call(runner.load, "weights")  # as a Ray method call would, before the channel opens
    channel = StepChannel("127.0.0.1", 1)
    assert connect_worker(runner, "127.0.0.1", channel.port, channel.token, 0, compute) is compute
    channel.accept_all(timeout_s=10)
    try:
        for i in range(3):
            channel.send(i)
        compute.call(runner.load, "between")  # arrives while the steps are queued or running
        got = []
        while len(got) < 3:
            channel.wait_ready([0], 10)
            got.append(channel.read(0))
        assert got == [("ok", 0), ("ok", 1), ("ok", 2)]
        assert {ident for _, ident in runner.log} == {compute.ident}
        assert [name for name, _ in runner.log].count("load between") == 1
    finally:
        channel.close()


def test_the_thread_drops_a_channel_the_controller_closed_and_still_takes_calls():
    runner = Recorder()
    compute = ComputeThread("test-compute", runner.enter_thread)
    channel = StepChannel("127.0.0.1", 1)
    connect_worker(runner, "127.0.0.1", channel.port, channel.token, 0, compute)
    channel.accept_all(timeout_s=10)
    channel.send("only")
    channel.wait_ready([0], 10)
    assert channel.read(0) == ("ok", "only")
    channel.close()  # the controller rebuilt its gang or went away
    eventually(lambda: compute.call(lambda: compute._sock) is None, "the compute thread let go of its socket", 10)
    assert compute.call(runner.load, "still") == "STILL"


def test_a_method_marked_any_thread_answers_while_a_step_runs():
    class Slow(Recorder):
        @any_thread
        def memory(self) -> str:
            return "ledger"

    runner = Slow()
    compute = ComputeThread("test-compute", runner.enter_thread)
    started, release = threading.Event(), threading.Event()

    def long_step():
        started.set()
        release.wait(10)
        return "done"

    result = []
    caller = threading.Thread(target=lambda: result.append(compute.call(long_step)))
    caller.start()
    assert started.wait(10)
    assert compute.call(runner.memory) == "ledger"  # not queued behind the running step
    release.set()
    caller.join(10)
    assert result == ["done"]


def test_a_channel_handler_that_raises_closes_the_channel_not_the_thread():
    compute = ComputeThread("test-compute")
    left, right = socket.socketpair()

    def broken(sock):
        sock.recv(1)
        raise RuntimeError("handler bug")

    compute.attach(left, broken)
    right.sendall(b"x")
    right.settimeout(10)
    assert right.recv(1) == b""  # the compute thread closed its end
    assert compute.call(lambda: "alive") == "alive"
    right.close()
