"""Shardwright's own local Ray head: a `ray start --head --block` process that outlives `serve`.

`serve` without a Ray address joins the head recorded in `<state_dir>/ray-head.json`, or starts
one and records it there; `shardwright stop` ends it. The jobs' controller actors are detached and
live on this head, so a restarted (or killed) `serve` finds them running and adopts them.

Guarantees:
- One head per state dir: finding or starting it runs under a file lock (`ray-head.lock`), so two
  `serve` processes started at once share one head.
- A record counts only while its head runs: the recorded pid is alive with the recorded start time
  (a reused pid is not taken for the head) and the head's GCS port accepts connections. A stale
  record is replaced by a new head.
- The head is a process of its own: a new session (a signal to `serve`'s terminal or process group
  does not reach it), stdin closed, its output in `<state_dir>/ray-head.log`, `serve`'s environment
  (so its workers import what `serve` imports) without a Ray address. Every port is a free one
  chosen at start, so heads of several state dirs can run on one machine.
- The head uses Ray's token authentication (`Settings.ray_auth_mode`, RAY_AUTH_MODE, default
  token; the token in Ray's own place, `~/.ray/auth_token`, made by `ray get-auth-token --generate`
  when missing): Ray binds the node's address, not loopback, and an open head runs anyone's code.
- `stop_head` ends exactly the processes of that head, its session (every process Ray starts for the
  head, workers included, is in the session of the `ray start` process, whose id is that process's
  pid): SIGTERM to the `ray start` process (Ray's own teardown of all it started, without a drain
  wait), then SIGKILL to whatever of the session still runs after `timeout_s`. It is idempotent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
from pydantic import Field, ValidationError

from shardwright.config import StrictModel

log = logging.getLogger(__name__)

HEAD_FILE = "ray-head.json"
LOCK_FILE = "ray-head.lock"
LOG_FILE = "ray-head.log"
START_TIMEOUT_S = 120.0
_PORT_FLAGS = ("port", "ray-client-server-port", "dashboard-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
               "node-manager-port", "object-manager-port")
_started: list[subprocess.Popen] = []  # the heads this process started (kept, never waited for)


class HeadRecord(StrictModel):
    """A local Ray head as `<state_dir>/ray-head.json` records it."""

    address: str = Field(description="The GCS address drivers join, 127.0.0.1:PORT.")
    pid: int = Field(description="The `ray start --head --block` process.")
    create_time: float = Field(description="Its start time as the OS reports it (psutil), against pid reuse.")
    num_gpus: int = Field(description="GPUs the head advertises (logical ones on a machine without CUDA).")
    num_cpus: int | None = Field(description="CPUs it advertises; None: Ray's own count.")
    auth_mode: str = Field(description="RAY_AUTH_MODE of the head and its drivers.")
    log: str = Field(description="Where its output goes.")
    started_at_s: float = Field(description="Unix time of the start.")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def head_file(state_dir: Path) -> Path:
    return Path(state_dir) / HEAD_FILE


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(state_dir) / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read(state_dir: Path) -> HeadRecord | None:
    path = head_file(state_dir)
    try:
        return HeadRecord.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError) as err:
        log.warning("ignoring the unreadable Ray head record %s: %s", path, err)
        return None


def _process(record: HeadRecord) -> psutil.Process | None:
    """The head's `ray start` process if it still runs (not a zombie, not a reused pid)."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _port_open(port: int, timeout_s: float = 1.0) -> bool:
    """Whether the port takes connections on loopback (Ray's GCS listens on every address)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def find_head(state_dir: Path) -> HeadRecord | None:
    """The running head recorded in `state_dir`, or None (no record, or its head is gone)."""
    record = _read(state_dir)
    if record is None or _process(record) is None or not _port_open(record.port):
        return None
    return record


def ensure_head(state_dir: Path, *, num_gpus: int, num_cpus: int | None = None, auth_mode: str = "token",
                progress: Callable[[str], None] = log.info) -> tuple[HeadRecord, bool]:
    """The running head of `state_dir`, else a new one (recorded there); returns (it, whether it was
    started now). `num_gpus`/`num_cpus` apply to a head started now only."""
    with _locked(state_dir):
        record = find_head(state_dir)
        if record is not None:
            return record, False
        stale = _read(state_dir)
        if stale is not None:
            progress(f"the Ray head recorded in {head_file(state_dir)} (pid {stale.pid}) is gone; starting a new one")
        record = _start(Path(state_dir), num_gpus, num_cpus, auth_mode, progress)
        path = head_file(state_dir)
        path.with_suffix(".tmp").write_text(record.model_dump_json(indent=1))
        path.with_suffix(".tmp").replace(path)
        return record, True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_token(auth_mode: str) -> None:
    """Ray's token (`~/.ray/auth_token`) for a token-authenticated head, made if missing."""
    if auth_mode != "token" or (Path.home() / ".ray" / "auth_token").is_file():
        return
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                          capture_output=True, text=True, timeout=120)  # stdout is the token: not shown
    if done.returncode != 0:
        raise RuntimeError(f"could not make Ray's authentication token (`ray get-auth-token --generate` exited "
                           f"{done.returncode}: {done.stderr.strip()[-300:]}); make one with that command, or set "
                           "RAY_AUTH_MODE=disabled for a head without authentication")


def _start(state_dir: Path, num_gpus: int, num_cpus: int | None, auth_mode: str,
           progress: Callable[[str], None]) -> HeadRecord:
    _ensure_token(auth_mode)
    ports = {flag: _free_port() for flag in _PORT_FLAGS}
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--num-gpus={num_gpus}",
               "--include-dashboard=false", "--disable-usage-stats", *(f"--{f}={p}" for f, p in ports.items())]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SHARDWRIGHT_RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE=auth_mode, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no Ray Serve to drain
    log_path = state_dir / LOG_FILE
    cpus = f"{num_cpus} CPUs" if num_cpus is not None else "Ray's count of CPUs"
    progress(f"starting a local Ray head ({num_gpus} GPUs, {cpus}) at 127.0.0.1:{ports['port']}; it outlives "
             f"this server (`shardwright stop` ends it); log: {log_path}")
    started = time.monotonic()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)
    _started.append(proc)
    record = HeadRecord(address=f"127.0.0.1:{ports['port']}", pid=proc.pid,
                        create_time=psutil.Process(proc.pid).create_time(), num_gpus=num_gpus, num_cpus=num_cpus,
                        auth_mode=auth_mode, log=str(log_path), started_at_s=time.time())
    while not _port_open(record.port, timeout_s=0.5):
        if proc.poll() is not None:
            raise RuntimeError(f"the local Ray head exited with status {proc.returncode} while starting; see "
                               f"{log_path}: {_tail(log_path)}")
        if time.monotonic() - started > START_TIMEOUT_S:
            _end(_session(record), 10.0)
            raise TimeoutError(f"the local Ray head did not open its port within {START_TIMEOUT_S:.0f} s; see "
                               f"{log_path}")
        time.sleep(0.2)
    progress(f"local Ray head answering after {time.monotonic() - started:.1f} s (pid {proc.pid})")
    return record


def _tail(path: Path, num_chars: int = 400) -> str:
    try:
        return " ".join(path.read_text(errors="replace")[-num_chars:].split())
    except OSError:
        return "(no log)"


def _session(record: HeadRecord) -> list[psutil.Process]:
    """The processes of the head's session (started no earlier than the head: no reused ids)."""
    members = []
    for proc in psutil.process_iter(["create_time"]):
        try:
            if os.getsid(proc.pid) == record.pid and proc.info["create_time"] >= record.create_time - 0.05:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie has ended (a container's pid 1 may never reap it)
    except psutil.Error:
        return False


def _end(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to `timeout_s` for `procs` to end, then SIGKILL the rest; returns those it killed."""
    deadline = time.monotonic() + timeout_s
    while any(_running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = [p for p in procs if _running(p)]
    for proc in killed:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + 10.0
    while any(_running(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    return killed


def stop_head(state_dir: Path, timeout_s: float = 30.0) -> HeadRecord | None:
    """End the head recorded in `state_dir` and remove its record; returns it, or None if none ran."""
    with _locked(state_dir):
        record = _read(state_dir)
        proc = _process(record) if record is not None else None
        head_file(state_dir).unlink(missing_ok=True)
        if proc is None:
            return None
        members = _session(record)
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass  # it ended meanwhile; the rest of its session is still ended below
        killed = _end(members, timeout_s)
        for child in _started:  # reap it if this process started it
            child.poll()
        if killed:
            log.warning("the Ray head's processes %s did not end within %.0f s of SIGTERM; killed them",
                        [p.pid for p in killed], timeout_s)
        return record
