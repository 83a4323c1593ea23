"""Fixtures for in-process server tests: one local Ray cluster for the session.

Tests that start `shardwright serve` as a subprocess do not use it (each server starts its own);
tests that build a ShardwrightServer in this process over a live SchedulerService share it.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray instance with 4 logical GPUs (workers use CPU tensors and gloo)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
