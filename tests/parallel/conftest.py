"""Shared fixtures for tests/parallel: one gloo launch per world size for all attention tests."""

from __future__ import annotations

import pytest

from attention_cases import run_attention_world


@pytest.fixture(scope="session")
def attention_world():
    """world -> per-rank result dicts of `attention_world_main`, launched at most once per world."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = run_attention_world(world)
        return cache[world]

    return get
