"""The step channel on real localhost sockets, with plain runner objects (no Ray)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from shardwright.actors.step_channel import ChannelClosed, StepChannel, connect_worker


class Echo:
    """A runner whose step returns (rank, message) and raises on 'boom'."""

    def __init__(self, rank: int) -> None:
        self.rank, self.threads = rank, set()

    def enter_thread(self) -> None:
        self.threads.add(threading.get_ident())

    def step(self, msg):
        if msg == "boom":
            raise ValueError("asked to fail")
        return (self.rank, msg)


def _open(n: int) -> tuple[StepChannel, list[Echo]]:
    channel = StepChannel("127.0.0.1", n)
    runners = [Echo(r) for r in range(n)]
    for r in reversed(range(n)):  # connection order does not decide the rank
        connect_worker(runners[r], "127.0.0.1", channel.port, channel.token, r)
    channel.accept_all(timeout_s=10)
    return channel, runners


def _replies(channel: StepChannel, n: int) -> list:
    out = {}
    while len(out) < n:
        for rank in channel.wait_ready([r for r in range(n) if r not in out], 10):
            out[rank] = channel.read(rank)
    return [out[r] for r in range(n)]


def test_steps_reach_every_rank_and_replies_come_back_in_dispatch_order():
    channel, runners = _open(3)
    try:
        big = list(range(200_000))  # a prefill-sized message, larger than one socket buffer
        for msg in ["a", big, "c"]:  # three steps in flight before any reply is read
            channel.send(msg)
        for msg in ["a", big, "c"]:
            assert _replies(channel, 3) == [("ok", (r, msg)) for r in range(3)]
        assert all(len(r.threads) == 1 for r in runners)  # the worker's settings hook ran on its thread
    finally:
        channel.close()


def test_a_failing_step_replies_with_the_error_and_the_worker_keeps_serving():
    channel, _ = _open(2)
    try:
        channel.send("boom")
        replies = _replies(channel, 2)
        assert [status for status, _ in replies] == ["error", "error"]
        assert "ValueError: asked to fail" in replies[0][1]
        channel.send("fine")
        assert _replies(channel, 2) == [("ok", (0, "fine")), ("ok", (1, "fine"))]
    finally:
        channel.close()


def test_a_worker_that_goes_away_reads_as_closed_at_once():
    channel = StepChannel("127.0.0.1", 1)
    raw = socket.create_connection(("127.0.0.1", channel.port))  # a worker, by hand
    raw.sendall(channel.token.encode() + (0).to_bytes(8, "big"))
    channel.accept_all(timeout_s=10)
    try:
        channel.send("step")
        raw.close()  # the process died before replying
        assert channel.wait_ready([0], 5) == [0]
        with pytest.raises(ChannelClosed):
            channel.read(0)
    finally:
        channel.close()


def test_sending_to_a_worker_that_went_away_names_its_rank():
    channel = StepChannel("127.0.0.1", 2)  # rank 0 a worker, rank 1 a socket by hand
    connect_worker(Echo(0), "127.0.0.1", channel.port, channel.token, 0)
    raw = socket.create_connection(("127.0.0.1", channel.port))
    raw.sendall(channel.token.encode() + (1).to_bytes(8, "big"))
    channel.accept_all(timeout_s=10)
    raw.close()  # rank 1 died between steps
    try:
        with pytest.raises(ChannelClosed) as info:
            for _ in range(50):  # the first writes may still be taken by the kernel
                channel.send("step" * 1000)
        assert info.value.rank == 1
    finally:
        channel.close()


def test_connections_without_the_token_are_dropped_unread():
    channel = StepChannel("127.0.0.1", 1)
    intruder = socket.create_connection(("127.0.0.1", channel.port))
    intruder.sendall(os.urandom(len(channel.token)) + (0).to_bytes(8, "big"))
    worker = Echo(0)
    connect_worker(worker, "127.0.0.1", channel.port, channel.token, 0)
    try:
        channel.accept_all(timeout_s=10)
        intruder.settimeout(5)
        try:
            assert intruder.recv(1) == b""  # closed by the controller...
        except ConnectionResetError:
            pass  # ...with the rank bytes it sent unread
        channel.send("x")
        assert _replies(channel, 1) == [("ok", (0, "x"))]
    finally:
        intruder.close()
        channel.close()


def test_accept_names_the_ranks_that_never_connected():
    channel = StepChannel("127.0.0.1", 2)
    connect_worker(Echo(1), "127.0.0.1", channel.port, channel.token, 1)
    try:
        with pytest.raises(TimeoutError, match=r"ranks \[0\] did not connect"):
            channel.accept_all(timeout_s=1)
    finally:
        channel.close()


def test_a_result_that_cannot_be_pickled_fails_its_step_and_the_worker_keeps_serving():
    class Unpicklable(Echo):
        def step(self, msg):
            return (lambda: None) if msg == "lambda" else super().step(msg)

    channel = StepChannel("127.0.0.1", 1)
    connect_worker(Unpicklable(0), "127.0.0.1", channel.port, channel.token, 0)
    channel.accept_all(timeout_s=10)
    try:
        channel.send("lambda")
        status, text = _replies(channel, 1)[0]
        assert status == "error" and "could not be pickled" in text
        channel.send("fine")
        assert _replies(channel, 1) == [("ok", (0, "fine"))]
    finally:
        channel.close()


def _time_to_form(n: int, silent: int) -> float:
    """Seconds for `n` workers' connections to be accepted, with `silent` connections made first
    that send nothing (a port scanner, a stuck client)."""
    import time

    channel = StepChannel("127.0.0.1", n)
    idle = [socket.create_connection(("127.0.0.1", channel.port)) for _ in range(silent)]
    try:
        started = time.monotonic()
        for r in range(n):
            connect_worker(Echo(r), "127.0.0.1", channel.port, channel.token, r)
        channel.accept_all(timeout_s=30)
        took = time.monotonic() - started
        channel.send("x")
        assert _replies(channel, n) == [("ok", (r, "x")) for r in range(n)]
        return took
    finally:
        for sock in idle:
            sock.close()
        channel.close()


def test_a_silent_connection_does_not_delay_the_gang():
    """Bound from the issue: the gang forms within 1 s of the time it takes without the silent
    connection (before, the silent one held the accept loop until accept_all's deadline)."""
    baseline = _time_to_form(3, silent=0)
    with_silent = _time_to_form(3, silent=2)
    assert with_silent < baseline + 1.0, (baseline, with_silent)


def test_a_silent_connection_is_dropped_after_the_handshake_timeout():
    import time

    channel = StepChannel("127.0.0.1", 1)
    silent = socket.create_connection(("127.0.0.1", channel.port))
    threading.Timer(1.5, connect_worker, (Echo(0), "127.0.0.1", channel.port, channel.token, 0)).start()
    try:
        started = time.monotonic()
        channel.accept_all(timeout_s=10, handshake_timeout_s=0.5)
        silent.settimeout(5)
        try:
            assert silent.recv(1) == b""  # closed by the controller
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
    finally:
        silent.close()
        channel.close()
