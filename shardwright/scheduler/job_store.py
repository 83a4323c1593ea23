"""The scheduler's state in Redis: job records, per-job event logs, queues, idempotency keys, the lease.

The Redis server and the connection to it (embedded or external, supervised) are
shardwright.cluster.redis_server's; the records are shardwright.scheduler.jobs'.

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

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

from shardwright.cluster.redis_server import RedisConnection
from shardwright.config import Settings
from shardwright.scheduler.jobs import (ALLOWED, HOLDING, TERMINAL, WAITING, JobEvent, JobLimitError, JobRecord,
                                        JobState, LeaseLostError, TransitionError)

log = logging.getLogger(__name__)
transition_log = logging.getLogger("shardwright.jobs")
MAX_BLOCK_MS = 1500  # the longest blocking read, well under the socket timeout


def _log_transitions(record: JobRecord, changes: list[tuple[JobState, str]]) -> None:
    """One structured log line per job state change (serve --log-format shapes it)."""
    for state, message in changes:
        fields = {"job_id": record.job_id, "tenant": record.tenant, "name": record.name, "kind": record.kind,
                  "state": state.value, "detail": message}
        if state is JobState.PLACED and record.queued_since_s:  # the wait for GPUs (metrics: placement time)
            fields["waited_s"] = round(max(0.0, time.time() - record.queued_since_s), 3)
        transition_log.info("job %s", state.value, extra={"fields": fields})


def _dumps(fields: dict[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in fields.items()}


class JobStore:
    """Jobs, events, queue and leases under the key prefix `namespace:` of one Redis database."""

    def __init__(self, connection: RedisConnection, namespace: str = "shardwright") -> None:
        self.connection, self.ns = connection, namespace

    @classmethod
    def open(cls, settings: Settings | None = None, namespace: str = "shardwright") -> JobStore:
        """Connect as `Settings` say (embedded by default); raises ConnectionError with the fix."""
        return cls(RedisConnection.open(settings), namespace)

    @property
    def client(self) -> redis.Redis:
        """The current client (a new one after the embedded server was restarted)."""
        return self.connection.client

    @property
    def restarts(self) -> int:
        return self.connection.restarts

    def supervise(self, interval_s: float = 0.5) -> None:
        """Restart the embedded Redis when it dies (RedisConnection.supervise)."""
        self.connection.supervise(interval_s)

    def close(self) -> None:
        """Close the connection (RedisConnection.close)."""
        self.connection.close()

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
