"""The step channel: one TCP connection from each gang worker to its controller, for step messages.

A Ray actor call costs about 1.5 ms on an idle 2-core machine and several times that while the
workers compute (each call goes through the caller's and the actor's core-worker threads, gRPC
and the result store); a Ray compiled graph is cheap per step but its channel threads busy-wait
beside the workers. Here every worker's compute thread (`compute_thread.py`, the thread that runs
all of the worker's torch work) waits in `select` on a socket the worker opened to the
controller: a step is one pickled message written to each socket, the reply is one small frame
back (the sampled tokens, or the error), and nothing spins.

Frames are an 8-byte big-endian length and a pickle. A worker authenticates its connection with
the controller's random token before the controller reads anything else from it (workers only
connect out; nothing listens on a worker). The controller listens only on the address its workers
use to reach it (loopback when they all run on its node, see WorkerGang.open_channel) and serves
all connections' handshakes at once, each within HANDSHAKE_TIMEOUT_S, so a connection that sends
nothing cannot hold up the gang. A worker that dies closes its socket: the controller sees
end-of-file at once instead of waiting for a timeout.
"""

from __future__ import annotations

import hmac
import pickle
import secrets
import select
import socket
import struct
import time
import traceback

from shardwright.actors.compute_thread import ComputeThread

_HEADER = struct.Struct("!Q")
# A worker sends its token and rank as soon as it connects: a connection that has not within
# this time is dropped (a port scanner, a stuck client), without holding up the others.
HANDSHAKE_TIMEOUT_S = 2.0


class ChannelClosed(ConnectionError):
    """The other end closed the connection (a worker process that died closes its socket);
    `rank` names the worker where the controller knows it."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def frame(payload: bytes) -> bytes:
    """The bytes of one frame: length header, then the payload."""
    return _HEADER.pack(len(payload)) + payload


def recv_frame(sock: socket.socket) -> bytes:
    """One whole frame; raises ChannelClosed at end-of-file."""
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        try:
            n = sock.recv_into(view[got:], size - got)
        except ConnectionResetError as err:  # closed with our message unread: gone all the same
            raise ChannelClosed(f"connection reset by the other end: {err}") from err
        if n == 0:
            raise ChannelClosed("connection closed by the other end")
        got += n
    return buf


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StepChannel:
    """Controller side: a listening socket, then one authenticated connection per worker rank."""

    def __init__(self, host: str, num_workers: int) -> None:
        self.host, self.num_workers = host, num_workers
        self.token = secrets.token_hex(16)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self.socks: list[socket.socket | None] = [None] * num_workers

    def accept_all(self, timeout_s: float, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Accept and authenticate every worker's connection (each sends (token, rank) first).

        Connections are served side by side in one `select` loop: a connection that sends nothing
        (or too little) is dropped after `handshake_timeout_s` without delaying the others, and
        one that sends a wrong token is dropped at once."""
        deadline = time.monotonic() + timeout_s
        pending: dict[socket.socket, tuple[bytearray, float]] = {}  # connection -> (bytes so far, its deadline)
        need = len(self.token) + _HEADER.size
        self._listener.setblocking(False)
        try:
            while any(s is None for s in self.socks):
                now = time.monotonic()
                for conn, (_, conn_deadline) in list(pending.items()):
                    if now >= conn_deadline:  # silent or slow: not one of ours, or not in time
                        del pending[conn]
                        conn.close()
                if now >= deadline:
                    missing = [r for r, s in enumerate(self.socks) if s is None]
                    raise TimeoutError(f"step channel: ranks {missing} did not connect within {timeout_s:g} s")
                wake = min([deadline, *(d for _, d in pending.values())])
                readable, _, _ = select.select([self._listener, *pending], [], [], max(0.0, wake - now))
                for sock in readable:
                    if sock is self._listener:
                        self._accept_pending(pending, handshake_timeout_s)
                        continue
                    buf, conn_deadline = pending[sock]
                    try:
                        chunk = sock.recv(need - len(buf))
                    except OSError:
                        chunk = b""
                    buf += chunk
                    if not chunk or not self._token_prefix_ok(buf):
                        del pending[sock]  # closed, or a wrong token: drop it without reading more
                        sock.close()
                    elif len(buf) == need:
                        del pending[sock]
                        self._admit(sock, _HEADER.unpack(buf[len(self.token):])[0])
        finally:
            for conn in pending:
                conn.close()
        self._listener.close()

    def _accept_pending(self, pending: dict, handshake_timeout_s: float) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            pending[conn] = (bytearray(), time.monotonic() + handshake_timeout_s)

    def _token_prefix_ok(self, buf: bytearray) -> bool:
        """Whether what arrived so far can still be this channel's token (compared in constant
        time, before anything is unpickled)."""
        got = bytes(buf[:len(self.token)])
        return hmac.compare_digest(got, self.token.encode()[:len(got)])

    def _admit(self, conn: socket.socket, rank: int) -> None:
        if not 0 <= rank < self.num_workers or self.socks[rank] is not None:
            conn.close()  # not one of ours: drop it
            return
        conn.setblocking(True)
        _nodelay(conn)
        self.socks[rank] = conn

    def send(self, obj) -> None:
        """Write one message to every worker; ChannelClosed (with its rank) if one is gone."""
        data = frame(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))  # built once per step
        for rank, sock in enumerate(self.socks):
            try:
                sock.sendall(data)
            except OSError as err:
                raise ChannelClosed(f"rank {rank} is gone: {err}", rank) from err

    def wait_ready(self, ranks: list[int], timeout_s: float | None) -> list[int]:
        """Ranks among `ranks` with a frame (or end-of-file) to read, waiting up to timeout_s."""
        socks = [self.socks[r] for r in ranks]
        readable, _, _ = select.select(socks, [], [], timeout_s)
        return [r for r, s in zip(ranks, socks) if s in readable]

    def read(self, rank: int):
        """The next reply of `rank`: ("ok", value) or ("error", text); ChannelClosed if it died."""
        return pickle.loads(recv_frame(self.socks[rank]))

    def close(self) -> None:
        for sock in [self._listener, *self.socks]:
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass


def connect_worker(runner, host: str, port: int, token: str, rank: int,
                   compute: ComputeThread | None = None) -> ComputeThread:
    """Worker side: connect to the controller, authenticate, then serve steps on the worker's
    compute thread (a new one if `compute` is None) until the controller closes the connection.
    Each message is `runner.step(msg)`. Returns the compute thread."""
    sock = socket.create_connection((host, port), timeout=30)
    _nodelay(sock)
    sock.sendall(token.encode() + _HEADER.pack(rank))
    sock.settimeout(None)
    if compute is None:
        compute = ComputeThread(f"shardwright-steps-{rank}", getattr(runner, "enter_thread", None))
    compute.attach(sock, lambda s: serve_one(runner, s))
    return compute


def serve_one(runner, sock: socket.socket) -> bool:
    """Read one step from `sock`, run it, write the reply; False once the connection is over."""
    try:
        msg = pickle.loads(recv_frame(sock))
    except OSError:
        return False  # the controller closed the channel (or went away)
    try:
        enter = getattr(runner, "enter_thread", None)
        if enter is not None:
            enter()
        reply = ("ok", runner.step(msg))
    except Exception as err:  # noqa: BLE001 - the controller names this rank and fails the step
        reply = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}")
    try:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 - a result that cannot be sent fails its step, not the worker
        data = pickle.dumps(("error", f"the step's result could not be pickled: {type(err).__name__}: {err}"))
    try:
        sock.sendall(frame(data))
    except OSError:
        return False
    return True
