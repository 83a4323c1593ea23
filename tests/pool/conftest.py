"""One local Ray cluster for the pooling tests (4 logical GPUs), and a served model."""

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
def pool_model(tmp_path_factory):
    """A Llama (GQA) checkpoint of 12 layers whose layers dominate its bytes (47 MiB of 50)."""
    spec = tiny_spec("llama", num_kv_heads=2, num_layers=12, hidden_size=256, intermediate_size=1024,
                     num_heads=4, head_dim=64, vocab_size=97, max_position_embeddings=256)
    return write_random_checkpoint(tmp_path_factory.mktemp("pool") / "llama", spec, seed=5, std=0.15)
