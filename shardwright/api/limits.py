"""Request size limit with a message a person can act on.

gRPC's own limit answers RESOURCE_EXHAUSTED "Received message larger than max (N vs. M)", which
says neither which limit nor how to change it. This interceptor refuses unary requests (every
Shardwright call takes one request message) over `limit_bytes` itself, before they are parsed,
naming the size, the limit and the flag that raises it. gRPC's own limit stays as a backstop at
`core_limit_bytes(limit_bytes)` so that no request beyond it is ever buffered.

The same interceptor (CallGuard) keeps any one caller from stalling the server: long calls
(streams and Generate) are counted and capped per tenant, per unauthenticated peer and in total,
and run on threads beyond the short calls' share (CallLimits).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

MIB = 1024 * 1024


def core_limit_bytes(limit_bytes: int) -> int:
    """gRPC's hard receive limit: room above ours so that our message is the one people see."""
    return 2 * limit_bytes + MIB


@dataclass(frozen=True)
class Oversized:
    """Stands in for a request that was too large to parse."""

    num_bytes: int


def _size(num_bytes: int) -> str:
    return f"{num_bytes / MIB:.1f} MiB" if num_bytes >= MIB else f"{num_bytes / 1024:.1f} KiB"


def too_large_message(num_bytes: int, limit_bytes: int) -> str:
    return (f"request is {_size(num_bytes)} ({num_bytes} bytes), over this server's limit of {_size(limit_bytes)}: "
            "send a shorter prompt or job file, or raise the limit with `shardwright serve --max-request-mib`")


# ---- overload protection: how many calls may run, and for how long

# The flag of `shardwright serve` that sets each limit, named in the refusals.
FLAGS = {"max_workers": "--max-workers", "max_concurrent_rpcs": "--max-concurrent-rpcs",
         "max_streams": "--max-streams", "max_streams_per_tenant": "--max-streams-per-tenant",
         "max_streams_per_peer": "--max-streams-per-peer",
         "generate_default_deadline_s": "--generate-default-deadline-s",
         "generate_max_deadline_s": "--generate-max-deadline-s", "watch_max_age_s": "--watch-max-age-s"}
# Unary calls that may run long (a whole generation): admitted like streams, so that they cannot
# take the threads the short calls need.
LONG_UNARY = ("/shardwright.v1.InferenceService/Generate",)
REFLECTION_PREFIX = "/grpc.reflection."
# Trailing metadata of a WatchJob stream ended for its age: the sequence to watch again from
# (api/client.py reconnects from it).
RESUME_KEY = "x-shardwright-resume-sequence"


@dataclass(frozen=True)
class CallLimits:
    """The server's call limits (flags of `shardwright serve`, see FLAGS).

    Long calls (every stream, and Generate) run on threads of their own, at most `max_streams`
    at once, so the `max_workers` threads of the short unary calls are never held by them; a
    tenant may hold `max_streams_per_tenant` of them and a caller without a token (health Watch,
    reflection) `max_streams_per_peer` per IP address. gRPC itself refuses calls beyond
    `max_concurrent_rpcs` in flight. Generations get `generate_default_deadline_s` when the
    client sets no deadline and never more than `generate_max_deadline_s`; WatchJob streams end
    after `watch_max_age_s` with the sequence to resume from (the client reconnects).
    """

    max_workers: int = 32
    max_concurrent_rpcs: int = 1024
    max_streams: int = 128
    max_streams_per_tenant: int = 32
    max_streams_per_peer: int = 8
    generate_default_deadline_s: float = 300.0
    generate_max_deadline_s: float = 3600.0
    watch_max_age_s: float = 600.0

    def __post_init__(self) -> None:
        for name in FLAGS:
            if not getattr(self, name) > 0:
                raise ValueError(f"{FLAGS[name]} must be positive, got {getattr(self, name)}")
        if self.generate_default_deadline_s > self.generate_max_deadline_s:
            raise ValueError(f"--generate-default-deadline-s ({self.generate_default_deadline_s:g}) is above "
                             f"--generate-max-deadline-s ({self.generate_max_deadline_s:g})")
        if self.max_concurrent_rpcs <= self.max_streams:
            raise ValueError(f"--max-concurrent-rpcs ({self.max_concurrent_rpcs}) must be above --max-streams "
                             f"({self.max_streams}), or short calls could find no room")

    @property
    def threads(self) -> int:
        """Threads of the server's pool: the short calls' share plus one per admitted long call."""
        return self.max_workers + self.max_streams


def peer_ip(peer: str) -> str:
    """The address part of a gRPC peer string ('ipv4:1.2.3.4:5678', 'ipv6:[::1]:5678')."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer  # unix sockets and the like: one peer each


class StreamSlots:
    """Counts the long calls in flight, in total and per key ('tenant alice', 'peer 1.2.3.4')."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self.total = 0
        self.by_key: dict[str, int] = {}

    def acquire(self, key: str, per_key_limit: int, per_key_limit_name: str) -> str | None:
        """Take a slot; returns None, or the refusal naming the limit that is full and its flag."""
        with self._lock:
            if self.total >= self.limits.max_streams:
                return (f"the server has {self.total} streams and long calls open, its limit "
                        f"(raise it with `shardwright serve {FLAGS['max_streams']}`); try again later")
            held = self.by_key.get(key, 0)
            if held >= per_key_limit:
                return (f"{key} has {held} streams and long calls open, the limit of {per_key_limit} per "
                        f"{per_key_limit_name.removeprefix('max_streams_per_')} (set by `shardwright serve "
                        f"{FLAGS[per_key_limit_name]}`): close one first")
            self.total += 1
            self.by_key[key] = held + 1
            return None

    def release(self, key: str) -> None:
        with self._lock:
            self.total -= 1
            self.by_key[key] -= 1
            if not self.by_key[key]:
                del self.by_key[key]


class _Once:
    """Releases a slot exactly once, whichever of the handler's end and the call's end comes first."""

    def __init__(self, slots: StreamSlots, key: str) -> None:
        self.slots, self.key, self._lock, self._done = slots, key, threading.Lock(), False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self.slots.release(self.key)


class CallGuard(grpc.ServerInterceptor):
    """Runs before every handler, without changing its kind (a unary-stream handler stays one):

    - refuses requests over `limit_bytes` with RESOURCE_EXHAUSTED naming --max-request-mib
      (unary requests; streaming ones, i.e. reflection, are left to gRPC's own limit);
    - admits long calls (streams, Generate) against StreamSlots, by tenant or, for callers
      without a token, by peer IP: RESOURCE_EXHAUSTED naming the full limit and its flag;
    - refuses reflection without a valid token when the server has tokens.

    `intercept_service` runs on gRPC's polling thread, so it does nothing slow; the checks run at
    the start of the call on its own thread.
    """

    def __init__(self, auth, limits: CallLimits, limit_bytes: int, slots: StreamSlots | None = None) -> None:
        self.auth, self.limits, self.limit_bytes = auth, limits, limit_bytes
        self.slots = slots or StreamSlots(limits)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        tenant = self.auth.tenant(details.invocation_metadata)
        long_call = handler.request_streaming or handler.response_streaming or method in LONG_UNARY
        if method.startswith(REFLECTION_PREFIX) and tenant is None:
            return _wrap(handler, self._refuse_reflection)
        checks = []
        if not handler.request_streaming:
            checks.append(self._size_check)
        if long_call:
            checks.append(self._admit(tenant))
        if not checks:
            return handler
        if not handler.request_streaming:  # parse lazily: an oversized request is never parsed
            handler = handler._replace(request_deserializer=self._deserializer(handler.request_deserializer))
        return _wrap(handler, *checks)

    def _deserializer(self, parse):
        limit = self.limit_bytes

        def deserialize(data: bytes):
            if len(data) > limit:
                return Oversized(len(data))
            return parse(data) if parse else data

        return deserialize

    def _size_check(self, request, context) -> None:
        if isinstance(request, Oversized):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large_message(request.num_bytes, self.limit_bytes))

    @staticmethod
    def _refuse_reflection(request, context) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "reflection needs a bearer token on this server: send "
                                                       "metadata 'authorization: Bearer TOKEN'")

    def _admit(self, tenant: str | None):
        def admit(request, context) -> None:
            if tenant is not None:
                key, limit_name = f"tenant {tenant}", "max_streams_per_tenant"
            else:
                key, limit_name = f"peer {peer_ip(context.peer())}", "max_streams_per_peer"
            refusal = self.slots.acquire(key, getattr(self.limits, limit_name), limit_name)
            if refusal is not None:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            release = _Once(self.slots, key)
            if not context.add_callback(release):  # the call already ended
                release()
            return release  # the handler's own end releases it too (see _wrap)

        return admit


def _wrap(handler, *checks):
    """`handler` with `checks(request, context)` run first, each may abort; same kind, same
    serializers. A slot taken by a check is released when the handler returns or the call ends."""

    def run_checks(request, context) -> list:
        return [release for check in checks if (release := check(request, context)) is not None]

    def done(releases: list) -> None:
        for release in releases:
            release()

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        def unary_unary(request, context):
            releases = run_checks(request, context)
            try:
                return behavior(request, context)
            finally:
                done(releases)

        return handler._replace(unary_unary=unary_unary)
    if handler.unary_stream is not None:
        behavior = handler.unary_stream

        def unary_stream(request, context):
            releases = run_checks(request, context)
            try:
                yield from behavior(request, context)
            finally:
                done(releases)

        return handler._replace(unary_stream=unary_stream)
    if handler.stream_unary is not None:
        behavior = handler.stream_unary

        def stream_unary(request_iterator, context):
            releases = run_checks(None, context)
            try:
                return behavior(request_iterator, context)
            finally:
                done(releases)

        return handler._replace(stream_unary=stream_unary)
    behavior = handler.stream_stream

    def stream_stream(request_iterator, context):
        releases = run_checks(None, context)
        try:
            yield from behavior(request_iterator, context)
        finally:
            done(releases)

    return handler._replace(stream_stream=stream_stream)
