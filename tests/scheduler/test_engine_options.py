"""A deployment's job-file engine options reach the engine's EngineConfig unchanged."""

from __future__ import annotations

import pytest

from shardwright.actors.engine import EngineConfig
from shardwright.config import InferenceDeployment
from shardwright.scheduler.runners import _engine_config


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_caching_and_limits_reach_the_engine(tmp_path, caching):
    spec = InferenceDeployment(name="chat", model=tmp_path, engine={"prefix_caching": caching, "block_size": 8})
    config = EngineConfig(**_engine_config(spec, None))
    assert (config.prefix_caching, config.block_size) == (caching, 8)
    assert InferenceDeployment(name="chat", model=tmp_path).engine.prefix_caching  # on by default
