"""Small served models for the engine tests (the Ray cluster is tests/conftest.py's ray_cluster)."""

from __future__ import annotations

import pytest

from model_helpers import tiny_spec
from shardwright.models.random_init import write_random_checkpoint


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
