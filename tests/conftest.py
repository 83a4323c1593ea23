"""Shared fixtures: small checkpoints in Hugging Face layout, and the path of ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardwright.config import ModelSpec
from shardwright.models.random_init import write_random_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test reads the project's shared data (../shared)")
    return path


def tiny_spec(architecture: str = "llama", **overrides) -> ModelSpec:
    """A model small enough for multi-process tests: 2 layers, width 64, odd vocab (padding)."""
    base = dict(architecture=architecture, vocab_size=203, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=256,
                norm_eps=1e-5)
    if architecture == "gpt2":
        base.update(activation="gelu_new", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    base.update(overrides)
    return ModelSpec(**base)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random checkpoints of both families, GQA variants, tied/untied, sharded files."""
    root = tmp_path_factory.mktemp("ckpt")
    specs = {
        "llama": tiny_spec("llama"),
        "llama_gqa": tiny_spec("llama", num_kv_heads=2, attention_bias=True),
        "llama_mqa_tied": tiny_spec("llama", num_kv_heads=1, tie_word_embeddings=True),
        "gpt2": tiny_spec("gpt2"),
    }
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        out[name] = write_random_checkpoint(root / name, spec, seed=i, std=0.2,
                                            num_shards=2 if name == "llama_gqa" else 1)
    return out


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
