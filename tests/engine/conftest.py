"""One local Ray cluster for the engine tests (4 logical GPUs), and small served models."""

from __future__ import annotations

import pytest

from model_helpers import tiny_spec
from shardwright.models.random_init import write_random_checkpoint

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance with 4 logical GPUs (no GPU needed: workers use CPU + gloo)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def served_models(tmp_path_factory):
    """Random Llama (GQA) and GPT-2 checkpoints with diverse greedy continuations."""
    root = tmp_path_factory.mktemp("served")
    specs = {
        "llama": tiny_spec("llama", num_kv_heads=2, num_layers=4, max_position_embeddings=1024),
        "gpt2": tiny_spec("gpt2", num_layers=4, max_position_embeddings=1024),
    }
    return {name: write_random_checkpoint(root / name, spec, seed=11 + i, std=0.15)
            for i, (name, spec) in enumerate(specs.items())}
