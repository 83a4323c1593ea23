"""A served model for the pooling tests (the Ray cluster is tests/conftest.py's ray_cluster)."""

from __future__ import annotations

import pytest

from model_helpers import tiny_spec
from shardwright.models.random_init import write_random_checkpoint


@pytest.fixture(scope="session")
def pool_model(tmp_path_factory):
    """A Llama (GQA) checkpoint of 12 layers whose layers dominate its bytes (47 MiB of 50)."""
    spec = tiny_spec("llama", num_kv_heads=2, num_layers=12, hidden_size=256, intermediate_size=1024,
                     num_heads=4, head_dim=64, vocab_size=97, max_position_embeddings=256)
    return write_random_checkpoint(tmp_path_factory.mktemp("pool") / "llama", spec, seed=5, std=0.15)
