"""The one thread of a worker process that runs its torch work: actor calls and channel steps.

Why one thread: on CPU every thread that opens an OpenMP parallel region gets a thread team of
its own, and libgomp counts the threads of all teams against the cores; once they outnumber the
cores, each team stops spinning at its barriers and sleeps on a futex instead, and every
parallel region pays the wake-ups. A worker that loaded its weights on Ray's main thread (actor
calls run there) and then decoded on the step channel's own thread ran 14-23 % slower per step.
Measured on the CI machine (llama-110m, batch 32, 2 threads, one process): 80-83 ms per step on
the main thread, 94-102 ms on a second thread after the main thread had used its team; the same
loop on a second thread of a process whose main thread never opened a region runs as fast as the
main thread. Environment settings do not help (GOMP_SPINCOUNT=INFINITY makes it 2x slower: the
idle team spins on a core). So a worker owns one `ComputeThread`, and both its Ray method calls
and the steps from its channel run on it; Ray's threads only hand work over.

The thread waits in `select` on a wake-up pipe and, once the worker serves a step channel, on the
channel's socket: a step is read and run on the thread that will run every other step, without
a hand-over in between.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)


def any_thread(method: Callable) -> Callable:
    """Mark a runner method that only reads or updates lock-protected state (a memory ledger):
    `ComputeThread.call` runs it on the calling thread at once, so it answers while a step runs."""
    method.runs_on_any_thread = True
    return method


class ComputeThread:
    """A daemon thread that runs `call`s one at a time, in order, and serves an attached socket.

    `enter()` runs first on the thread (per-thread settings: intra-op threads, CUDA device).
    """

    def __init__(self, name: str, enter: Callable[[], None] | None = None) -> None:
        self._enter = enter or (lambda: None)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._sock: socket.socket | None = None
        self._serve_one: Callable[[socket.socket], bool] | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def call(self, fn: Callable, *args):
        """Run fn(*args) on the compute thread and return its result (or raise its error); a
        method marked `any_thread` runs on the calling thread instead."""
        if threading.get_ident() == self._thread.ident or getattr(fn, "runs_on_any_thread", False):
            return fn(*args)  # already here (no deadlock), or safe anywhere
        done: Future = Future()
        self._calls.put((fn, args, done))
        os.write(self._wake_w, b"x")
        return done.result()

    def attach(self, sock: socket.socket, serve_one: Callable[[socket.socket], bool]) -> None:
        """Serve `sock` on the compute thread: `serve_one(sock)` runs whenever it is readable and
        returns False once the connection is over (the thread then closes it). Replaces (and
        closes) a socket attached before."""
        self.call(self._attach, sock, serve_one)

    def _attach(self, sock: socket.socket, serve_one: Callable[[socket.socket], bool]) -> None:
        self._detach()
        self._sock, self._serve_one = sock, serve_one

    def _detach(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = self._serve_one = None

    def _loop(self) -> None:
        self._enter()
        while True:
            watched = [self._wake_r] if self._sock is None else [self._wake_r, self._sock]
            readable, _, _ = select.select(watched, [], [])
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
                self._run_calls()
            if self._sock is not None and self._sock in readable and not self._serve_socket():
                self._detach()

    def _serve_socket(self) -> bool:
        try:
            return self._serve_one(self._sock)
        except Exception:  # the thread must outlive its channel: calls still come to it
            log.exception("serving the step channel failed; closing it (the controller sees it closed)")
            return False

    def _run_calls(self) -> None:
        while True:
            try:
                fn, args, done = self._calls.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():
                continue
            try:
                self._enter()
                done.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the caller, who re-raises it
                done.set_exception(err)
