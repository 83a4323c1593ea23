"""Rank functions for the quantization tests (module level, so `spawn` can import them)."""

from __future__ import annotations

import torch

from shardwright.models import load_model
from tp_cases import context


def run_quant_logits(rank: int, world_size: int, directory: str, ids: torch.Tensor, quant: str, group_size: int):
    """Full logits of the model quantized on this rank after slicing."""
    _, model = load_model(directory, context(world_size), quant=quant, group_size=group_size)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model.full_logits(model(ids, positions))
