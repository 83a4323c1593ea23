"""Helpers shared by test modules (import them from here, never from a conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardwright.config import ModelSpec

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
